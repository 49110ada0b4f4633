from embedctl.jobs.cli import main

main()

from embedctl.cli import main

main()

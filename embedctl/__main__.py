"""`python -m embedctl`: the same as the `embedctl` command."""

from embedctl.jobs.cli import main

main()

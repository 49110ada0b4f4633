"""`python -m embedctl`: the same as the `embedctl` command."""

from embedctl.cli import main

main()

"""`python -m sam_backend ...` runs the `sam-backend` command line."""

from sam_backend.commands.cli import main

main()

"""The `sam-backend` command line and the work of each of its commands."""

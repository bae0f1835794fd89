"""``python -m tasync`` runs the CLI."""

from tasync.cli import main

main()

"""``python -m synthtrial`` runs the command line."""

from synthtrial.cli import main

main()

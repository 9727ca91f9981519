"""`lutstore ingest|serve|info|verify|get|drop`: the command line (`python -m lutstore.cli`)."""

from lutstore.cli.commands import HelpFormatter, add_verbose, build_parser, main

__all__ = ["HelpFormatter", "add_verbose", "build_parser", "main"]

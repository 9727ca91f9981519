"""How every command line of the project looks: --help shows the defaults, -v/-vv set the log level
(lutstore's subcommands and inference's generate, evaluate and serve alike)."""

from __future__ import annotations

import argparse


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Keeps the description's line breaks and shows every option's default in --help (unless its
    help already says what the default is, or there is none worth showing)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        if ("default" in text.lower() or not action.option_strings or default in (None, False, argparse.SUPPRESS)
                or isinstance(action, (argparse._HelpAction, argparse._VersionAction, argparse._CountAction))):
            return text
        return f"{text} (default: %(default)s)"


def add_verbose(p: argparse.ArgumentParser, dest: str = "verbose") -> None:
    p.add_argument("-v", "--verbose", action="count", default=0, dest=dest,
                   help="-v info, -vv debug logging (default: warnings only)")

"""What the inference CLIs (generate, evaluate, serve) share around their own work."""

from __future__ import annotations

import argparse
import logging
import sys

from lutstore import alloc
from lutstore.errors import UserError
from lutstore.interrupts import quiet_on_closed_pipe


def cli_main(prog: str, parser: argparse.ArgumentParser, body, argv: list[str] | None) -> int:
    """Parse, set up logging (-v/-vv), run body(args); a UserError is one line on stderr and exit 2."""
    args = parser.parse_args(argv)
    logging.basicConfig(level=[logging.WARNING, logging.INFO, logging.DEBUG][min(args.verbose, 2)],
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # A process-wide malloc setting, so switched on here at the entry point, not by the client library:
    # received row messages reuse freed memory instead of faulting fresh pages in (lutstore/alloc.py).
    alloc.keep_freed_memory()
    try:
        return quiet_on_closed_pipe(lambda: body(args))   # `generate ... | head`: 141, quietly
    except UserError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130

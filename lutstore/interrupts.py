"""SIGTERM and Ctrl-C in the command-line tools: one line, a clean exit, no traceback.

- `sigterm_raises()` turns SIGTERM into a `Terminated` exception, so `with`
  blocks and `finally` clauses run (an ingest removes its staging files)
  instead of the process vanishing with rc -15.
- `deferred()` holds SIGTERM and SIGINT back over a step that must not be cut
  in half (an ingest's commit), then delivers them.
- `finished(line)`: the command's work is done (an ingest has committed), so a
  signal from now on only says `line` and the command finishes and exits 0;
  for the process's own command line (`sigterm_raises(until_exit=True)`) that
  holds through the interpreter's exit too, which otherwise a SIGTERM turns into
  a death by the signal (rc -15) with the output half printed.
- `raise_if_signalled()` re-raises a signal that an extension swallowed: a
  handler's exception raised inside C code that calls back into Python (a
  safetensors read) can come out as that code's own error instead.
- `quiet_on_closed_pipe(body)` ends a tool whose reader left (`info | head`)
  with 141 and no BrokenPipeError traceback, as `cat` does.
- `quiet_keyboard_interrupt(prog)` prints "PROG: interrupted" instead of a
  traceback for a Ctrl-C that lands before main() runs (while torch imports).
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from contextlib import contextmanager
from typing import Callable, Iterator

EXIT_SIGTERM = 128 + signal.SIGTERM   # what a shell reports for a process ended by SIGTERM
EXIT_SIGINT = 128 + signal.SIGINT
EXIT_BROKEN_PIPE = 128 + signal.SIGPIPE   # what a shell reports for a tool stopped by a closed pipe


class Terminated(BaseException):
    """SIGTERM arrived. A BaseException, like KeyboardInterrupt, so `except Exception` lets it through."""


_held: list[int] | None = None   # signals that arrived inside deferred(); None outside it
_signalled: int | None = None    # the last signal whose handler raised, inside sigterm_raises()
_active = False                  # inside sigterm_raises()
_finished: str | None = None     # finished(line) was called inside it: signals only print line


def _ignore_after_finish(signum, frame) -> None:
    if _finished:
        try:   # os.write, not print: a handler may run in the middle of a print to stderr
            os.write(2, f"{_finished} ({signal.Signals(signum).name} ignored)\n".encode())
        except OSError:
            pass


def _on_sigterm(signum, frame) -> None:
    global _signalled
    if _finished:
        return _ignore_after_finish(signum, frame)
    if _held is not None:
        _held.append(signum)
        return
    _signalled = signum
    raise Terminated()


def _on_sigint(signum, frame) -> None:
    global _signalled
    if _finished:
        return _ignore_after_finish(signum, frame)
    if _held is not None:
        _held.append(signum)
        return
    _signalled = signum
    raise KeyboardInterrupt()


def raise_if_signalled() -> None:
    """Raise Terminated / KeyboardInterrupt again if a handler raised one since sigterm_raises()
    began: call it where an error is about to be reported as something else (`except Exception`
    around an extension), so a SIGTERM is never misread as, say, a damaged checkpoint."""
    if _signalled == signal.SIGTERM:
        raise Terminated()
    if _signalled == signal.SIGINT:
        raise KeyboardInterrupt()


def finished(line: str) -> None:
    """The command's work is done (an ingest has committed): inside sigterm_raises() a SIGTERM or
    SIGINT from now on prints `line` on stderr and is otherwise ignored, so the command finishes
    (and exits 0) instead of reporting a failure for work that was done."""
    global _finished
    if _active and threading.current_thread() is threading.main_thread():
        _finished = line


@contextmanager
def sigterm_raises(until_exit: bool = False) -> Iterator[None]:
    """Inside the block SIGTERM raises Terminated in the main thread (and SIGINT KeyboardInterrupt, as
    always); the previous handlers come back after. until_exit: the block is the process's whole
    command (the CLI's entry point): once finished() was called, signals stay ignored after the block
    while the interpreter exits."""
    global _signalled, _active, _finished
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    _signalled, _active, _finished = None, True, None
    # SIGINT keeps its meaning (KeyboardInterrupt); our handler only also notes it for raise_if_signalled
    # (an ignored SIGINT, as in a shell's background job, stays ignored)
    previous = {signal.SIGTERM: signal.signal(signal.SIGTERM, _on_sigterm)}
    if signal.getsignal(signal.SIGINT) is signal.default_int_handler:
        previous[signal.SIGINT] = signal.signal(signal.SIGINT, _on_sigint)
    try:
        yield
    finally:
        done = _finished is not None and until_exit   # the interpreter's exit must not undo a finished command
        for s, handler in previous.items():
            signal.signal(s, _ignore_after_finish if done else handler)
        _signalled, _active = None, False
        if not done:
            _finished = None


@contextmanager
def deferred() -> Iterator[None]:
    """SIGTERM and SIGINT that arrive inside the block are raised when it ends, not in its middle."""
    global _held
    if threading.current_thread() is not threading.main_thread() or _held is not None:
        yield
        return
    previous = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    _held = []
    signal.signal(signal.SIGTERM, _on_sigterm)
    signal.signal(signal.SIGINT, _on_sigint)
    try:
        yield
    finally:
        held, _held = _held, None
        for s, handler in previous.items():
            signal.signal(s, handler)
        if held and _finished:
            for signum in held:
                _ignore_after_finish(signum, None)
        elif held:
            raise Terminated() if signal.SIGTERM in held else KeyboardInterrupt()


def quiet_on_closed_pipe(body: Callable[[], int]) -> int:
    """body()'s exit status, its output flushed here so that a reader who left is met here, not at
    exit; if the reader left, EXIT_BROKEN_PIPE quietly: it has what it wanted."""
    try:
        status = body()
        sys.stdout.flush()
        return status
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())   # no second error at exit's flush
        return EXIT_BROKEN_PIPE


def quiet_keyboard_interrupt(prog: str) -> None:
    """An uncaught KeyboardInterrupt (e.g. during `import torch`) prints one line, not a traceback."""
    previous = sys.excepthook

    def hook(exc_type, exc, tb) -> None:
        if issubclass(exc_type, KeyboardInterrupt):
            print(f"{prog}: interrupted", file=sys.stderr)
        else:
            previous(exc_type, exc, tb)

    sys.excepthook = hook

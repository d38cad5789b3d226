"""One error policy and one log channel for every ``hqjax`` entry point.

``hqjax``, ``hqjax sweep`` and ``python -m hqjax.alloc`` run their work inside
:func:`run_main`: a :class:`UserError` (bad input: an unknown name, an impossible bit width,
an infeasible budget, a missing or corrupt file) becomes one line on stderr and exit code 2;
any other exception is a bug in hqjax and keeps its traceback, exit code 1. Checks run
before any long work, so a user error never costs a training run.

Library messages (fallbacks, solver notes, unconverged estimates) go to
``logging.getLogger("hqjax")``; the commands attach one stderr handler with
:func:`configure_logging` (``--quiet``: warnings only, ``-v``: debug).
"""

from __future__ import annotations

import argparse
import logging
import sys
import traceback
from typing import Callable, Sequence

__all__ = ["UserError", "ArgumentParser", "DefaultsHelpFormatter", "EXIT_OK", "EXIT_BUG", "EXIT_USER", "EXIT_INTERRUPTED", "one_line", "run_main",
           "configure_logging", "add_logging_flags", "logger"]

EXIT_OK, EXIT_BUG, EXIT_USER, EXIT_INTERRUPTED = 0, 1, 2, 130

logger = logging.getLogger("hqjax")


class UserError(Exception):
    """Bad input from the user (unknown name, impossible setting, unreadable file): exit code 2.

    The message names the problem and what would work instead, on one line.
    """


class ArgumentParser(argparse.ArgumentParser):
    """argparse with the error policy: a bad flag is one line on stderr and exit code 2
    (argparse's own error prints the whole usage block first)."""

    def error(self, message: str):
        self.exit(EXIT_USER, f"{self.prog}: error: {message}; see {self.prog} --help\n")


class DefaultsHelpFormatter(argparse.RawDescriptionHelpFormatter):
    """``--help`` shows each option's default as a user would type it (``2,3,4,8``), and
    keeps the description's line breaks; options without a value (off, empty) show none."""

    def _get_help_string(self, action):
        text, default = action.help or "", action.default
        empty = default is None or default is False or default == argparse.SUPPRESS or default == []
        if "(default" in text or empty or default == () or not action.option_strings:
            return text
        shown = ",".join(map(str, default)) if isinstance(default, (tuple, list)) else str(default)
        return f"{text} (default: {shown.replace('%', '%%')})"


def one_line(message: object) -> str:
    """``message`` on a single line (multi-line library messages joined with ``'; '``)."""
    return "; ".join(part.strip() for part in str(message).splitlines() if part.strip())


def run_main(prog: str, body: Callable[[Sequence[str]], int | None], argv: Sequence[str]) -> int:
    """Run ``body(argv)`` under the error policy and return the exit code.

    ``SystemExit`` (argparse's own exit 2 for unknown flags, ``--help``'s exit 0) passes
    through unchanged.
    """
    try:
        return int(body(argv) or EXIT_OK)
    except UserError as e:
        print(f"{prog}: error: {one_line(e)}", file=sys.stderr)
        return EXIT_USER
    except KeyboardInterrupt:
        print(f"\n{prog}: interrupted; run the same command again to resume from the last finished step",
              file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception:  # noqa: BLE001 - the boundary: anything else is our bug, reported as such
        traceback.print_exc()
        print(f"{prog}: internal error (exit code 1): the traceback above is a bug in hqjax or its "
              "dependencies, not in your input", file=sys.stderr)
        return EXIT_BUG


def add_logging_flags(parser) -> None:
    """``--quiet`` / ``-q`` and ``--verbose`` / ``-v`` on an argparse parser or group."""
    parser.add_argument("--quiet", "-q", action="store_true",
                        help="print only the result and errors (library messages: warnings only)")
    parser.add_argument("--verbose", "-v", action="count", default=0,
                        help="more library messages: -v adds debug ones, solver output among them (default: off)")


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is when a message is emitted (not the stream of
    the moment it was attached), so a replaced or captured stderr is always the target."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value):  # StreamHandler.__init__ assigns one; the property ignores it
        pass


def configure_logging(quiet: bool = False, verbose: int = 0) -> logging.Handler:
    """Attach (or replace) the commands' stderr handler on the ``hqjax`` logger.

    Level: WARNING with ``quiet``, DEBUG with ``verbose``, INFO otherwise. Only the handler
    this function added before is replaced, so a host application's handlers stay.
    """
    level = logging.WARNING if quiet else logging.DEBUG if verbose else logging.INFO
    for h in list(logger.handlers):
        if getattr(h, "_hqjax_cli", False):
            logger.removeHandler(h)
    handler = _StderrHandler()
    handler._hqjax_cli = True  # marks the handler this function owns
    handler.setFormatter(logging.Formatter("hqjax: %(levelname)s: %(message)s"))
    logger.addHandler(handler)
    logger.setLevel(level)
    return handler

"""Pieces shared by every ``visar`` command line (``visar``, ``visar eval``): one-line usage errors with
exit status 2, help texts that state defaults, one ``--threads`` and one ``--quiet`` flag, and
:func:`run_command`, which turns a user error into one ``ERROR`` line and exit status 2.

Imports nothing heavy (no torch at import time), so ``visar --help`` stays fast.
"""
from __future__ import annotations

import argparse
import logging
from typing import Any, Callable

log = logging.getLogger("visar")

#: exception types that mean "the input was wrong" (the message says what to do), not "visar has a bug"
USER_ERRORS = (ValueError, TypeError, KeyError, OSError)
#: default of every ``--threads`` flag: one torch CPU thread. Measured on the 2-core build machine under
#: load, ``visar sample`` took 28-37 s with torch's default (one thread per core) and 9-12 s with one
#: thread (same images); 0 restores torch's default
DEFAULT_THREADS = 1


class Parser(argparse.ArgumentParser):
    """``ArgumentParser`` whose usage errors are one line (``visar sample: error: ...``) and exit 2."""

    def error(self, message: str):  # noqa: D102  (argparse API)
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


class HelpFormatter(argparse.HelpFormatter):
    """Help texts that state every option's default: ``(default: X)`` is appended unless the text already
    says what the default is (options whose default is "unset" explain it in words); on/off flags are off."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if ("(default" in text or "no default" in text or action.nargs == 0 or not action.option_strings
                or action.default in (None, argparse.SUPPRESS)):
            return text
        return text + " (default: %(default)s)"


def positive_int(text: str) -> int:
    """argparse ``type``: an int >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def non_negative_int(text: str) -> int:
    """argparse ``type``: an int >= 0."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def one_line(message: str) -> str:
    """A multi-line error message as one line (``ERROR`` lines are one line each)."""
    return " ".join(part.strip() for part in str(message).splitlines() if part.strip())


def error_message(e: BaseException) -> str:
    if isinstance(e, KeyError) and e.args:
        return str(e.args[0])
    return str(e) or type(e).__name__


def run_command(func: Callable[..., Any], *args: Any, logger: logging.Logger = log, verbose: bool = False) -> int:
    """Run a sub-command's handler: user errors become one ``ERROR`` line and exit status 2 (130 on Ctrl-C);
    anything else (a bug) propagates with its traceback."""
    try:
        return int(func(*args) or 0)
    except KeyboardInterrupt:
        logger.error("interrupted")
        return 130
    except SystemExit as e:  # a handler's sys.exit("message"): a usage error
        if e.code is None or isinstance(e.code, int):
            raise
        logger.error("%s", one_line(str(e.code)))
        return 2
    except MemoryError:
        logger.error("out of memory: lower --batch-size (or the image count per call)")
        return 2
    except RuntimeError as e:
        text = str(e)
        if type(e).__name__ == "OutOfMemoryError" or "out of memory" in text or "can't allocate memory" in text:
            logger.error("out of memory (%s): lower --batch-size", one_line(text)[:200])
            return 2
        raise
    except USER_ERRORS as e:
        logger.error("%s", one_line(error_message(e)))
        if verbose:
            logger.debug("traceback", exc_info=True)
        return 2


def set_threads(threads: int) -> None:
    """``torch.set_num_threads(threads)`` unless 0 (torch's default)."""
    if threads:
        import torch

        torch.set_num_threads(threads)


def add_threads_flag(parser: argparse.ArgumentParser) -> None:
    """The one ``--threads`` flag of ``visar sample``, ``visar eval sample`` and ``visar tokenize``."""
    parser.add_argument("--threads", type=non_negative_int, default=DEFAULT_THREADS,
                        help="torch CPU threads; 1 avoids oversubscribing a shared or small CPU (measured 3x faster "
                             "than one thread per core on the loaded 2-core build machine), 0: torch's default")


def add_quiet_flag(parser: argparse.ArgumentParser) -> None:
    """``--quiet`` (no progress bars); ``--no-progress`` is a hidden alias kept for old scripts."""
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    parser.add_argument("--no-progress", dest="quiet", action="store_true", help=argparse.SUPPRESS)

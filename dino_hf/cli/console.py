"""What every command shares: its argument parser, one-sentence errors, and the output a person reads.

- :class:`CommandParser`: argparse whose usage errors are one line and exit status 2;
- :func:`run_command`: runs a command's body; bad input (``ValueError``, ``FileNotFoundError``...)
  becomes ``PROG: error: <one sentence>`` on stderr and status 2, ``--debug`` re-raises;
- :func:`dino_hf.progress.configure_output` (re-exported): logging, warnings and library progress bars.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable

from ..progress import configure_output

__all__ = ["CommandParser", "configure_output", "first_line", "is_main_process", "report_error", "run_command",
           "wants_debug"]

#: Errors that mean "the input was wrong": one sentence, exit status 2, nothing written.
BAD_INPUT_ERRORS = (ValueError, FileNotFoundError, NotADirectoryError)


class CommandParser(argparse.ArgumentParser):
    """``argparse.ArgumentParser`` with one-line usage errors (exit status 2) and a ``--debug`` flag."""

    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("formatter_class", argparse.ArgumentDefaultsHelpFormatter)
        kwargs.setdefault("allow_abbrev", False)  # old flag spellings are explicit aliases instead
        super().__init__(*args, **kwargs)
        self.add_argument("--debug", action="store_true", help="Show full tracebacks instead of one-sentence errors.")

    def error(self, message: str) -> None:
        sys.stderr.write(f"{self.prog}: error: {message} (see --help)\n")
        raise SystemExit(2)


def is_main_process() -> bool:
    """Rank 0 of a launched job (``RANK``/``LOCAL_RANK`` unset: a single process)."""
    return os.environ.get("RANK", os.environ.get("LOCAL_RANK", "0")) == "0"


def wants_debug(argv: list[str]) -> bool:
    return any(arg == "--debug" or arg.startswith("--debug=") for arg in argv)


def first_line(error: BaseException) -> str:
    """The first line of an error's message (its type when empty), without a final full stop."""
    text = str(error).strip().strip("'\"")
    return text.splitlines()[0].rstrip(".") if text else type(error).__name__


def report_error(prog: str, message: str) -> None:
    """``PROG: error: MESSAGE.`` on stderr, from the main process only."""
    if is_main_process():
        message = message.strip()
        sys.stderr.write(f"{prog}: error: {message}{'' if message.endswith(('.', ')')) else '.'}\n")


def run_command(prog: str, body: Callable[[], int], debug: bool) -> int:
    """Run ``body`` (returns the exit status); bad input -> one sentence and 2, Ctrl-C -> 130."""
    try:
        return body()
    except BAD_INPUT_ERRORS as error:
        if debug:
            raise
        from ..run_output import scrub_secrets

        report_error(prog, scrub_secrets(first_line(error)))
        return 2
    except KeyboardInterrupt:
        if debug:
            raise
        report_error(prog, "interrupted")
        return 130

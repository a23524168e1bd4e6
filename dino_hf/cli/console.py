"""What every command shares: its argument parser, one-sentence errors, and the output a person reads.

- :class:`CommandParser`: argparse whose usage errors are one line and exit status 2;
- :func:`run_main`: a command's ``main``: parses, sets up the output and runs the command through
  :func:`run_command`, a refused Hub push (``HubPushError``) also becoming one sentence and status 2;
- :func:`run_command`: runs a command's body; bad input (``ValueError``, ``FileNotFoundError``...)
  becomes ``PROG: error: <one sentence>`` on stderr and status 2, ``--debug`` re-raises;
- :func:`dino_hf.base.progress.configure_output` (re-exported): logging, warnings and library progress bars.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable

from transformers.hf_argparser import string_to_bool

from dino_hf.base.progress import configure_output

__all__ = ["CommandParser", "add_boolean_flag", "configure_output", "deprecated_spelling", "first_line",
           "is_main_process", "report_error", "run_command", "run_main", "wants_debug"]

#: Errors that mean "the input was wrong": one sentence, exit status 2, nothing written.
BAD_INPUT_ERRORS = (ValueError, FileNotFoundError, NotADirectoryError)


class CommandParser(argparse.ArgumentParser):
    """``argparse.ArgumentParser`` with one-line usage errors (exit status 2) and a ``--debug`` flag."""

    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("formatter_class", argparse.ArgumentDefaultsHelpFormatter)
        kwargs.setdefault("allow_abbrev", False)  # old flag spellings are explicit aliases instead
        super().__init__(*args, **kwargs)
        add_boolean_flag(self, "debug", False, "Show full tracebacks instead of one-sentence errors.")

    def error(self, message: str) -> None:
        sys.stderr.write(f"{self.prog}: error: {message} (see --help)\n")
        raise SystemExit(2)


def add_boolean_flag(parser: argparse.ArgumentParser, name: str, default: bool, help_text: str) -> None:
    """``--NAME`` as ``dino-hf-train`` (HfArgumentParser) spells a boolean: a switch that also takes a value
    (``--NAME``, ``--NAME false``), with ``--no_NAME`` to turn a default-on flag off."""
    parser.add_argument(f"--{name}", type=string_to_bool, nargs="?", const=True, default=default, help=help_text)
    if default:
        parser.add_argument(f"--no_{name}", dest=name, action="store_false", help=f"Turn --{name} off.")


def deprecated_spelling(*old: str) -> str:
    """The note an old spelling of a flag gets in ``--help``: it still works, and will not forever."""
    return f" ({', '.join(old)}: the old spelling, deprecated.)"


def is_main_process() -> bool:
    """Rank 0 of a launched job (``RANK``/``LOCAL_RANK`` unset: a single process)."""
    return os.environ.get("RANK", os.environ.get("LOCAL_RANK", "0")) == "0"


def wants_debug(argv: list[str]) -> bool:
    """Whether ``argv`` asks for tracebacks (``--debug``, ``--debug true``), read before the arguments are parsed."""
    wanted = False
    for index, arg in enumerate(argv):
        if arg.startswith("--debug="):
            wanted = _as_bool(arg.partition("=")[2]) is True
        elif arg == "--debug":  # a switch, or followed by its value (the last one given decides)
            following = _as_bool(argv[index + 1]) if index + 1 < len(argv) else None
            wanted = True if following is None else following
    return wanted


def _as_bool(text: str) -> bool | None:
    """``text`` as a boolean flag's value (transformers' ``string_to_bool``), ``None`` when it is not one."""
    try:
        return string_to_bool(text)
    except argparse.ArgumentTypeError:
        return None


def first_line(error: BaseException) -> str:
    """The first line of an error's message (its type when empty), without a final full stop."""
    text = str(error).strip().strip("'\"")
    return text.splitlines()[0].rstrip(".") if text else type(error).__name__


def report_error(prog: str, message: str) -> None:
    """``PROG: error: MESSAGE.`` on stderr, from the main process only."""
    if is_main_process():
        message = message.strip()
        sys.stderr.write(f"{prog}: error: {message}{'' if message.endswith(('.', ')')) else '.'}\n")


def run_command(prog: str, body: Callable[[], int], debug: bool, token: str | None = None) -> int:
    """Run ``body`` (returns the exit status); bad input -> one sentence and 2, Ctrl-C -> 130.

    The sentence never shows ``token`` nor anything shaped like a Hugging Face token.
    """
    try:
        return body()
    except BAD_INPUT_ERRORS as error:
        if debug:
            raise
        from dino_hf.base.run_folder import scrub_secrets

        report_error(prog, scrub_secrets(first_line(error), token))
        return 2
    except KeyboardInterrupt:
        if debug:
            raise
        report_error(prog, "interrupted")
        return 130


def run_main(
    prog: str,
    argv: list[str] | None,
    build_parser: Callable[[str], argparse.ArgumentParser],
    command: Callable[[argparse.Namespace], object],
    *,
    prefix_hub_errors: bool = True,
) -> int:
    """The ``main`` of a command: parse ``argv`` (default ``sys.argv[1:]``), set up the output, run ``command``.

    Args:
        prog: the command's name in its messages.
        argv: the arguments, without the program name.
        build_parser: the command's parser, given ``prog``.
        command: runs the command on the parsed arguments; an int it returns is the exit status,
            anything else (a summary, the written files) means 0.
        prefix_hub_errors: write a refused push as ``PROG: error: <sentence>``; ``dino-hf-push`` writes
            the Hub's sentence alone (its whole stderr is, e.g., the login hint).
    Returns:
        The exit status: 2 with one sentence on stderr for bad input (:func:`run_command`) and for a
        refused Hub push (:class:`dino_hf.hub.push.HubPushError`, whose message already names the
        repository and any HTTP status); ``--debug`` re-raises instead. ``--token`` is never shown.
    """
    args = build_parser(prog).parse_args(list(sys.argv[1:] if argv is None else argv))
    configure_output(is_main_process())
    from dino_hf.base.run_folder import scrub_secrets
    from dino_hf.hub.push import HubPushError

    token = getattr(args, "token", None)

    def body() -> int:
        status = command(args)
        return status if isinstance(status, int) else 0

    try:
        return run_command(prog, body, args.debug, token)
    except HubPushError as error:  # MissingTokenError too
        if args.debug:
            raise
        message = scrub_secrets(str(error), token)
        print(f"{prog}: error: {message}" if prefix_hub_errors else message, file=sys.stderr)
        return 2

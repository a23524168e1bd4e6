"""The command line -> :class:`DinoTrainingArguments`: the parser (one flag per field, usage errors in
one line) and ``--config`` (a file or a shipped recipe, :mod:`dino_hf.train.recipes`) whose values the
command line overrides.
"""

from __future__ import annotations

import argparse
import sys

from transformers import HfArgumentParser

from dino_hf.train.arguments import DinoTrainingArguments
from dino_hf.train.recipes import RUN_LENGTH_FLAGS, recipe_values

__all__ = ["build_argument_parser", "parse_training_args"]


class _OneLineErrorParser(HfArgumentParser):
    """HfArgumentParser whose usage errors are one line on stderr and exit status 2, and whose ``--no_X``
    flags (HfArgumentParser adds one for each boolean that defaults to true) say what they do instead of
    repeating ``--X``'s help."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        for action in self._actions:
            negative = [option for option in action.option_strings if option.startswith("--no_")]
            if negative and action.const is False:
                action.help = f"Turn --{action.dest} off (it is on by default)."
                action.default = argparse.SUPPRESS  # --X's default is the field's; "(default: False)" would mislead

    def error(self, message: str) -> None:
        sys.stderr.write(f"{self.prog}: error: {message} (see --help)\n")
        raise SystemExit(2)


def build_argument_parser(prog: str | None = None) -> HfArgumentParser:
    """The parser of `scripts/train.py` (one flag per `DinoTrainingArguments` field)."""
    return _OneLineErrorParser(
        DinoTrainingArguments,
        prog=prog,
        description="Self-supervised DINO pre-training of a vision backbone (Caron et al., 2021).",
    )


def _given(argv: list[str], name: str) -> bool:
    return any(arg == f"--{name}" or arg.startswith(f"--{name}=") for arg in argv)


def parse_training_args(argv: list[str] | None = None, prog: str | None = None) -> DinoTrainingArguments:
    """Parse `argv` (default `sys.argv[1:]`), with `--config FILE` values as overridable defaults.

    Raises:
        ValueError: one sentence naming the flag, for invalid values.
        SystemExit: status 2, for usage errors (unknown flag, wrong type), as argparse does.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_argument_parser(prog)
    config_parser = argparse.ArgumentParser(add_help=False)
    config_parser.add_argument("--config", default=None)
    known, _ = config_parser.parse_known_args(argv)
    if known.config is not None:
        # A run length on the command line replaces the file's (e.g. --max_steps 200 for a smoke run of a
        # time-budgeted recipe); every other flag given overrides the file's value of it.
        on_command_line = {name for name in RUN_LENGTH_FLAGS if _given(argv, name)}
        parser.set_defaults(**recipe_values(known.config, parser, given=on_command_line))
    namespace = parser.parse_args(argv)  # unknown flags: one-line usage error, exit 2
    return DinoTrainingArguments(**vars(namespace))

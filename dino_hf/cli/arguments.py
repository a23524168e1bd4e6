"""The flags that name a model, declared once for every command that loads one, and the backbone they name.

- :func:`add_model_arguments`: ``--model_name_or_path`` (old spelling ``--model``), ``--which`` and
  ``--revision``, for ``dino-hf-eval``, ``dino-hf-attention`` and ``dino-hf-embed``;
- :func:`add_which_argument`: ``--which`` alone (``dino-hf-push`` names its model with ``--output_dir``);
- :func:`load_model_backbone`: the backbone those flags name, or one sentence naming the flag that is wrong.
"""

from __future__ import annotations

import argparse

from torch import nn

from dino_hf.cli.console import first_line
from dino_hf.eval.loading import NETWORKS, load_backbone

__all__ = ["add_model_arguments", "add_which_argument", "load_model_backbone"]


def add_which_argument(parser: argparse.ArgumentParser, help_text: str) -> None:
    """``--which``: the network of a DINO run or model, the teacher (the official choice) by default."""
    parser.add_argument("--which", choices=NETWORKS, default="teacher", help=help_text)


def add_model_arguments(parser: argparse.ArgumentParser, use: str) -> None:
    """``--model_name_or_path`` (alias ``--model``, required), ``--which`` and ``--revision``.

    Args:
        parser: the command's parser.
        use: what the command does with the network, ending ``--which``'s help: "Network of a DINO run
            or model to {use}."
    """
    parser.add_argument("--model_name_or_path", "--model", dest="model_name_or_path", required=True,
                        help="Backbone folder or Hub id, a training run's --output_dir, or a DinoForPreTraining folder.")
    add_which_argument(parser, f"Network of a DINO run or model to {use}.")
    parser.add_argument("--revision", default=None, help="Hub revision of --model_name_or_path.")


def load_model_backbone(args: argparse.Namespace, *, requires: str | None = None,
                        attn_implementation: str | None = None) -> nn.Module:
    """The ``--which`` backbone of ``--model_name_or_path`` at ``--revision`` (flags of :func:`add_model_arguments`).

    Args:
        args: the parsed arguments.
        requires: a config attribute the command needs (``hidden_size``, ``patch_size``); a model whose
            config lacks it is refused as not ViT-style.
        attn_implementation: as :func:`dino_hf.eval.loading.load_backbone` (``"eager"`` for attention maps).
    Raises:
        ValueError: one sentence naming ``--which`` or ``--model_name_or_path`` (a path or id that holds
            no model, transformers' ``OSError`` included).
    """
    try:
        backbone = load_backbone(args.model_name_or_path, attn_implementation=attn_implementation,
                                 revision=args.revision, which=args.which)
    except (OSError, ValueError, KeyError) as error:
        message = first_line(error)
        if "--which" in message:
            raise ValueError(message) from None
        raise ValueError(f"--model_name_or_path {args.model_name_or_path!r} is not a loadable backbone, run folder "
                         f"or Hub id ({message})") from None
    if requires is not None and not hasattr(backbone.config, requires):
        raise ValueError(f"--model_name_or_path {args.model_name_or_path!r} is not a ViT-style backbone "
                         f"(its config has no {requires})")
    return backbone

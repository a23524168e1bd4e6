"""The flags that name a model, declared once for every command that loads one, and the backbone they name.

- :func:`add_model_arguments`: ``--model_name_or_path`` (old spelling ``--model``), ``--which`` and
  ``--model_revision``, for ``dino-hf-eval``, ``dino-hf-attention`` and ``dino-hf-embed``;
- :func:`add_which_argument`: ``--which`` alone (``dino-hf-push`` names its model with ``--output_dir``);
- :func:`add_eval_reading_arguments`: ``--per_device_eval_batch_size`` (old spelling ``--batch_size``) and
  ``--streaming``, for ``dino-hf-eval`` and ``dino-hf-embed``;
- :func:`load_model_backbone`: the backbone those flags name, or one sentence naming the flag that is wrong.
"""

from __future__ import annotations

import argparse

from torch import nn

from dino_hf.cli.console import add_boolean_flag, deprecated_spelling, first_line
from dino_hf.eval.loading import NETWORKS, backbone_config_of, load_backbone
from dino_hf.models.backbones import SUPPORTED_MODEL_TYPES, family_of

__all__ = ["add_eval_reading_arguments", "add_model_arguments", "add_which_argument", "load_model_backbone"]


def add_which_argument(parser: argparse.ArgumentParser, help_text: str) -> None:
    """``--which``: the network of a DINO run or model, the teacher (the official choice) by default."""
    parser.add_argument("--which", choices=NETWORKS, default="teacher", help=help_text)


def add_model_arguments(parser: argparse.ArgumentParser, use: str) -> None:
    """``--model_name_or_path`` (alias ``--model``, required), ``--which`` and ``--model_revision``.

    Args:
        parser: the command's parser.
        use: what the command does with the network, ending ``--which``'s help: "Network of a DINO run
            or model to {use}."
    """
    parser.add_argument("--model_name_or_path", "--model", dest="model_name_or_path", required=True,
                        help="Backbone folder or Hub id, a training run's --output_dir, or a DinoForPreTraining folder.")
    add_which_argument(parser, f"Network of a DINO run or model to {use}.")
    parser.add_argument("--model_revision", "--revision", dest="model_revision", default=None,
                        help="Hub revision (branch, tag or commit) of --model_name_or_path." + deprecated_spelling("--revision"))


def add_eval_reading_arguments(parser: argparse.ArgumentParser, batch_help: str) -> None:
    """``--per_device_eval_batch_size`` (old spelling ``--batch_size``; help ``batch_help``) and ``--streaming`` (off)."""
    parser.add_argument("--per_device_eval_batch_size", "--batch_size", dest="per_device_eval_batch_size", type=int,
                        default=64, help=batch_help + deprecated_spelling("--batch_size"))
    add_boolean_flag(parser, "streaming", False,
                     "Stream the dataset instead of downloading and converting it first (a large Hub dataset). Off by "
                     "default, unlike dino-hf-train: every image of the split is read anyway, and an indexed split gives "
                     "the seeded --max_*_samples subsets an unbiased draw even from a class-sorted folder.")


def load_model_backbone(args: argparse.Namespace, *, attention: bool = False) -> nn.Module:
    """The ``--which`` backbone of ``--model_name_or_path`` at ``--model_revision`` (flags of :func:`add_model_arguments`),
    of any family dino_hf trains (or another ``AutoModel`` backbone).

    Args:
        args: the parsed arguments.
        attention: the command draws attention maps: a backbone without self-attention (a ConvNet) is refused
            before its weights load, and the backbone is loaded with the eager attention, which returns them.
    Raises:
        ValueError: one sentence naming ``--which`` or ``--model_name_or_path`` (a path or id that holds
            no model, transformers' ``OSError`` included; a ConvNet given to an attention command).
    """
    try:
        if attention:
            _check_attention(args, backbone_config_of(args.model_name_or_path, args.which, args.model_revision))
        backbone = load_backbone(args.model_name_or_path, attn_implementation="eager" if attention else None,
                                 revision=args.model_revision, which=args.which)
    except (OSError, ValueError, KeyError) as error:
        message = first_line(error)
        if "--which" in message or "--model_name_or_path" in message:
            raise ValueError(message) from None
        raise ValueError(f"--model_name_or_path {args.model_name_or_path!r} is not a loadable backbone, run folder "
                         f"or Hub id ({message})") from None
    return backbone


def _check_attention(args: argparse.Namespace, config) -> None:
    """``ValueError`` (one sentence) for a backbone of a family without self-attention maps."""
    if config.model_type not in SUPPORTED_MODEL_TYPES:
        return  # another AutoModel: its forward says whether it returns attentions
    family = family_of(config)
    if not family.has_attention:
        with_attention = ", ".join(family_of(t).name_of(t) for t in SUPPORTED_MODEL_TYPES if family_of(t).has_attention)
        raise ValueError(
            f"--model_name_or_path {args.model_name_or_path!r} is a {family.name_of(config.model_type)} backbone "
            f"({family.usage(config).model_class}), which has no self-attention to draw: attention maps need one of "
            f"{with_attention}"
        )

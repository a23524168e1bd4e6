"""The frozen teacher of a distillation run (``--distillation_teacher``): loaded, identified and checked on resume.

The teacher is any backbone the tools load (:func:`dino_hf.eval.loading.load_backbone`: a Hub id, a backbone
folder, a run's ``--output_dir``, a ``DinoForPreTraining`` folder, whose teacher network is taken), with its own
image processor. It is not part of the trained model: it is never in a checkpoint, so a run records where it
came from and the SHA-256 of its weights (``training_args.json``), and a resumed run whose teacher changed
on disk is refused before it trains a step.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import torch

from dino_hf.base.run_folder import TEACHER_HASH_KEY
from dino_hf.data.streaming import looks_like_local_path
from dino_hf.eval.loading import load_backbone, load_image_processor
from dino_hf.models.configuration_dino import DinoConfig
from dino_hf.models.distillation import FrozenTeacher, weights_sha256
from dino_hf.train.arguments import DinoTrainingArguments

logger = logging.getLogger(__name__)

__all__ = ["attach_distillation_teacher", "check_resumed_teacher", "describe_teacher",
           "load_distillation_teacher", "open_distillation_teacher"]



def load_distillation_teacher(name_or_path: str, revision: str | None) -> tuple[FrozenTeacher, str]:
    """The frozen teacher ``--distillation_teacher`` names (on the CPU; :meth:`FrozenTeacher.enable_dense` once
    the model says the dense term is on), and the SHA-256 of its weights.

    Args:
        name_or_path: a Hub id, a backbone folder, a run's ``--output_dir`` or a ``DinoForPreTraining`` folder.
        revision: ``--distillation_teacher_revision``.
    Raises:
        ValueError: one sentence naming ``--distillation_teacher`` (a local path that does not exist, nothing
            loadable there).
    """
    if looks_like_local_path(name_or_path) and not os.path.exists(os.path.expanduser(name_or_path)):
        raise ValueError(f"--distillation_teacher {name_or_path} does not exist (a local path, so it is not looked up "
                         "on the Hub): pass an exported backbone folder, a run's --output_dir, a DinoForPreTraining "
                         "folder or a Hub id.")
    try:
        backbone = load_backbone(name_or_path, revision=revision, which="teacher")
        processor = load_image_processor(name_or_path, backbone.config, revision=revision)
        teacher = FrozenTeacher(backbone, processor.to_dict())
    except (OSError, ValueError, KeyError) as error:
        message = str(error).strip().rstrip(".")
        if "--distillation" in message:
            raise ValueError(message + ".") from None
        raise ValueError(f"--distillation_teacher {name_or_path!r}: {message}.") from None
    return teacher, weights_sha256(teacher.backbone)


def check_resumed_teacher(recorded: dict[str, Any], name_or_path: str, sha256: str) -> None:
    """Refuse to resume a distillation run whose teacher is not the one it started with.

    Args:
        recorded: the run's ``training_args.json`` ({} when it has none).
        name_or_path, sha256: the teacher this run loaded and its weights' hash.
    Raises:
        ValueError: the recorded hash differs (one sentence), or the run started without a teacher.
    """
    if not recorded:
        return
    before = recorded.get(TEACHER_HASH_KEY)
    if before is None:
        raise ValueError(f"--distillation_teacher {name_or_path!r}: the run being resumed was started without a "
                         "distillation teacher; resume it without the flag, or start a new run.")
    if before != sha256:
        raise ValueError(
            f"--distillation_teacher {name_or_path!r} is not the teacher this run started with (its weights' SHA-256 "
            f"is {sha256[:12]}..., the run recorded {before[:12]}...): resume with the same teacher, or start a new "
            "run with --overwrite_output_dir."
        )


_PRECISION_NAMES = {"no": "fp32", "bf16": "bf16 autocast", "fp16": "fp16 autocast"}


def describe_teacher(teacher: FrozenTeacher, name_or_path: str, config: DinoConfig, precision: str) -> str:
    """The log line that says what is distilled, how and at what cost."""
    weights = {name: value for name, value in config.distillation_loss_settings.items()
               if name.endswith("_weight") and value}
    terms = ", ".join(f"{name.removesuffix('_weight')} {value:g}" for name, value in weights.items())
    height, width = teacher.input_size
    return (f"Distilling the frozen {teacher.family.name_of(teacher.backbone.config.model_type)} "
            f"{name_or_path} ({type(teacher.backbone).__name__}, width {teacher.embedding_size}, its own processor: "
            f"{height} x {width} px; {_PRECISION_NAMES.get(precision, precision)}): terms {terms}; DINO's own term weight "
            f"{config.dino_loss_weight:g}.")


def open_distillation_teacher(args: DinoTrainingArguments, resumed: bool,
                              recorded: dict[str, Any]) -> tuple[FrozenTeacher | None, dict[str, str]]:
    """The run's frozen teacher (``None`` without ``--distillation_teacher``) and the facts ``training_args.json``
    records of it; a resumed run (``recorded``: its ``training_args.json``) is refused if the teacher changed."""
    if not args.distillation_teacher:
        return None, {}
    teacher, sha256 = load_distillation_teacher(args.distillation_teacher, args.distillation_teacher_revision)
    if resumed:
        check_resumed_teacher(recorded, args.distillation_teacher, sha256)
    return teacher, {TEACHER_HASH_KEY: sha256}


def attach_distillation_teacher(teacher: FrozenTeacher, config: DinoConfig, device: torch.device,
                                args: DinoTrainingArguments, precision: str) -> FrozenTeacher:
    """``teacher`` ready for the model built for it: its patch tokens on when the dense term has a weight, on the
    training device (frozen, eval mode), and the log lines that say what is distilled (and that local crops go
    unused without DINO's own term)."""
    if config.distillation_dense_weight > 0:
        teacher.enable_dense()
    teacher.to(device)
    logger.info(describe_teacher(teacher, args.distillation_teacher, config, precision))
    if not config.self_distils and args.num_local_crops > 0:
        logger.info("Without DINO's own term (--dino_loss_weight 0) nothing uses the %d local crops of each image: "
                    "--num_local_crops 0 saves making them.", args.num_local_crops)
    return teacher

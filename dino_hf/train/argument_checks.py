"""The rules of :class:`~dino_hf.train.arguments.DinoTrainingArguments`, checked once when the arguments are
built: each broken rule is one ``ValueError`` sentence that names the flag and says what to pass.

Separate from the field declarations so that each stays readable; ``DinoTrainingArguments.__post_init__``
calls :func:`check_training_arguments` and nothing else validates the arguments again.
"""

from __future__ import annotations

import math
from typing import Any

from dino_hf.losses.validation import check_positive_number
from dino_hf.models.configuration_dino import TRAINING_FLAG_FIELDS, check_settings
from dino_hf.train.trackers import parse_report_to

__all__ = ["check_training_arguments"]


def check_training_arguments(args: Any) -> None:
    """Check every rule of ``args`` (a ``DinoTrainingArguments``, not imported here: it calls this) and normalise the values given as text (``report_to``, the
    ``auto``-or-count flags) in place of the frozen dataclass.

    Raises:
        ValueError: one sentence naming the flag.
    """
    for name, allowed in (
        ("clip_mode", ("per_parameter", "global")),
        ("mixed_precision", ("auto", "no", "bf16", "fp16")),
        ("hub_strategy", ("end", "checkpoint")),
        ("augmentation_device", ("loader", "cpu", "cuda")),
        ("optimizer", ("adamw", "sgd", "lars")),
    ):
        value = getattr(args, name)
        _check(value in allowed, f"--{name} must be one of {', '.join(allowed)}, not {value!r}.")

    object.__setattr__(args, "report_to", parse_report_to(args.report_to) or ["none"])
    _check(bool(args.eval_k) and min(args.eval_k) >= 1, f"--eval_k must be positive integers, not {args.eval_k}.")
    _check(math.isfinite(args.grad_norm_spike_factor) and args.grad_norm_spike_factor >= 0,
           f"--grad_norm_spike_factor must be 0 or more, not {args.grad_norm_spike_factor}.")
    _check(bool(args.output_dir), "--output_dir is required: pass the folder where the run is written.")

    for name in ("per_device_train_batch_size", "gradient_accumulation_steps", "shuffle_buffer_size",
                 "global_crop_size", "local_crop_size", "checkpointing_steps", "logging_steps",
                 "max_consecutive_nonfinite_steps", "collapse_warning_steps"):
        value = getattr(args, name)
        _check(value >= 1, f"--{name} must be a positive integer, not {value}.")
    _check(args.num_local_crops >= 0, f"--num_local_crops must be 0 or more, not {args.num_local_crops}.")
    # "auto" or a count; stored as written ("auto" / "3"), read through requested_num_workers.
    object.__setattr__(args, "dataloader_num_workers", _auto_or_count("dataloader_num_workers", args.dataloader_num_workers, 0))
    object.__setattr__(args, "torch_num_threads", _auto_or_count("torch_num_threads", args.torch_num_threads, 1))
    _check(
        args.checkpoints_total_limit is None or args.checkpoints_total_limit >= 0,
        f"--checkpoints_total_limit must be 0 (keep all) or more, not {args.checkpoints_total_limit}.",
    )
    for name in ("max_steps", "eval_steps", "eval_max_samples"):
        value = getattr(args, name)
        _check(value is None or value >= 1, f"--{name} must be a positive integer (or unset), not {value}.")
    for name in ("warmup_steps", "warmup_teacher_temperature_steps", "freeze_last_layer_steps",
                 "freeze_backbone_steps"):
        value = getattr(args, name)
        _check(value is None or value >= 0, f"--{name} must be 0 or more (or unset), not {value}.")
    _check(
        args.freeze_backbone_epochs is None or (math.isfinite(args.freeze_backbone_epochs)
                                                and args.freeze_backbone_epochs >= 0),
        f"--freeze_backbone_epochs must be 0 or more (or unset), not {args.freeze_backbone_epochs}.",
    )
    _check(
        args.backbone_learning_rate_scale is None or 0.0 <= args.backbone_learning_rate_scale <= 10.0,
        f"--backbone_learning_rate_scale must be between 0 and 10, not {args.backbone_learning_rate_scale}.",
    )
    _check(
        0.0 < args.layerwise_learning_rate_decay <= 1.0,
        f"--layerwise_learning_rate_decay must be in (0, 1], not {args.layerwise_learning_rate_decay}.",
    )
    for name in ("warmup_epochs", "warmup_teacher_temperature_epochs", "freeze_last_layer_epochs",
                 "min_learning_rate", "weight_decay", "weight_decay_end", "max_grad_norm"):
        value = getattr(args, name)
        _check(math.isfinite(value) and value >= 0, f"--{name} must be 0 or more, not {value}.")
    _check(math.isfinite(args.base_learning_rate) and args.base_learning_rate > 0,
           f"--base_learning_rate must be greater than 0, not {args.base_learning_rate}.")
    _check(args.learning_rate is None or (math.isfinite(args.learning_rate) and args.learning_rate > 0),
           f"--learning_rate must be greater than 0 (or unset), not {args.learning_rate}.")
    for name in ("teacher_temperature", "warmup_teacher_temperature"):
        check_positive_number(f"--{name}", getattr(args, name))  # the loss's own rule
    for name in ("num_train_epochs", "max_train_minutes"):
        value = getattr(args, name)
        _check(value is None or (math.isfinite(value) and value > 0), f"--{name} must be greater than 0, not {value}.")
    if args.max_train_minutes is not None:
        for name in ("max_steps", "num_train_epochs"):
            _check(
                getattr(args, name) is None,
                f"--max_train_minutes and --{name} both set the length of the run: pass only one of them.",
            )
    _check(
        0.0 <= args.teacher_momentum <= 1.0,
        f"--teacher_momentum must be between 0 and 1, not {args.teacher_momentum}.",
    )
    # the model-setting flags follow DinoConfig's own rules (one validation, flag-named messages)
    check_settings({name: getattr(args, name) for name in TRAINING_FLAG_FIELDS
                    if getattr(args, name) is not None}, "--{}")
    ratios = list(args.mask_ratio_min_max)
    _check(
        len(ratios) == 2 and all(math.isfinite(value) for value in ratios) and 0.0 <= ratios[0] <= ratios[1] <= 1.0,
        f"--mask_ratio_min_max must be two numbers 0 <= min <= max <= 1, not {ratios}.",
    )
    _check(
        math.isfinite(args.mask_sample_probability) and 0.0 <= args.mask_sample_probability <= 1.0,
        f"--mask_sample_probability must be between 0 and 1, not {args.mask_sample_probability}.",
    )
    for name in ("color_jitter_probability", "grayscale_probability", "solarize_probability"):
        value = getattr(args, name)
        _check(0.0 <= value <= 1.0, f"--{name} must be between 0 and 1, not {value}.")
    _check(
        0.0 <= args.color_jitter_strength <= 5.0,
        f"--color_jitter_strength must be between 0 and 5, not {args.color_jitter_strength}.",
    )
    _check(
        0.0 <= args.blur_probability_scale <= 10.0,
        f"--blur_probability_scale must be between 0 and 10, not {args.blur_probability_scale}.",
    )
    if args.augmentation_working_size is not None:
        _check(
            args.augmentation_device != "loader",
            "--augmentation_working_size only applies with --augmentation_device cpu or cuda: drop it or "
            "choose one of those.",
        )
        _check(
            args.augmentation_working_size >= 2,
            f"--augmentation_working_size must be at least 2 pixels, not {args.augmentation_working_size}.",
        )
    _check(
        len(args.blur_sigma) == 2 and 0.0 < args.blur_sigma[0] <= args.blur_sigma[1],
        f"--blur_sigma must be two numbers 0 < min <= max, not {list(args.blur_sigma)}.",
    )
    _check(
        args.local_crop_size <= args.global_crop_size,
        f"--local_crop_size ({args.local_crop_size}) must not exceed --global_crop_size "
        f"({args.global_crop_size}).",
    )
    for name in ("global_crop_scale", "local_crop_scale"):
        scale = list(getattr(args, name))
        _check(
            len(scale) == 2 and 0.0 < scale[0] <= scale[1] <= 1.0,
            f"--{name} must be two numbers 0 < min <= max <= 1, not {scale}.",
        )
    _check(
        not args.push_to_hub or bool(args.hub_model_id),
        "--push_to_hub needs --hub_model_id user/name to know where to push.",
    )
    _check(
        args.resume_from_checkpoint is None or not args.overwrite_output_dir,
        "--overwrite_output_dir deletes the checkpoints that --resume_from_checkpoint would use; pass only one.",
    )


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise ValueError(message)


def _auto_or_count(name: str, value: object, minimum: int) -> str:
    """``"auto"`` or a whole number >= ``minimum`` (given as a number or its text), as text."""
    text = str(value).strip().lower()
    _check(
        text == "auto" or (text.isdigit() and int(text) >= minimum),
        f"--{name} must be auto or a whole number of {minimum} or more, not {value!r}.",
    )
    return "auto" if text == "auto" else str(int(text))

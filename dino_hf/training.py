"""The Accelerate-driven DINO training loop.

`train(args)` builds the model, data stream, optimiser and schedules from `DinoTrainingArguments`,
then runs optimiser steps until the planned total. The pieces are small and separately testable:

- `build_*` functions turn arguments into objects (each raises `ValueError` with one sentence
  naming the flag on bad input);
- `DinoTrainStep` runs one optimiser step (micro-steps with gradient accumulation, clipping,
  AdamW, teacher EMA, center update) without reading anything back to the host;
- `BatchStream` turns the finite data loader into an endless, resumable stream of micro-batches;
- `MetricsAccumulator` / `MetricsLog` / `CollapseMonitor` handle logging (the only host syncs);
- `save_checkpoint` / `load_checkpoint` write and read atomic, resumable checkpoints;
- `StopSignals` turns SIGTERM/SIGINT into "checkpoint now and exit".

Non-finite steps are skipped on the device, without a host sync: the step's gradient norm (taken
after the gradients were all-reduced, so identical on every process) decides; a non-finite loss is
made to poison the gradients so that it always shows in that norm. The fused AdamW kernel skips its
update when told through `found_inf` (the mechanism `GradScaler` uses), the center update is undone
with `torch.where`, and the teacher EMA momentum becomes 1. The consecutive-failure counter lives on
the device and is read at logging and checkpoint steps, where the loop synchronises anyway.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import pickle
import shutil
import signal
import sys
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from .training_args import DinoTrainingArguments, StepPlan, plan_steps

logger = logging.getLogger(__name__)

CHECKPOINTS_DIRNAME = "checkpoints"
CHECKPOINT_PREFIX = "step_"
TEMPORARY_PREFIX = ".tmp-"
COMPLETE_MARKER = "checkpoint_complete.json"
TRAINING_STATE_NAME = "training_state.json"
METRICS_NAME = "metrics.jsonl"
TRAINING_ARGS_NAME = "training_args.json"
BACKBONE_DIRNAME = "backbone"

__all__ = [
    "BatchStream",
    "CollapseMonitor",
    "DinoTrainStep",
    "MetricsAccumulator",
    "NonFiniteLossError",
    "StepStatistics",
    "TrainingResult",
    "apply_config_overrides",
    "build_accelerator",
    "build_augmentation",
    "build_model",
    "build_model_config",
    "build_optimizer",
    "build_schedules",
    "list_checkpoints",
    "load_checkpoint",
    "resolve_resume_checkpoint",
    "save_checkpoint",
    "train",
]


class NonFiniteLossError(RuntimeError):
    """Raised when too many consecutive optimiser steps had a non-finite loss or gradient."""


@dataclass
class TrainingResult:
    """What `train` returns (on every process)."""

    model: Any  # the unwrapped DinoForPreTraining
    step: int
    output_dir: Path
    interrupted_by: str | None = None  # "SIGTERM" / "SIGINT" when stopped by a signal
    checkpoint: Path | None = None  # the checkpoint written when interrupted
    last_metrics: dict[str, Any] = field(default_factory=dict)

    @property
    def exit_status(self) -> int:
        """0 when finished; 128 + signal number when stopped by a signal (shell convention)."""
        if self.interrupted_by is None:
            return 0
        return 128 + int(getattr(signal, self.interrupted_by))


# =============================================================================================
# Building blocks from arguments
# =============================================================================================
def apply_config_overrides(config: Any, overrides: str | None, flag: str = "--config_overrides") -> None:
    """Apply ``"key=value,section.key=value"`` to a (nested) ``PreTrainedConfig`` in place.

    Values are converted to the type of the current value (bool: true/false; int; float; str).
    Raises:
        ValueError: one sentence naming ``flag`` for a malformed item, an unknown key or a bad value.
    """
    if not overrides:
        return
    for item in overrides.split(","):
        item = item.strip()
        if not item:
            continue
        key, separator, raw_value = item.partition("=")
        key, raw_value = key.strip(), raw_value.strip()
        if not separator or not key:
            raise ValueError(f"{flag} item {item!r} is not of the form key=value.")
        *sections, leaf = key.split(".")
        target = config
        for section in sections:
            target = getattr(target, section, None)
            if target is None or not hasattr(target, "to_dict"):
                raise ValueError(f"{flag} key {key!r} does not name a field of the model config.")
        if not hasattr(target, leaf) or leaf.startswith("_"):
            raise ValueError(f"{flag} key {key!r} does not name a field of the model config.")
        value = _convert_override(raw_value, getattr(target, leaf), key, flag)
        try:
            setattr(target, leaf, value)
        except (TypeError, ValueError) as error:
            raise ValueError(f"{flag} value {raw_value!r} is not valid for {key!r} ({error}).") from None


def _convert_override(raw_value: str, current: Any, key: str, flag: str) -> Any:
    lowered = raw_value.lower()
    try:
        if isinstance(current, bool):
            if lowered not in ("true", "false", "1", "0"):
                raise ValueError
            return lowered in ("true", "1")
        if isinstance(current, int):
            try:
                return int(raw_value)
            except ValueError:
                return float(raw_value)
        if isinstance(current, float):
            return float(raw_value)
        if current is None:
            if lowered in ("none", "null"):
                return None
            for convert in (int, float):
                with contextlib.suppress(ValueError):
                    return convert(raw_value)
            return {"true": True, "false": False}.get(lowered, raw_value)
        if isinstance(current, str):
            return raw_value
    except ValueError:
        raise ValueError(
            f"{flag} value {raw_value!r} for {key!r} is not a valid {type(current).__name__}."
        ) from None
    raise ValueError(f"{flag} cannot set {key!r}: its value is a {type(current).__name__}, not a number or string.")


def build_model_config(args: DinoTrainingArguments) -> Any:
    """`DinoConfig` from ``--model_config`` (preset name, folder or JSON) plus overrides."""
    from .configuration_dino import DinoConfig

    name = args.model_config
    if name in DinoConfig.preset_names():
        config = DinoConfig.from_preset(name)
    elif os.path.isdir(name) and os.path.isfile(os.path.join(name, "config.json")):
        config = DinoConfig.from_pretrained(name)
    elif os.path.isfile(name) and name.endswith(".json"):
        config = DinoConfig.from_json_file(name)
    else:
        raise ValueError(
            f"--model_config {name!r} is neither a preset ({', '.join(DinoConfig.preset_names())}) nor a "
            "folder or JSON file written by DinoConfig.save_pretrained."
        )
    _apply_loss_settings(config, args)
    return config


def _apply_loss_settings(config: Any, args: DinoTrainingArguments) -> None:
    """``--config_overrides`` then ``--student_temperature`` / ``--center_momentum`` into ``config``."""
    apply_config_overrides(config, args.config_overrides)
    if args.student_temperature is not None:
        config.student_temperature = args.student_temperature
    if args.center_momentum is not None:
        config.center_momentum = args.center_momentum


def _checkpoint_model_type(path: str) -> str:
    """``model_type`` of a local folder or Hub id (``"vit"`` for an exported backbone)."""
    config_file = os.path.join(path, "config.json")
    if os.path.isdir(path):
        if not os.path.isfile(config_file):
            raise ValueError(f"--model_name_or_path {path} holds no config.json: pass a folder written by save_pretrained.")
        with open(config_file, encoding="utf-8") as handle:
            return str(json.load(handle).get("model_type", ""))
    if os.path.exists(path):
        raise ValueError(f"--model_name_or_path {path} is a file: pass a folder written by save_pretrained or a Hub id.")
    from transformers import AutoConfig

    try:
        return str(AutoConfig.from_pretrained(path).model_type)
    except (OSError, ValueError):
        raise ValueError(
            f"--model_name_or_path {path} is neither a local folder nor a reachable Hub model id."
        ) from None


def build_model(args: DinoTrainingArguments) -> Any:
    """The `DinoForPreTraining` to train: fresh, from a DINO checkpoint or from a ViT backbone.

    A fresh backbone gets ``image_size = --global_crop_size`` unless the overrides set it; crop
    sizes must be multiples of the patch size.
    """
    from .configuration_dino import DinoConfig
    from .modeling_dino import DinoForPreTraining

    try:
        if args.model_name_or_path is None:
            config = build_model_config(args)
            if "backbone_config.image_size" not in (args.config_overrides or ""):
                config.backbone_config.image_size = args.global_crop_size
            _check_crop_sizes(args, config.backbone_config.patch_size)
            model = DinoForPreTraining(config)
        else:
            model_type = _checkpoint_model_type(args.model_name_or_path)
            if model_type == "vit":
                model = DinoForPreTraining.from_backbone(args.model_name_or_path, config=build_model_config(args))
            elif model_type == DinoConfig.model_type:
                config = DinoConfig.from_pretrained(args.model_name_or_path)
                _apply_loss_settings(config, args)
                model = DinoForPreTraining.from_pretrained(args.model_name_or_path, config=config)
            else:
                raise ValueError(
                    f"--model_name_or_path {args.model_name_or_path} holds a {model_type!r} model: pass a "
                    "DinoForPreTraining folder or an exported ViT backbone."
                )
            _check_crop_sizes(args, model.config.backbone_config.patch_size)
    except ValueError as error:
        message = str(error)
        if "--" not in message:
            message = f"--model_config/--config_overrides describe an impossible model: {message}"
        raise ValueError(message) from None
    if args.activation_checkpointing:
        model.student.backbone.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    if args.mixed_precision == "bf16" and _cpu_only():
        # Measured with benchmarks/bench_train_step.py (torch 2.14, CPU): the SDPA backward in bf16 is
        # slow on the CPU, and eager attention makes the whole step ~1.4x faster. Not saved in exports.
        for network in (model.student, model.teacher):
            network.backbone.set_attn_implementation("eager")
    return model


def _check_crop_sizes(args: DinoTrainingArguments, patch_size: Any) -> None:
    patch = patch_size[0] if isinstance(patch_size, (list, tuple)) else int(patch_size)
    for name in ("global_crop_size", "local_crop_size"):
        size = getattr(args, name)
        if size % patch != 0:
            raise ValueError(f"--{name} {size} is not a multiple of the backbone's patch size {patch}.")


def build_augmentation(args: DinoTrainingArguments) -> Any:
    """`MultiCropAugmentation` for the crop and augmentation flags."""
    from .augmentation import MultiCropAugmentation

    strength = args.color_jitter_strength
    blur_scale = args.blur_probability_scale
    return MultiCropAugmentation(
        global_crop_size=args.global_crop_size,
        local_crop_size=args.local_crop_size,
        num_local_crops=args.num_local_crops,
        global_crop_scale=tuple(args.global_crop_scale),
        local_crop_scale=tuple(args.local_crop_scale),
        color_jitter_probability=args.color_jitter_probability,
        brightness=0.4 * strength,
        contrast=0.4 * strength,
        saturation=0.2 * strength,
        hue=min(0.1 * strength, 0.5),
        grayscale_probability=args.grayscale_probability,
        global_blur_probabilities=(min(1.0, 1.0 * blur_scale), min(1.0, 0.1 * blur_scale)),
        local_blur_probability=min(1.0, 0.5 * blur_scale),
        blur_sigma=tuple(args.blur_sigma),
        global_solarize_probabilities=(0.0, args.solarize_probability),
    )


def augmentation_working_size(args: DinoTrainingArguments) -> int:
    """Longer side of the decoded images with on-device augmentation (default twice the global crop).

    Twice, because the longer side is what is fitted: a 4:3 photo then keeps a shorter side of 1.5x
    the global crop, so even a full-scale global crop is cut at a higher resolution than it is shown.
    """
    if args.augmentation_working_size is not None:
        return args.augmentation_working_size
    return 2 * args.global_crop_size


def build_device_augmentation(args: DinoTrainingArguments, device: torch.device, process_index: int) -> Any:
    """`DeviceMultiCrop` for ``--augmentation_device cpu|cuda`` (``None`` for ``loader``).

    The batched pipeline copies every recipe field of `build_augmentation`'s per-image one, so both
    devices train with the same distributions. Its generator is seeded per process.
    """
    if args.augmentation_device == "loader":
        return None
    from .batched_augmentation import BatchedMultiCropAugmentation, DeviceMultiCrop
    from .data import mix_seeds

    if args.augmentation_device == "cuda":
        if device.type != "cuda":
            raise ValueError(
                f"--augmentation_device cuda needs training on a CUDA GPU, but this run trains on {device.type}: "
                "use --augmentation_device loader or cpu."
            )
        target = device
    else:
        target = torch.device("cpu")
    batched = BatchedMultiCropAugmentation.from_augmentation(build_augmentation(args))
    return DeviceMultiCrop(batched, target, seed=mix_seeds(args.seed, process_index, 0xA06),
                           working_size=augmentation_working_size(args))


def build_dataloader(args: DinoTrainingArguments, augmentation: Any, process_index: int, num_processes: int) -> Any:
    """This process's shard of the training data (`DinoDataLoader`, CPU tensors).

    With ``--augmentation_device cpu|cuda`` the loader only decodes (``augmentation`` is not used).
    """
    from .data import create_train_dataloader

    on_loader = args.augmentation_device == "loader"
    return create_train_dataloader(
        args.dataset_name,
        augmentation=augmentation if on_loader else None,
        working_size=None if on_loader else augmentation_working_size(args),
        pin_memory=args.augmentation_device == "cuda",
        batch_size=args.per_device_train_batch_size,
        dataset_config_name=args.dataset_config_name,
        split=args.train_split,
        image_column=args.image_column,
        streaming=args.streaming,
        num_workers=args.dataloader_num_workers,
        shuffle_buffer_size=args.shuffle_buffer_size,
        seed=args.seed,
        process_index=process_index,
        num_processes=num_processes,
    )


def _open_training_data(args: DinoTrainingArguments, accelerator: Any) -> Any:
    """`build_dataloader`, with library errors that name no flag attributed to the data flags."""
    try:
        return build_dataloader(args, build_augmentation(args), accelerator.process_index, accelerator.num_processes)
    except (ValueError, KeyError) as error:
        message = str(error).strip("'\"")
        if "--" in message:
            raise
        raise ValueError(
            f"--dataset_name {args.dataset_name} (split --train_split {args.train_split}) could not be opened: {message}"
        ) from None


def _trackers(report_to: str) -> list[str] | None:
    from accelerate.utils import is_tensorboard_available, is_wandb_available

    names = {"none": [], "tensorboard": ["tensorboard"], "wandb": ["wandb"], "all": ["tensorboard", "wandb"]}[report_to]
    for name, available in (("tensorboard", is_tensorboard_available), ("wandb", is_wandb_available)):
        if name in names and not available():
            raise ValueError(f"--report_to {report_to} needs the {name} package (pip install {name}), or pass --report_to none.")
    return names or None


def _cpu_only() -> bool:
    forced = os.environ.get("ACCELERATE_USE_CPU", "false").lower() in ("1", "true", "yes")
    return forced or not torch.cuda.is_available()


def build_accelerator(args: DinoTrainingArguments) -> Any:
    """`Accelerator` with the requested precision and trackers (fp16 refused without a CUDA GPU)."""
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs

    if args.mixed_precision == "fp16" and _cpu_only():
        raise ValueError(
            "--mixed_precision fp16 needs a CUDA GPU (on the CPU it would silently do nothing); use --mixed_precision bf16."
        )
    # Buffers need no broadcast: the center is all-reduced by DinoLoss.update_center, and the
    # teacher (inside the wrapped module) is kept identical by identical EMA updates.
    ddp_kwargs = DistributedDataParallelKwargs(broadcast_buffers=False)
    return Accelerator(
        mixed_precision=args.mixed_precision,
        log_with=_trackers(args.report_to),
        project_dir=args.output_dir,
        step_scheduler_with_optimizer=False,
        kwargs_handlers=[ddp_kwargs],
    )


def build_optimizer(model: Any, device: torch.device) -> torch.optim.Optimizer:
    """AdamW over the student's parameter groups; fused where supported, so that a non-finite step
    can be skipped on the device (``found_inf``). Learning rate and weight decay are set each step."""
    from torch.utils._foreach_utils import _get_fused_kernels_supported_devices

    groups = model.get_parameter_groups(weight_decay=0.0)
    groups = [group for group in groups if group["params"]]
    fused = device.type in _get_fused_kernels_supported_devices()
    return torch.optim.AdamW(groups, lr=0.0, betas=(0.9, 0.999), fused=fused, foreach=None if fused else True)


def build_schedules(args: DinoTrainingArguments, plan: StepPlan) -> Any:
    """`DinoSchedules` from the arguments and the step plan (all step counts resolved)."""
    from .schedules import DinoSchedules

    return DinoSchedules(
        total_steps=plan.total_steps,
        learning_rate=plan.learning_rate,
        min_learning_rate=args.min_learning_rate,
        warmup_steps=plan.warmup_steps,
        weight_decay=args.weight_decay,
        weight_decay_end=args.weight_decay_end,
        teacher_momentum=args.teacher_momentum,
        teacher_temperature=args.teacher_temperature,
        warmup_teacher_temperature=args.warmup_teacher_temperature,
        warmup_teacher_temperature_steps=plan.warmup_teacher_temperature_steps,
        freeze_last_layer_steps=plan.freeze_last_layer_steps,
    )


# =============================================================================================
# One optimiser step
# =============================================================================================
@dataclass
class StepStatistics:
    """Device tensors (0-dim) of one optimiser step; nothing here has been read by the host."""

    loss: Tensor  # mean over micro-steps of this process's loss
    teacher_entropy: Tensor
    teacher_mean_entropy: Tensor
    grad_norm: Tensor  # global L2 norm of the (all-reduced, unscaled) gradients before clipping
    finite: Tensor  # bool: the step was applied (identical on every process)


class DinoTrainStep:
    """Runs optimiser steps: micro-step forward/backward, clipping, AdamW, EMA and center update.

    Args:
        accelerator: the run's `Accelerator`.
        model: the prepared (possibly DDP-wrapped) `DinoForPreTraining`.
        optimizer: the prepared AdamW (fused where the device supports it).
        gradient_accumulation_steps: micro-steps per optimiser step.
        max_grad_norm: clipping threshold (0 disables clipping).
        clip_mode: ``"per_parameter"`` (official) or ``"global"``.
    """

    def __init__(self, accelerator: Any, model: torch.nn.Module, optimizer: Any,
                 gradient_accumulation_steps: int = 1, max_grad_norm: float = 3.0,
                 clip_mode: str = "per_parameter") -> None:
        self.accelerator = accelerator
        self.model = model
        self.optimizer = optimizer
        self.unwrapped = accelerator.unwrap_model(model)
        self.gradient_accumulation_steps = gradient_accumulation_steps
        self.max_grad_norm = max_grad_norm
        self.clip_mode = clip_mode
        self.parameters = [p for group in optimizer.param_groups for p in group["params"]]
        inner = getattr(optimizer, "optimizer", optimizer)
        self._inner_optimizer = inner
        self._skips_on_device = bool(inner.defaults.get("fused"))
        self._uses_scaler = getattr(accelerator, "scaler", None) is not None

    def __call__(self, next_batch: Callable[[], dict[str, Tensor | None]], values: Any) -> StepStatistics:
        """One optimiser step with the schedule ``values`` (a `ScheduleValues`)."""
        loss_sum, statistics_sum, center_sum = self._accumulate_gradients(next_batch, values.teacher_temperature)
        scale = 1.0 / self.gradient_accumulation_steps
        grad_norm, finite = self._prepare_gradients(values.freeze_last_layer)
        self._optimizer_step(values, finite)
        self._update_teacher(values.teacher_momentum, finite)
        self._update_center(center_sum * scale, finite)
        return StepStatistics(
            loss=loss_sum * scale,
            teacher_entropy=statistics_sum[0] * scale,
            teacher_mean_entropy=statistics_sum[1] * scale,
            grad_norm=grad_norm,
            finite=finite,
        )

    def _accumulate_gradients(self, next_batch: Callable[[], dict[str, Tensor | None]],
                              teacher_temperature: float) -> tuple[Tensor, Tensor, Tensor]:
        """Forward/backward of every micro-step; gradients are all-reduced on the last one only."""
        device = self.accelerator.device
        loss_sum = statistics_sum = center_sum = None
        for index in range(self.gradient_accumulation_steps):
            batch = next_batch()
            global_crops = batch["global_crops"].to(device, non_blocking=True)
            local_crops = batch.get("local_crops")
            if local_crops is not None:
                local_crops = local_crops.to(device, non_blocking=True)
            last = index == self.gradient_accumulation_steps - 1
            with contextlib.nullcontext() if last else self.accelerator.no_sync(self.model):
                output = self.model(global_crops, local_crops, teacher_temperature=teacher_temperature,
                                    update_center=False)
                loss = output.loss
                # A non-finite loss must show in the all-reduced gradient norm on every process, even
                # when its gradient happens to be finite: scale the backward pass by NaN (else by 1).
                poison = torch.where(torch.isfinite(loss.detach()), 1.0, float("nan"))
                self.accelerator.backward(loss * poison / self.gradient_accumulation_steps)
            statistics = torch.stack([output.teacher_entropy.float(), output.teacher_mean_entropy.float()])
            detached = loss.detach().float()
            loss_sum = detached if loss_sum is None else loss_sum + detached
            statistics_sum = statistics if statistics_sum is None else statistics_sum + statistics
            mean = output.teacher_logits_mean.float()
            center_sum = mean if center_sum is None else center_sum + mean
        return loss_sum, statistics_sum, center_sum

    def _prepare_gradients(self, freeze_last_layer: bool) -> tuple[Tensor, Tensor]:
        """Unscale (fp16), drop frozen last-layer gradients, measure and clip; no host sync.

        Returns:
            (global gradient norm before clipping, bool "all gradients finite").
        """
        if self._uses_scaler:
            self.accelerator.unscale_gradients(self.optimizer)
        if freeze_last_layer:
            self.unwrapped.cancel_last_layer_gradients()
        gradients = [p.grad for p in self.parameters if p.grad is not None]
        if not gradients:
            zero = torch.zeros((), device=self.accelerator.device)
            return zero, torch.ones((), dtype=torch.bool, device=zero.device)
        norms = torch._foreach_norm(gradients)
        grad_norm = torch.linalg.vector_norm(torch.stack(norms).float())
        if self.max_grad_norm > 0:
            if self.clip_mode == "per_parameter":
                # Official DINO: each parameter's gradient clipped to max_grad_norm separately.
                coefficients = torch._foreach_add(norms, 1e-6)
                torch._foreach_reciprocal_(coefficients)
                torch._foreach_mul_(coefficients, self.max_grad_norm)
                torch._foreach_clamp_max_(coefficients, 1.0)
                torch._foreach_mul_(gradients, coefficients)
            else:
                coefficient = torch.clamp(self.max_grad_norm / (grad_norm + 1e-6), max=1.0)
                torch._foreach_mul_(gradients, coefficient.to(gradients[0].dtype))
        return grad_norm, torch.isfinite(grad_norm)

    def _optimizer_step(self, values: Any, finite: Tensor) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = values.learning_rate
            group["weight_decay"] = values.weight_decay if group.get("apply_weight_decay", True) else 0.0
        if self._uses_scaler:
            # GradScaler hands its own found_inf (from the unscale above) to the fused kernel.
            self.optimizer.step()
        elif self._skips_on_device:
            self._inner_optimizer.found_inf = (~finite).float()
            self.optimizer.step()
            del self._inner_optimizer.found_inf
        elif bool(finite):  # non-fused optimiser (unusual device): one host sync per step
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def _update_teacher(self, momentum: float, finite: Tensor) -> None:
        """EMA of the student into the teacher; momentum 1 (no change) on a skipped step."""
        if finite.device.type == "cpu":
            if bool(finite):  # reading a CPU tensor is not a device synchronisation
                self.unwrapped.update_teacher(momentum)
        else:
            self.unwrapped.update_teacher(torch.where(finite, momentum, 1.0))

    @torch.no_grad()
    def _update_center(self, teacher_logits_mean: Tensor, finite: Tensor) -> None:
        """Center EMA from the mean over micro-steps (all-reduced inside); undone on a skipped step."""
        loss_fn = self.unwrapped.loss_fn
        if getattr(loss_fn, "centering", "centering") != "centering":
            return
        previous = loss_fn.center.clone()
        loss_fn.update_center(teacher_logits_mean)
        loss_fn.center.copy_(torch.where(finite, loss_fn.center, previous))


# =============================================================================================
# Data stream
# =============================================================================================
class BatchStream:
    """Endless stream of micro-batches over epochs of a `DinoDataLoader`, with its wait time.

    ``augment`` (a `DeviceMultiCrop`, for a decode-only loader) turns each loader batch into crops on
    the training device; its time is not counted as waiting for data. ``state_dict`` gives the exact
    position (epoch, the loader's own state, the augmentation's generator) for checkpoints.
    """

    def __init__(self, loader: Any, flag: str = "--dataset_name", augment: Any = None) -> None:
        self.loader = loader
        self.augment = augment
        self.epoch = 0
        self.wait_seconds = 0.0
        self.micro_batches = 0
        self._flag = flag
        self._iterator: Iterator[dict[str, Any]] | None = None
        self._batches_this_epoch = 0
        self._empty_epochs = 0

    def start(self) -> None:
        """Create the iterator of the current epoch (call once, after `load_state_dict` if resuming)."""
        self.loader.set_epoch(self.epoch)
        with torch.random.fork_rng(devices=[]):
            self._iterator = iter(self.loader)
        self._batches_this_epoch = 0

    def __call__(self) -> dict[str, Any]:
        if self._iterator is None:
            self.start()
        started = time.perf_counter()
        while True:
            try:
                # The loader must not move the training's random streams (e.g. a DataLoader draws
                # its base seed from the global generator when an epoch's iterator starts): with
                # the CPU generator forked, a resumed run draws the same drop-path masks.
                with torch.random.fork_rng(devices=[]):
                    batch = next(self._iterator)
                break
            except StopIteration:
                self._empty_epochs = self._empty_epochs + 1 if self._batches_this_epoch == 0 else 0
                if self._empty_epochs >= 2:  # one empty pass is normal after resuming at an epoch's end
                    raise ValueError(
                        f"{self._flag} yielded no complete batch in a whole epoch: lower --per_device_train_batch_size."
                    ) from None
                self.epoch += 1
                self.start()
        self._batches_this_epoch += 1
        self.micro_batches += 1
        self.wait_seconds += time.perf_counter() - started
        return batch if self.augment is None else self.augment(batch)

    def state_dict(self) -> dict[str, Any]:
        state = {"epoch": self.epoch, "loader": self.loader.state_dict()}
        if self.augment is not None:
            state["augmentation"] = self.augment.state_dict()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if (self.augment is None) != ("augmentation" not in state):
            raise ValueError(
                "The checkpoint was written with a different --augmentation_device (loader versus cpu/cuda): "
                "resume with the setting it was trained with."
            )
        self.epoch = int(state["epoch"])
        self.loader.set_epoch(self.epoch)
        self.loader.load_state_dict(state["loader"])
        if self.augment is not None:
            self.augment.load_state_dict(state["augmentation"])


# =============================================================================================
# Metrics
# =============================================================================================
class MetricsAccumulator:
    """Sums step statistics on the device between logging steps; `flush` is the one host sync.

    Also tracks, on the device, the current and longest runs of consecutive skipped steps.
    """

    _KEYS = ("loss", "teacher_entropy", "teacher_mean_entropy", "grad_norm")

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.current_run = torch.zeros((), dtype=torch.long, device=device)
        self._reset()

    def _reset(self) -> None:
        self.sums = torch.zeros(len(self._KEYS), device=self.device)
        self.finite_steps = torch.zeros((), device=self.device)
        self.steps = 0
        self.longest_run = self.current_run.clone()

    def add(self, statistics: StepStatistics) -> None:
        values = torch.stack([getattr(statistics, key).float() for key in self._KEYS])
        finite = statistics.finite
        self.sums += torch.where(finite & torch.isfinite(values), values, torch.zeros_like(values))
        self.finite_steps += finite.float()
        self.steps += 1
        self.current_run = torch.where(finite, torch.zeros_like(self.current_run), self.current_run + 1)
        self.longest_run = torch.maximum(self.longest_run, self.current_run)

    def flush(self, accelerator: Any) -> dict[str, float]:
        """Means since the last flush over steps and processes; resets the sums."""
        packed = torch.cat([self.sums, self.finite_steps.reshape(1)])
        packed = accelerator.reduce(packed, reduction="sum") if accelerator.num_processes > 1 else packed
        values = packed.tolist()
        processes = accelerator.num_processes
        finite_steps = values[-1] / processes
        row: dict[str, float] = {}
        for index, key in enumerate(self._KEYS):
            row[key] = values[index] / max(values[-1], 1.0) if finite_steps > 0 else float("nan")
        row["nonfinite_steps"] = round(self.steps - finite_steps)
        row["longest_nonfinite_run"] = int(self.longest_run.item())
        self._reset()
        return row

    def state_dict(self) -> dict[str, Any]:
        """The sums since the last logging step (so that a resumed run logs the same rows)."""
        return {"sums": self.sums.cpu(), "finite_steps": self.finite_steps.cpu(), "steps": self.steps,
                "current_run": self.current_run.cpu(), "longest_run": self.longest_run.cpu()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.sums = state["sums"].to(self.device)
        self.finite_steps = state["finite_steps"].to(self.device)
        self.steps = int(state["steps"])
        self.current_run = state["current_run"].to(self.device)
        self.longest_run = state["longest_run"].to(self.device)

    def nonfinite_run_lengths(self) -> tuple[int, int]:
        """(current run, longest run since last flush) of skipped steps; a host sync."""
        return int(self.current_run.item()), int(self.longest_run.item())


class MetricsLog:
    """``output_dir/metrics.jsonl`` (main process) plus the accelerate trackers."""

    def __init__(self, path: Path, accelerator: Any, resume_step: int | None) -> None:
        self.path = path
        self.accelerator = accelerator
        if accelerator.is_main_process:
            self._truncate(resume_step)

    def _truncate(self, resume_step: int | None) -> None:
        """Fresh run: empty the file. Resumed run: drop rows after the checkpoint's step."""
        kept: list[str] = []
        if resume_step is not None and self.path.is_file():
            for line in self.path.read_text(encoding="utf-8").splitlines():
                with contextlib.suppress(json.JSONDecodeError, TypeError):
                    if json.loads(line).get("step", math.inf) <= resume_step:
                        kept.append(line)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.write_text("".join(line + "\n" for line in kept), encoding="utf-8")

    def write(self, row: dict[str, Any]) -> None:
        """Append ``row`` (non-finite numbers become null, so that every line is strict JSON)."""
        row = {key: None if isinstance(value, float) and not math.isfinite(value) else value
               for key, value in row.items()}
        if self.accelerator.is_main_process:
            with self.path.open("a", encoding="utf-8") as handle:
                handle.write(json.dumps(row, allow_nan=False) + "\n")
        numbers = {key: value for key, value in row.items()
                   if isinstance(value, (int, float)) and not isinstance(value, bool) and key != "step"}
        if self.accelerator.trackers:
            self.accelerator.log(numbers, step=int(row["step"]))


class CollapseMonitor:
    """Warns once per episode when the logged statistics show a collapse for ``patience_steps``.

    Uniform collapse: the teacher's per-sample entropy stays near ln(K) (so does the loss).
    One-hot collapse: the entropy of the batch-mean teacher distribution stays near 0 (every image
    goes to the same prototype).
    """

    def __init__(self, num_prototypes: int, patience_steps: int) -> None:
        self.log_k = math.log(num_prototypes)
        self.patience_steps = patience_steps
        self._since: dict[str, int] = {}
        self._warned: set[str] = set()

    def update(self, step: int, row: dict[str, float]) -> str | None:
        """Return a warning sentence when a collapse has lasted ``patience_steps``, else None."""
        conditions = {
            "uniform": row.get("teacher_entropy", 0.0) > 0.9 * self.log_k,
            "one-hot": row.get("teacher_mean_entropy", math.inf) < 0.1,
        }
        message = None
        for kind, holds in conditions.items():
            if not holds:
                self._since.pop(kind, None)
                self._warned.discard(kind)
                continue
            start = self._since.setdefault(kind, step)
            if step - start >= self.patience_steps and kind not in self._warned:
                self._warned.add(kind)
                message = self._message(kind, step - start, row)
        return message

    def _message(self, kind: str, steps: int, row: dict[str, float]) -> str:
        if kind == "uniform":
            detail = (f"the teacher entropy has stayed at {row['teacher_entropy']:.2f} nats, near ln(K) = "
                      f"{self.log_k:.2f}, and the loss at {row.get('loss', float('nan')):.2f}")
        else:
            detail = (f"the entropy of the mean teacher distribution has stayed at {row['teacher_mean_entropy']:.3f} "
                      "nats (every image goes to the same prototype)")
        return (f"Training looks collapsed ({kind}) for {steps} steps: {detail}. Usual remedies: a lower "
                "--teacher_temperature / --warmup_teacher_temperature, fewer prototypes "
                "(--config_overrides num_prototypes=4096), a lower --teacher_momentum, or checking the augmentations.")


# =============================================================================================
# Checkpoints
# =============================================================================================
def _checkpoints_dir(output_dir: str | Path) -> Path:
    return Path(output_dir) / CHECKPOINTS_DIRNAME


def _checkpoint_step(path: Path) -> int | None:
    name = path.name
    if not name.startswith(CHECKPOINT_PREFIX):
        return None
    with contextlib.suppress(ValueError):
        return int(name[len(CHECKPOINT_PREFIX):])
    return None


def is_complete_checkpoint(path: Path) -> bool:
    return path.is_dir() and (path / COMPLETE_MARKER).is_file()


def list_checkpoints(output_dir: str | Path) -> list[Path]:
    """Complete checkpoints under ``output_dir/checkpoints``, oldest first."""
    folder = _checkpoints_dir(output_dir)
    if not folder.is_dir():
        return []
    found = [(step, path) for path in folder.iterdir()
             if (step := _checkpoint_step(path)) is not None and is_complete_checkpoint(path)]
    return [path for _, path in sorted(found)]


def resolve_resume_checkpoint(args: DinoTrainingArguments) -> Path | None:
    """The checkpoint to resume from, or None for a fresh start.

    Raises:
        ValueError: ``--resume_from_checkpoint`` names a path that is not a complete checkpoint.
    """
    value = args.resume_from_checkpoint
    if value is None:
        return None
    if value == "latest":
        checkpoints = list_checkpoints(args.output_dir)
        if not checkpoints:
            logger.info("No complete checkpoint in %s: starting afresh.", _checkpoints_dir(args.output_dir))
            return None
        return checkpoints[-1]
    path = Path(value)
    if not path.exists():
        raise ValueError(f"--resume_from_checkpoint {value} does not exist: pass a checkpoint folder or 'latest'.")
    if not is_complete_checkpoint(path):
        raise ValueError(
            f"--resume_from_checkpoint {value} is not a complete dino_hf checkpoint (no {COMPLETE_MARKER}): "
            "pass another checkpoint folder or 'latest'."
        )
    return path


def _rng_state() -> dict[str, Any]:
    import random

    import numpy as np

    numpy_state = np.random.get_state(legacy=False)
    # numpy's key array as a tensor: the whole process state then loads with weights_only=True
    numpy_state["state"]["key"] = torch.from_numpy(numpy_state["state"]["key"].astype(np.int64))
    state = {"python": random.getstate(), "numpy": numpy_state, "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    import random

    import numpy as np

    random.setstate(state["python"])
    numpy_state = dict(state["numpy"], state=dict(state["numpy"]["state"]))
    numpy_state["state"]["key"] = numpy_state["state"]["key"].numpy().astype(np.uint32)
    np.random.set_state(numpy_state)
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(accelerator: Any, output_dir: str | Path, step: int, stream: BatchStream,
                    training_state: dict[str, Any], total_limit: int | None,
                    process_extras: dict[str, Any] | None = None) -> Path:
    """Write ``output_dir/checkpoints/step_{step}`` atomically; all processes must call it.

    Everything is written into a hidden temporary folder, the completion marker last, and the
    folder is then renamed: a kill at any moment leaves either a complete ``step_N`` or nothing
    under that name. Holds: model (student, teacher, center), optimiser, loss scaler, RNG states
    of every process (accelerate), each process's data-stream position and RNG state, and the
    step counter (the schedules are functions of the step), plus ``process_extras`` per process.
    """
    folder = _checkpoints_dir(output_dir)
    final = folder / f"{CHECKPOINT_PREFIX}{step}"
    temporary = folder / f"{TEMPORARY_PREFIX}{CHECKPOINT_PREFIX}{step}"
    if is_complete_checkpoint(final):
        return final
    if accelerator.is_main_process:
        if temporary.exists():
            shutil.rmtree(temporary)
        temporary.mkdir(parents=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(temporary), safe_serialization=True)
    rank = accelerator.process_index
    process_state = {"stream": stream.state_dict(), "rng": _rng_state(), **(process_extras or {})}
    torch.save(process_state, temporary / f"process_state_{rank}.pt")
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        (temporary / TRAINING_STATE_NAME).write_text(
            json.dumps({**training_state, "step": step, "num_processes": accelerator.num_processes}, indent=2)
        )
        _fsync_folder(temporary)
        (temporary / COMPLETE_MARKER).write_text(json.dumps({"step": step}) + "\n")
        if final.exists():  # an incomplete leftover with the same name
            shutil.rmtree(final)
        os.rename(temporary, final)
        _prune_checkpoints(output_dir, total_limit)
    accelerator.wait_for_everyone()
    return final


def _fsync_folder(folder: Path) -> None:
    """Flush the files of ``folder`` to disk before the marker declares them complete."""
    for path in folder.rglob("*"):
        if path.is_file():
            with contextlib.suppress(OSError), open(path, "rb") as handle:
                os.fsync(handle.fileno())


def _prune_checkpoints(output_dir: str | Path, total_limit: int | None) -> None:
    if total_limit is None:
        return
    checkpoints = list_checkpoints(output_dir)
    for path in checkpoints[: max(len(checkpoints) - total_limit, 0)]:
        shutil.rmtree(path, ignore_errors=True)


def _remove_stale_temporaries(output_dir: str | Path) -> None:
    folder = _checkpoints_dir(output_dir)
    if folder.is_dir():
        for path in folder.glob(f"{TEMPORARY_PREFIX}*"):
            shutil.rmtree(path, ignore_errors=True)


def _checkpoint_step_of(path: Path | None) -> int | None:
    if path is None:
        return None
    return int(json.loads((path / TRAINING_STATE_NAME).read_text())["step"])


def load_checkpoint(accelerator: Any, path: Path, stream: BatchStream) -> tuple[dict[str, Any], dict[str, Any]]:
    """Restore model/optimiser/scaler (accelerate) and this process's stream position.

    Returns:
        (training state dict with ``step``, this process's state: ``rng`` to apply just before
        training and any ``process_extras`` given to `save_checkpoint`).
    Raises:
        ValueError: the checkpoint was written by a different number of processes.
    """
    state = json.loads((path / TRAINING_STATE_NAME).read_text())
    if state.get("num_processes") != accelerator.num_processes:
        raise ValueError(
            f"--resume_from_checkpoint {path} was written by {state.get('num_processes')} processes; resume "
            f"it with the same number (this run has {accelerator.num_processes})."
        )
    try:
        process_state = torch.load(path / f"process_state_{accelerator.process_index}.pt", weights_only=True)
    except pickle.UnpicklingError:
        raise ValueError(
            f"--resume_from_checkpoint {path} holds a process state that only unsafe unpickling can read (written "
            "by an earlier dino_hf, or not by dino_hf): resume from a newer checkpoint or start afresh."
        ) from None
    stream.load_state_dict(process_state["stream"])
    stream.start()
    accelerator.load_state(str(path))
    return state, process_state


# =============================================================================================
# Signals
# =============================================================================================
class StopSignals:
    """Context manager: SIGTERM/SIGINT set ``received`` (a second signal acts as usual)."""

    def __init__(self) -> None:
        self.received: str | None = None
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, frame: Any) -> None:
        name = signal.Signals(signum).name
        if self.received is not None:  # second signal: stop waiting for the checkpoint
            signal.signal(signum, self._previous.get(signum, signal.SIG_DFL))
            signal.raise_signal(signum)
            return
        self.received = name
        logger.warning("Received %s: saving a checkpoint after the current step, then exiting.", name)

    def __enter__(self) -> StopSignals:  # noqa: PYI034 - final class
        import threading

        if threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGTERM, signal.SIGINT):
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc_info: object) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)


# =============================================================================================
# The run
# =============================================================================================
@dataclass
class _Run:
    """Everything `train` sets up; the loop functions below share it."""

    args: DinoTrainingArguments
    accelerator: Any
    model: torch.nn.Module
    unwrapped: Any
    step_fn: DinoTrainStep
    stream: BatchStream
    schedules: Any
    plan: StepPlan
    output_dir: Path
    metrics: MetricsLog
    accumulator: MetricsAccumulator
    collapse: CollapseMonitor
    knn_monitor: Any
    signals: StopSignals
    step: int = 0
    last_row: dict[str, Any] = field(default_factory=dict)
    last_good_checkpoint: Path | None = None
    started: float = field(default_factory=time.perf_counter)


def train(args: DinoTrainingArguments) -> TrainingResult:
    """Train DINO as the arguments say; returns when done or after a signal-triggered checkpoint.

    Raises:
        ValueError: bad input (one sentence naming the flag), before any training step.
        NonFiniteLossError: ``--max_consecutive_nonfinite_steps`` skipped steps in a row.
    """
    run = _set_up(args)
    with run.signals:
        interrupted = _training_loop(run)
    if interrupted is not None:
        return interrupted
    _finish(run)
    return TrainingResult(model=run.unwrapped, step=run.step, output_dir=run.output_dir, last_metrics=run.last_row)


def _set_up(args: DinoTrainingArguments) -> _Run:
    """Build every component (bad input fails here, before the output folder is touched), then
    restore the checkpoint to resume from, if any."""
    from accelerate.utils import set_seed

    accelerator = build_accelerator(args)
    _configure_logging(accelerator)
    output_dir = Path(args.output_dir)
    resume_path = resolve_resume_checkpoint(args)
    set_seed(args.seed)
    model = build_model(args)
    loader = _open_training_data(args, accelerator)
    augment = build_device_augmentation(args, accelerator.device, accelerator.process_index)
    plan = plan_steps(args, loader.num_examples, accelerator.num_processes)
    schedules = build_schedules(args, plan)
    knn_monitor = _build_knn_monitor(args)
    _prepare_output_dir(args, accelerator, output_dir, resuming=resume_path is not None)

    model, optimizer = _prepare_model_and_optimizer(args, accelerator, model)
    unwrapped = accelerator.unwrap_model(model)
    run = _Run(
        args=args, accelerator=accelerator, model=model, unwrapped=unwrapped,
        step_fn=DinoTrainStep(accelerator, model, optimizer, args.gradient_accumulation_steps,
                              args.max_grad_norm, args.clip_mode),
        stream=BatchStream(loader, augment=augment), schedules=schedules, plan=plan, output_dir=output_dir,
        metrics=MetricsLog(output_dir / METRICS_NAME, accelerator, resume_step=_checkpoint_step_of(resume_path)),
        accumulator=MetricsAccumulator(accelerator.device),
        collapse=CollapseMonitor(unwrapped.config.num_prototypes, args.collapse_warning_steps),
        knn_monitor=knn_monitor, signals=StopSignals(),
    )
    rng_state = _restore(run, resume_path) if resume_path is not None else None
    if resume_path is None:
        run.stream.start()
    _log_plan(run)
    _write_training_args(run)
    if args.report_to != "none":
        accelerator.init_trackers(args.tracker_project_name, config=_tracker_config(args, plan))
    if rng_state is not None:
        _set_rng_state(rng_state)  # last, so that nothing above shifts the random streams
    return run


def _prepare_model_and_optimizer(args: DinoTrainingArguments, accelerator: Any, model: Any) -> tuple[Any, Any]:
    """Sync batch norm, compilation, device placement, AdamW and the (DDP) wrapping."""
    model = _maybe_convert_sync_batch_norm(model, accelerator)
    if args.torch_compile:
        model.student.compile_backbone()
        model.teacher.compile_backbone()
    model.to(accelerator.device)
    optimizer = build_optimizer(model, accelerator.device)
    with warnings.catch_warnings():  # accelerate 1.x forwards the still-needed broadcast_buffers=False
        warnings.filterwarnings("ignore", message=".*broadcast_buffers.*", category=FutureWarning)
        model, optimizer = accelerator.prepare(model, optimizer)
    model.train()
    return model, optimizer


def _restore(run: _Run, path: Path) -> dict[str, Any]:
    """Load a checkpoint into the run; returns the RNG state to apply just before training."""
    state, process_state = load_checkpoint(run.accelerator, path, run.stream)
    if "metrics" in process_state:
        run.accumulator.load_state_dict(process_state["metrics"])
    run.step = int(state["step"])
    run.last_good_checkpoint = path
    logger.info("Resumed from %s at step %d.", path, run.step)
    return process_state["rng"]


class _ThroughputWindow:
    """Images per second and the fraction of time spent waiting for data since the last call."""

    def __init__(self, stream: BatchStream, images_per_micro_batch: int) -> None:
        self.stream = stream
        self.images_per_micro_batch = images_per_micro_batch
        self._reset()

    def _reset(self) -> None:
        self.started, self.wait, self.batches = time.perf_counter(), self.stream.wait_seconds, self.stream.micro_batches

    def measure(self) -> dict[str, float]:
        seconds = max(time.perf_counter() - self.started, 1e-9)
        values = {
            "images_per_second": (self.stream.micro_batches - self.batches) * self.images_per_micro_batch / seconds,
            "data_wait_fraction": (self.stream.wait_seconds - self.wait) / seconds,
        }
        self._reset()
        return values


def _training_loop(run: _Run) -> TrainingResult | None:
    """Optimiser steps until the plan's total; returns a result only when stopped by a signal."""
    from tqdm.auto import tqdm

    args, accelerator = run.args, run.accelerator
    progress = tqdm(total=run.plan.total_steps, initial=run.step, disable=not accelerator.is_local_main_process,
                    desc="DINO", unit="step", dynamic_ncols=True)
    window = _ThroughputWindow(run.stream, args.per_device_train_batch_size * accelerator.num_processes)
    try:
        while run.step < run.plan.total_steps:
            values = run.schedules.at(run.step)
            run.accumulator.add(run.step_fn(run.stream, values))
            run.step += 1
            progress.update(1)
            # One process stops at once; several agree at the next logging step (their only sync).
            stop_now = run.signals.received is not None and accelerator.num_processes == 1
            if run.step % args.logging_steps == 0 or run.step == run.plan.total_steps:
                stop_now = _log_step(run, values, window.measure(), progress) or stop_now
            if args.eval_steps and run.step % args.eval_steps == 0 and run.step < run.plan.total_steps:
                _evaluate(run)
            if run.step % args.checkpointing_steps == 0 or stop_now:
                _checkpoint(run, stop_now)
            if stop_now:
                return _interrupted(run)
    finally:
        progress.close()
    return None


def _log_step(run: _Run, values: Any, timing: dict[str, float], progress: Any) -> bool:
    """Write one metrics row; check non-finite runs and collapse. Returns True when a stop signal
    was received by any process (agreed here, the only place where processes synchronise)."""
    accelerator = run.accelerator
    row_values = run.accumulator.flush(accelerator)
    longest = row_values.pop("longest_nonfinite_run")
    row: dict[str, Any] = {
        "step": run.step,
        "epoch": round(run.step / run.plan.steps_per_epoch, 4),
        **{key: row_values[key] for key in ("loss", "teacher_entropy", "teacher_mean_entropy", "grad_norm")},
        "learning_rate": values.learning_rate,
        "weight_decay": values.weight_decay,
        "teacher_momentum": values.teacher_momentum,
        "teacher_temperature": values.teacher_temperature,
        **timing,
        "nonfinite_steps": row_values["nonfinite_steps"],
        "bad_images": int(getattr(run.stream.loader, "bad_image_count", 0) or 0),
        "elapsed_seconds": round(time.perf_counter() - run.started, 2),
    }
    run.metrics.write(row)
    run.last_row = row
    progress.set_postfix(loss=f"{row['loss']:.4f}", lr=f"{values.learning_rate:.2e}", refresh=False)
    if row["nonfinite_steps"]:
        logger.warning("%d of the last optimiser steps had a non-finite loss or gradient and were skipped.",
                       row["nonfinite_steps"])
    _check_nonfinite(run, longest)
    warning = run.collapse.update(run.step, row)
    if warning and accelerator.is_main_process:
        logger.warning(warning)
    if accelerator.num_processes > 1:
        flag = torch.tensor([1.0 if run.signals.received else 0.0], device=accelerator.device)
        return bool(accelerator.reduce(flag, reduction="sum").item() > 0)
    return run.signals.received is not None


def _check_nonfinite(run: _Run, longest_run: int) -> None:
    limit = run.args.max_consecutive_nonfinite_steps
    if longest_run >= limit:
        where = f"the last good checkpoint is {run.last_good_checkpoint}" if run.last_good_checkpoint else "no checkpoint was written"
        raise NonFiniteLossError(
            f"Stopped at step {run.step}: {longest_run} optimiser steps in a row had a non-finite loss or gradient "
            f"(limit --max_consecutive_nonfinite_steps {limit}); {where}; try a lower --learning_rate, a smaller "
            "--max_grad_norm or --mixed_precision bf16/no."
        )


def _checkpoint(run: _Run, forced: bool) -> None:
    """Save a checkpoint unless the current steps are being skipped (keep the last good one)."""
    current, longest = run.accumulator.nonfinite_run_lengths()
    _check_nonfinite(run, longest)
    if current > 0 and not forced:
        logger.warning("Not saving a checkpoint at step %d: the last %d steps were skipped as non-finite.",
                       run.step, current)
        return
    path = save_checkpoint(run.accelerator, run.output_dir, run.step, run.stream,
                           {"epoch": run.stream.epoch, "plan": run.plan.to_dict()}, run.args.checkpoints_total_limit,
                           process_extras={"metrics": run.accumulator.state_dict()})
    run.last_good_checkpoint = path
    logger.info("Saved checkpoint %s.", path)
    if run.args.push_to_hub and run.args.hub_strategy == "checkpoint":
        _export_and_push(run, f"Checkpoint at step {run.step}")


def _interrupted(run: _Run) -> TrainingResult:
    command = " ".join(sys.argv) if sys.argv and sys.argv[0] else "scripts/train.py ..."
    if "--resume_from_checkpoint" not in command:
        command += " --resume_from_checkpoint latest"
    if run.accelerator.is_main_process:
        sys.stderr.write(
            f"Stopped by {run.signals.received} at step {run.step}; checkpoint saved to {run.last_good_checkpoint}. "
            f"Resume with the same launcher (python, accelerate launch or torchrun) and: {command}\n"
        )
    run.accelerator.end_training()
    return TrainingResult(model=run.unwrapped, step=run.step, output_dir=run.output_dir,
                          interrupted_by=run.signals.received, checkpoint=run.last_good_checkpoint,
                          last_metrics=run.last_row)


def _evaluate(run: _Run) -> dict[str, float]:
    if run.knn_monitor is None:
        return {}
    metrics = run.knn_monitor.evaluate(run.unwrapped.teacher.backbone, run.accelerator)
    if run.accelerator.is_main_process:
        _save_attention_snapshot(run)
    run.model.train()
    run.metrics.write({"step": run.step, **metrics})
    logger.info("Step %d k-NN evaluation: %s", run.step,
                ", ".join(f"{key} {value:.4f}" for key, value in metrics.items()))
    return metrics


def _save_attention_snapshot(run: _Run) -> None:
    """Teacher attention of a few fixed eval images: ``output_dir/attention/step_N/`` and the trackers.

    A failure here (e.g. an exotic backbone without attention weights) is logged, never fatal.
    """
    output_dir = Path(run.args.output_dir) / "attention" / f"step_{run.step}"
    try:
        grids = run.knn_monitor.attention_snapshot(run.unwrapped.teacher.backbone, output_dir)
    except Exception as error:  # noqa: BLE001 - visualisation must not stop training
        logger.warning("Could not draw attention maps at step %d: %s", run.step, error)
        return
    for tracker in run.accelerator.trackers:
        if hasattr(tracker, "log_images"):
            try:
                tracker.log_images({"attention": [np.asarray(grid) for grid in grids]}, step=run.step)
            except Exception as error:  # noqa: BLE001 - a tracker hiccup must not stop training
                logger.warning("Could not send attention maps to %s: %s", tracker.name, error)


def _finish(run: _Run) -> None:
    """Final checkpoint, evaluation, exports, plot and push."""
    accelerator = run.accelerator
    if not is_complete_checkpoint(_checkpoints_dir(run.output_dir) / f"{CHECKPOINT_PREFIX}{run.step}"):
        _checkpoint(run, forced=False)
    eval_metrics = _evaluate(run)
    if accelerator.is_main_process:
        run.unwrapped.save_pretrained(run.output_dir)
        run.unwrapped.save_backbone(run.output_dir / BACKBONE_DIRNAME)
        _write_training_args(run, final=True)
        if eval_metrics:
            (run.output_dir / "eval_results.json").write_text(
                json.dumps({"step": run.step, **eval_metrics, "eval_dataset_name": run.args.eval_dataset_name,
                            "eval_split": run.args.eval_split}, indent=2) + "\n")
        _plot(run)
        if run.args.push_to_hub:
            _push(run, f"End of training (step {run.step})")
        logger.info("Wrote the model to %s and the teacher backbone to %s.", run.output_dir,
                    run.output_dir / BACKBONE_DIRNAME)
    accelerator.wait_for_everyone()
    accelerator.end_training()


def _plot(run: _Run) -> None:
    try:
        from .evaluation import plot_training_curves

        plot_training_curves(run.output_dir / METRICS_NAME, run.output_dir / "training_curves.png")
    except Exception as error:  # noqa: BLE001 - a plot must never fail a finished run
        logger.warning("Could not plot the training curves: %s", error)


def _export_and_push(run: _Run, message: str) -> None:
    if run.accelerator.is_main_process:
        run.unwrapped.save_backbone(run.output_dir / BACKBONE_DIRNAME)
        _write_training_args(run)
        _push(run, message)
    run.accelerator.wait_for_everyone()


def _push(run: _Run, message: str) -> None:
    from .hub import try_push_training_output

    try_push_training_output(run.output_dir, run.args.hub_model_id, private=run.args.hub_private_repo,
                             commit_message=message)


# ------------------------------------------------------------------------------- setup helpers
def _configure_logging(accelerator: Any) -> None:
    """dino_hf's messages at INFO on the main process (WARNING elsewhere); libraries at WARNING."""
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S",
                        level=logging.WARNING)
    logging.getLogger("dino_hf").setLevel(logging.INFO if accelerator.is_main_process else logging.WARNING)
    import transformers

    transformers.utils.logging.set_verbosity_warning()
    transformers.utils.logging.disable_progress_bar()


def _prepare_output_dir(args: DinoTrainingArguments, accelerator: Any, output_dir: Path, resuming: bool) -> None:
    """Refuse to start afresh over an earlier run's checkpoints unless told to overwrite them."""
    has_checkpoints = bool(list_checkpoints(output_dir))
    if has_checkpoints and not resuming and args.resume_from_checkpoint is None and not args.overwrite_output_dir:
        raise ValueError(
            f"--output_dir {output_dir} already holds checkpoints of an earlier run: pass --resume_from_checkpoint "
            "latest to continue it or --overwrite_output_dir to start over."
        )
    if accelerator.is_main_process:
        if args.overwrite_output_dir and _checkpoints_dir(output_dir).exists():
            shutil.rmtree(_checkpoints_dir(output_dir))
        output_dir.mkdir(parents=True, exist_ok=True)
        _remove_stale_temporaries(output_dir)
    accelerator.wait_for_everyone()


def _build_knn_monitor(args: DinoTrainingArguments) -> Any:
    if not args.eval_dataset_name:
        return None
    from .evaluation import KnnMonitor

    return KnnMonitor.from_training_args(args)


def _maybe_convert_sync_batch_norm(model: Any, accelerator: Any) -> Any:
    """Batch norm in the head is synchronised across GPUs, as in the official code."""
    if accelerator.num_processes > 1 and accelerator.device.type == "cuda" and model.config.head_use_batch_norm:
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    return model


def _device_name(accelerator: Any) -> str:
    device = accelerator.device
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{device.type} ({os.cpu_count()} cores, {torch.get_num_threads()} threads)"


def _log_plan(run: _Run) -> None:
    plan, args, accelerator = run.plan, run.args, run.accelerator
    size = "" if plan.dataset_size_known else " (stream of unknown size: --max_steps / --num_train_epochs)"
    lines = [
        (f"processes {accelerator.num_processes} on {_device_name(accelerator)}, "
        f"mixed precision {args.mixed_precision}"),
        (f"global batch {plan.global_batch_size} ({args.per_device_train_batch_size} per device x "
        f"{args.gradient_accumulation_steps} accumulation x {accelerator.num_processes} processes)"),
        f"learning rate {plan.learning_rate:.3g} (= {args.learning_rate:g} x {plan.global_batch_size} / 256)",
        f"steps per epoch {plan.steps_per_epoch:g}{size}",
        (f"total steps {plan.total_steps}, warm-up {plan.warmup_steps}, teacher temperature warm-up "
        f"{plan.warmup_teacher_temperature_steps}, last layer frozen for {plan.freeze_last_layer_steps}"),
        f"student parameters {sum(p.numel() for p in run.unwrapped.student.parameters()) / 1e6:.2f} M",
    ]
    for line in lines:
        logger.info(line)


def _write_training_args(run: _Run, final: bool = False) -> None:
    """``training_args.json``: the arguments with the step counts resolved, plus run facts."""
    if not run.accelerator.is_main_process:
        return
    plan = run.plan
    resolved = {
        **run.args.to_dict(),
        "max_steps": plan.total_steps,
        "warmup_steps": plan.warmup_steps,
        "warmup_teacher_temperature_steps": plan.warmup_teacher_temperature_steps,
        "freeze_last_layer_steps": plan.freeze_last_layer_steps,
        "num_processes": plan.num_processes,
        "global_batch_size": plan.global_batch_size,
        "scaled_learning_rate": plan.learning_rate,
        "steps_per_epoch": plan.steps_per_epoch,
        "hardware": _device_name(run.accelerator),
    }
    if final:
        resolved["train_runtime"] = round(time.perf_counter() - run.started, 1)
    (run.output_dir / TRAINING_ARGS_NAME).write_text(json.dumps(resolved, indent=2) + "\n", encoding="utf-8")


def _tracker_config(args: DinoTrainingArguments, plan: StepPlan) -> dict[str, Any]:
    values = {**args.to_dict(), **{f"plan_{key}": value for key, value in plan.to_dict().items()}}
    return {key: (str(value) if isinstance(value, (list, tuple)) or value is None else value)
            for key, value in values.items()}

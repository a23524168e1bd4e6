"""What a run writes and logs about itself: ``training_args.json`` (the arguments with the plan's step
counts and the run's facts, :data:`dino_hf.base.run_folder.RUN_FACT_KEYS`), the plan's log lines and
warnings, and the trackers' configuration and resume settings.
"""

from __future__ import annotations

import json
import logging
import math
import os
from typing import Any

import torch
from accelerate import Accelerator
from huggingface_hub import get_token

from dino_hf.base.errors import RunError, describe_os_error
from dino_hf.base.run_folder import RunFolder, portable_paths, strip_secret_fields
from dino_hf.train.arguments import DinoTrainingArguments
from dino_hf.train.hardware import MachineSettings
from dino_hf.train.step_plan import StepPlan, scaling_note

logger = logging.getLogger(__name__)

__all__ = ["device_name", "learning_rate_line", "log_plan", "plan_warnings", "resumed_learning_rate_warning", "tracker_config", "tracker_init_kwargs", "write_training_args"]


def device_name(accelerator: Accelerator) -> str:
    device = accelerator.device
    if device.type == "cuda":
        return torch.cuda.getdevice_name(device)
    return f"{device.type} ({os.cpu_count()} cores, {torch.get_num_threads()} threads)"


def log_plan(plan: StepPlan, args: DinoTrainingArguments, accelerator: Accelerator, machine: MachineSettings,
             model: torch.nn.Module) -> None:
    """The plan's log lines (and, on the main process, its scaling note and warnings)."""
    size = "" if plan.dataset_size_known else " (stream of unknown size: total steps / --num_train_epochs)"
    if not plan.calibrated:
        length = f"total steps: planned after the calibration, for {plan.time_budget_seconds / 60:g} min"
    else:
        budget = f" (time budget {plan.time_budget_seconds / 60:g} min)" if plan.time_budget_seconds else ""
        length = f"total steps {plan.total_steps}{budget}"
    lines = [
        f"processes {accelerator.num_processes} on {device_name(accelerator)}",
        *machine.describe(),
        (f"global batch {plan.global_batch_size} ({args.per_device_train_batch_size} per device x "
        f"{args.gradient_accumulation_steps} accumulation x {accelerator.num_processes} processes)"),
        learning_rate_line(plan.learning_rate, args.learning_rate, args.base_learning_rate, plan.global_batch_size),
        f"steps per epoch {plan.steps_per_epoch:g}{size}",
        (f"{length}, warm-up {plan.warmup_steps}, teacher temperature warm-up "
        f"{plan.warmup_teacher_temperature_steps}, last layer frozen for {plan.freeze_last_layer_steps}, "
        f"backbone frozen for {plan.freeze_backbone_steps}"),
        f"student parameters {sum(p.numel() for p in model.student.parameters()) / 1e6:.2f} M",
    ]
    for line in lines:
        logger.info(line)
    if plan.calibrated and accelerator.is_main_process:
        note = scaling_note(plan)
        if note is not None:
            logger.info(note)
        for warning in plan_warnings(plan, args.min_learning_rate):
            logger.warning(warning)


def learning_rate_line(peak: float, absolute: float | None, base: float, global_batch_size: int) -> str:
    """The peak learning rate both ways: absolute (as transformers' ``TrainingArguments.learning_rate``)
    and per 256 images (as the recipes' ``--base_learning_rate``)."""
    if absolute is None:
        return f"learning rate {peak:.3g} (--base_learning_rate {base:g} x global batch {global_batch_size} / 256)"
    return (f"learning rate {peak:.3g} (--learning_rate, absolute; {peak * 256 / global_batch_size:.3g} per 256 images "
            f"at global batch {global_batch_size}; --base_learning_rate is ignored)")


def resumed_learning_rate_warning(recorded: dict[str, Any], peak: float) -> str | None:
    """A warning when a resumed run's peak learning rate is not the one its ``training_args.json`` recorded
    (``recorded``), e.g. a recipe of dino_hf < 0.2 whose ``learning_rate`` meant per 256 images and now means
    the absolute rate; ``None`` when they agree or nothing was recorded."""
    before = recorded.get("scaled_learning_rate")
    if not isinstance(before, (int, float)) or math.isclose(before, peak, rel_tol=1e-6):
        return None
    hint = (" Before dino_hf 0.2 --learning_rate was per 256 images: pass that value as --base_learning_rate."
            if "base_learning_rate" not in recorded else "")
    return (f"The resumed run's peak learning rate is {peak:.3g}, not the {before:.3g} it started with: the schedule "
            f"changes from here on.{hint}")


def plan_warnings(plan: StepPlan, min_learning_rate: float) -> list[str]:
    """Sentences for schedules that cover the whole run (a run that never leaves its warm-up, or
    whose prototypes never train) or run backwards, each naming the flags that set them."""
    messages = []
    if min_learning_rate > plan.learning_rate:
        messages.append(f"--min_learning_rate {min_learning_rate:g} exceeds the peak learning rate {plan.learning_rate:.3g} "
                        "(--learning_rate x global batch / 256): the cosine decay rises instead; lower --min_learning_rate.")
    for steps, what, flags in (
        (plan.warmup_steps, "the learning-rate warm-up", "--warmup_steps/--warmup_epochs"),
        (plan.freeze_last_layer_steps, "the frozen last layer", "--freeze_last_layer_steps/--freeze_last_layer_epochs"),
        (plan.warmup_teacher_temperature_steps, "the teacher-temperature warm-up",
         "--warmup_teacher_temperature_steps/--warmup_teacher_temperature_epochs"),
    ):
        if steps >= plan.total_steps:
            messages.append(f"{what[0].upper()}{what[1:]} lasts {steps} steps and the run {plan.total_steps}: it covers "
                            f"the whole run; lower {flags} (epochs count {plan.steps_per_epoch:g} steps here).")
    return messages


def write_training_args(folder: RunFolder, args: DinoTrainingArguments, plan: StepPlan, accelerator: Accelerator,
                        machine: MachineSettings, data: dict[str, str | None],
                        runtime_seconds: float | None = None) -> None:
    """``training_args.json``: the arguments with the step counts resolved, plus run facts (``data``:
    how the run's data are named; ``runtime_seconds`` at the end).

    A time-budgeted run keeps ``max_steps`` unset (replaying the file budgets again) and records its
    plan as ``planned_total_steps``; the machine's decisions (precision, workers, threads) are recorded
    next to the arguments that asked for them.
    """
    if not accelerator.is_main_process:
        return
    resolved = {
        **args.to_dict(),
        "max_steps": plan.total_steps if plan.time_budget_seconds is None else None,
        "warmup_steps": plan.warmup_steps,
        "warmup_teacher_temperature_steps": plan.warmup_teacher_temperature_steps,
        "freeze_last_layer_steps": plan.freeze_last_layer_steps,
        "freeze_backbone_steps": plan.freeze_backbone_steps,
        "planned_total_steps": plan.total_steps if plan.calibrated else None,
        "num_processes": plan.num_processes,
        "global_batch_size": plan.global_batch_size,
        "scaled_learning_rate": plan.learning_rate,
        "steps_per_epoch": plan.steps_per_epoch,
        "hardware": device_name(accelerator),
        **machine.to_dict(),
        **data,
    }
    if plan.seconds_per_step is not None:
        resolved["calibrated_seconds_per_step"] = round(plan.seconds_per_step, 5)
        resolved["calibrated_evaluation_seconds"] = round(plan.evaluation_seconds or 0.0, 2)
        resolved["calibration_steps"] = plan.calibration_steps
        resolved["calibration_seconds"] = round(plan.calibration_seconds, 2)
        resolved["replans"] = plan.replans
        if plan.replanned_seconds_per_step is not None:
            resolved["replanned_seconds_per_step"] = round(plan.replanned_seconds_per_step, 5)
    if runtime_seconds is not None:
        resolved["train_runtime"] = round(runtime_seconds, 1)
    # a token given as an argument value (or shaped like one) is not kept on disk
    resolved = strip_secret_fields(resolved, get_token())
    try:
        folder.training_args.write_text(json.dumps(portable_paths(resolved), indent=2) + "\n", encoding="utf-8")
    except OSError as error:
        raise RunError(describe_os_error(error, folder.training_args, "writing the training arguments", "")) from None


def tracker_init_kwargs(tracker_run_id: str, step: int, resumed: bool) -> dict[str, dict[str, Any]]:
    """What makes a resumed run continue its trackers' run instead of opening a new one.

    Weights & Biases: the run id kept in the checkpoints (``resume="allow"`` creates it the first
    time). TensorBoard: events after the checkpoint's step, logged by the run that was stopped after
    it, are purged (as the rows of ``metrics.jsonl`` are).
    """
    kwargs: dict[str, dict[str, Any]] = {"wandb": {"id": tracker_run_id, "resume": "allow"}}
    if resumed:
        kwargs["tensorboard"] = {"purge_step": step + 1}
    return kwargs


def tracker_config(args: DinoTrainingArguments, plan: StepPlan) -> dict[str, Any]:
    values = portable_paths({**args.to_dict(), **{f"plan_{key}": value for key, value in plan.to_dict().items()}})
    return {key: (str(value) if isinstance(value, (list, tuple)) or value is None else value)
            for key, value in values.items()}

"""The Accelerate-driven DINO training loop, readable top to bottom.

`train(args)` builds the run's parts from `DinoTrainingArguments` (:mod:`dino_hf.train.builders`), restores
a checkpoint when resuming (:mod:`dino_hf.train.checkpointing`), then runs optimiser steps
(:class:`dino_hf.train.step.DinoTrainStep`) until the planned total, logging
(:mod:`dino_hf.train.metrics`), evaluating (:mod:`dino_hf.eval.evaluation`), checkpointing and, at the end,
exporting the teacher backbone and pushing to the Hub (:mod:`dino_hf.hub.push`). The output folder's
layout is :mod:`dino_hf.base.run_folder`'s.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import shlex
import signal
import sys
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType, set_seed
from huggingface_hub import get_token
from transformers import TrainerState

from dino_hf.base.errors import RunError, describe_os_error
from dino_hf.base.progress import TrainingProgress, configure_output
from dino_hf.base.run_folder import (
    PRETRAINING_PROGRESS_NAME,
    RunFolder,
    portable_paths,
    read_json,
    scrub_secrets,
)
from dino_hf.data.loader import BatchStream
from dino_hf.data.sources import describe_image_source
from dino_hf.eval.evaluation import KnnMonitor
from dino_hf.eval.visualization import plot_training_curves
from dino_hf.hub.model_card import write_run_cards
from dino_hf.hub.push import check_push_target, try_push_training_output
from dino_hf.losses.distillation import DISTILLATION_TERMS
from dino_hf.models.configuration_dino import DinoConfig
from dino_hf.models.modeling_dino import DinoForPreTraining
from dino_hf.train.arguments import DinoTrainingArguments
from dino_hf.train.builders import (
    build_accelerator,
    build_device_augmentation,
    build_knn_monitor,
    build_mask_sampler,
    build_model,
    build_schedules,
    choose_precision,
    cores_per_process,
    open_training_data,
    prepare_model_and_optimizer,
    set_compute_threads,
    starts_from_backbone,
    training_device,
)
from dino_hf.train.callbacks import CallbackRunner
from dino_hf.train.checkpointing import (
    RunLock,
    StopAgreement,
    StopSignals,
    acquire_run_lock,
    checkpoint_path,
    checkpoint_step_of,
    discard_folder,
    is_complete_checkpoint,
    list_checkpoints,
    load_checkpoint,
    remove_leftovers,
    resolve_resume_checkpoint,
    restore_rng_state,
    resume_command,
    save_checkpoint,
)
from dino_hf.train.distillation import attach_distillation_teacher, open_distillation_teacher
from dino_hf.train.hardware import MachineSettings, PrecisionChoice, describe_cpu
from dino_hf.train.metrics import (
    CollapseMonitor,
    GradientSpikeMonitor,
    MetricsAccumulator,
    MetricsLog,
    ThroughputWindow,
    metric_keys,
)
from dino_hf.train.run_records import (
    log_plan,
    resumed_learning_rate_warning,
    tracker_config,
    tracker_init_kwargs,
    write_training_args,
)
from dino_hf.train.schedules import DinoSchedules, ScheduleValues
from dino_hf.train.step import DinoTrainStep
from dino_hf.train.step_plan import (
    REPLAN_FRACTIONS,
    BudgetCalibration,
    RunLength,
    StepPlan,
    plan_for_time_budget,
    plan_steps,
)
from dino_hf.train.trackers import log_images

logger = logging.getLogger(__name__)

__all__ = ["NonFiniteLossError", "TrainingInputs", "TrainingResult", "train"]


class NonFiniteLossError(RuntimeError):
    """Raised when too many consecutive optimiser steps had a non-finite loss or gradient."""


@dataclass
class TrainingResult:
    """What `train` returns (on every process)."""

    model: DinoForPreTraining  # unwrapped
    step: int
    output_dir: Path
    interrupted_by: str | None = None  # "SIGTERM" / "SIGINT" when stopped by a signal
    checkpoint: Path | None = None  # the checkpoint written when interrupted
    last_metrics: dict[str, Any] = field(default_factory=dict)
    state: TrainerState | None = None  # transformers' TrainerState: global_step, log_history...

    @property
    def exit_status(self) -> int:
        """0 when finished; 128 + signal number when stopped by a signal (shell convention)."""
        if self.interrupted_by is None:
            return 0
        return 128 + int(getattr(signal, self.interrupted_by))


@dataclass(frozen=True)
class TrainingInputs:
    """What a Python caller hands over besides the arguments (``DinoTrainer`` builds it).

    ``train_dataset`` / ``eval_dataset``: the images as objects (:func:`dino_hf.data.sources.open_image_source`)
    instead of ``--dataset_name`` / ``--eval_dataset_name``; ``callbacks``: ``transformers.TrainerCallback``s
    (:mod:`dino_hf.train.callbacks`).
    """

    train_dataset: Any = None
    eval_dataset: Any = None
    callbacks: tuple[Any, ...] = ()


@dataclass
class _Run:
    """Everything `train` sets up; the loop functions below share it."""

    args: DinoTrainingArguments
    accelerator: Accelerator
    model: torch.nn.Module  # as prepared by accelerate (DDP-wrapped with several processes)
    unwrapped: DinoForPreTraining
    step_fn: DinoTrainStep
    stream: BatchStream
    schedules: DinoSchedules
    plan: StepPlan
    folder: RunFolder
    metrics: MetricsLog
    accumulator: MetricsAccumulator
    collapse: CollapseMonitor
    spikes: GradientSpikeMonitor
    knn_monitor: KnnMonitor | None
    signals: StopSignals
    stop: StopAgreement
    lock: RunLock
    machine: MachineSettings
    callbacks: CallbackRunner
    clock: Callable[[], float]
    num_examples_per_process: int | None  # for re-planning after a time budget's calibration
    continued: bool  # continued pre-training of a backbone (the defaults of its head warm-up)
    run_length: RunLength  # what the plan is computed from
    train_source: str | None  # the training data, as the records name it
    eval_source: str | None  # the evaluation data, as the records name it
    teacher_facts: dict[str, str]  # what training_args.json records of a distillation teacher
    step: int = 0
    last_row: dict[str, Any] = field(default_factory=dict)
    last_good_checkpoint: Path | None = None
    started: float = field(default_factory=time.perf_counter)
    budget_used_before: float = 0.0  # seconds of the time budget used before this process (resumed runs)
    loop_started: float | None = None  # clock() when this process's training loop began
    tracker_run_id: str = field(default_factory=lambda: uuid.uuid4().hex[:8])  # kept by checkpoints (W&B id)
    evaluation_seconds_spent: float = 0.0  # clock seconds in evaluations, by this process
    # where the step-time window of the next re-plan began: (step, budget used, evaluation seconds spent)
    replan_window: tuple[int, float, float] | None = None
    progress: TrainingProgress | None = None  # while the loop runs

    def budget_used(self) -> float:
        """Seconds of ``--max_train_minutes`` used so far, by this process and those before it."""
        now = self.clock()
        return self.budget_used_before + (now - self.loop_started if self.loop_started is not None else 0.0)


def train(args: DinoTrainingArguments, clock: Callable[[], float] = time.perf_counter, *,
          inputs: TrainingInputs | None = None) -> TrainingResult:
    """Train DINO as the arguments say; returns when done, when a callback stopped the run or after a
    signal-triggered checkpoint. ``DinoTrainer.train`` is the Python entry point; this is its loop.

    Args:
        args: the parsed arguments.
        clock: the time source of ``--max_train_minutes`` (seconds, monotonic; tests pass a fake one).
        inputs: data objects and callbacks of a Python caller (:class:`TrainingInputs`).

    Raises:
        ValueError: bad input (one sentence naming the flag), before any training step.
        RunError (a ValueError): an expected failure (another run holds the output folder, a full disk,
            a damaged or incompatible checkpoint...), one sentence naming the path and the remedy.
        NonFiniteLossError: ``--max_consecutive_nonfinite_steps`` skipped steps in a row.
    """
    run = _set_up(args, clock, inputs or TrainingInputs())
    try:
        with run.signals:
            interrupted = _training_loop(run)
        if interrupted is not None:
            return interrupted
        _finish(run)
    finally:
        run.stream.close()  # before the interpreter's exit, which would wait for the loader workers
        run.stop.close()
        run.lock.release()
    return TrainingResult(model=run.unwrapped, step=run.step, output_dir=run.folder.root, last_metrics=run.last_row,
                          state=run.callbacks.state)


def _set_up(args: DinoTrainingArguments, clock: Callable[[], float], inputs: TrainingInputs) -> _Run:
    """Lock the output folder, build every component (bad input fails here, before anything in the
    folder is changed), then restore the checkpoint to resume from, if any."""
    recorded = read_json(RunFolder(args.output_dir).training_args) if args.resume_from_checkpoint else {}
    precision = choose_precision(args, training_device(), recorded.get("resolved_mixed_precision"))
    accelerator = build_accelerator(args, precision.mixed_precision)
    configure_output(accelerator.is_main_process)
    if precision.warning and accelerator.is_main_process:
        logger.warning(precision.warning)
    if args.push_to_hub and accelerator.is_main_process:
        check_push_target(args.hub_model_id)  # before hours of training, not after
    folder = RunFolder(args.output_dir)
    # Before anything in the folder is read for resuming or deleted: no other run may prune, overwrite
    # or append to it meanwhile.
    lock = acquire_run_lock(folder.root, accelerator)
    try:
        return _build_run(args, clock, precision, accelerator, folder, lock, inputs, recorded)
    except BaseException:
        lock.release()
        raise


def _build_run(args: DinoTrainingArguments, clock: Callable[[], float], precision: PrecisionChoice, accelerator: Accelerator,
               folder: RunFolder, lock: RunLock, inputs: TrainingInputs, recorded: dict[str, Any]) -> _Run:
    """`_set_up` once the output folder is locked; ``recorded``: the ``training_args.json`` of a run being resumed."""
    resume_path = resolve_resume_checkpoint(args.resume_from_checkpoint, args.output_dir, accelerator)
    set_seed(args.seed)
    teacher, teacher_facts = open_distillation_teacher(args, resume_path is not None, recorded)
    model = build_model(args, None if teacher is None else teacher.embedding_size)
    loader = open_training_data(args, accelerator, dataset=inputs.train_dataset)
    machine = MachineSettings(
        device=str(accelerator.device),
        cpu=describe_cpu().describe(),
        cores_per_process=cores_per_process(accelerator.num_processes),
        precision=precision,
        num_workers=loader.num_workers,
        num_threads=set_compute_threads(args, accelerator, loader.num_workers),
    )
    if teacher is not None:
        teacher = attach_distillation_teacher(teacher, model.config, accelerator.device, args,
                                              precision.mixed_precision)
    augment = build_device_augmentation(args, accelerator.device, accelerator.process_index)
    masks = build_mask_sampler(args, model.config, accelerator.process_index)
    continued = starts_from_backbone(args)
    knn_monitor = build_knn_monitor(args, num_workers=loader.num_workers,
                                    image_processor=model.config.backbone_image_processor, dataset=inputs.eval_dataset)
    run_length = dataclasses.replace(args.run_length(), evaluates=knn_monitor is not None)
    plan = plan_steps(run_length, loader.num_examples, accelerator.num_processes, continued=continued)
    if resume_path is not None and accelerator.is_main_process:
        warning = resumed_learning_rate_warning(recorded, plan.learning_rate)
        if warning:
            logger.warning(warning)
    schedules = build_schedules(args, plan)
    _prepare_output_dir(args, accelerator, folder, resuming=resume_path is not None)

    model, optimizer = prepare_model_and_optimizer(args, accelerator, model)
    unwrapped = accelerator.unwrap_model(model)
    signals = StopSignals()
    run = _Run(
        args=args, accelerator=accelerator, model=model, unwrapped=unwrapped,
        step_fn=DinoTrainStep(accelerator, model, optimizer, args.gradient_accumulation_steps,
                              args.max_grad_norm, args.clip_mode, distillation_teacher=teacher),
        stream=BatchStream(loader, augment=augment, masks=masks), schedules=schedules, plan=plan, folder=folder,
        metrics=MetricsLog(folder.metrics, accelerator),
        accumulator=MetricsAccumulator(accelerator.device, _metric_keys(unwrapped.config)),
        collapse=CollapseMonitor(unwrapped.config.num_prototypes, args.collapse_warning_steps,
                                 teacher_temperature=args.teacher_temperature,
                                 student_temperature=unwrapped.config.student_temperature,
                                 teacher_momentum=args.teacher_momentum, center_momentum=unwrapped.config.center_momentum,
                                 **_learning_rate_setting(args),
                                 ibot_num_prototypes=(unwrapped.config.ibot_head_num_prototypes
                                                      if unwrapped.config.uses_ibot else None)),
        spikes=GradientSpikeMonitor(args.grad_norm_spike_factor, max_grad_norm=args.max_grad_norm,
                                    **_learning_rate_setting(args), warmup_steps=plan.warmup_steps),
        knn_monitor=knn_monitor, signals=signals, stop=StopAgreement(signals, accelerator.num_processes),
        lock=lock, machine=machine, clock=clock, num_examples_per_process=loader.num_examples, continued=continued,
        run_length=run_length, train_source=_source_name(inputs.train_dataset, args.dataset_name),
        eval_source=_source_name(inputs.eval_dataset, args.eval_dataset_name), teacher_facts=teacher_facts,
        callbacks=CallbackRunner(inputs.callbacks, args, accelerator.is_main_process, accelerator.is_local_main_process),
    )
    rng_state = _restore(run, resume_path) if resume_path is not None else None
    if resume_path is None:
        run.stream.start()
        run.step = _imported_progress_step(run)
    # only now that the checkpoint has loaded: the rows logged after it by the stopped run go
    run.metrics.start(checkpoint_step_of(resume_path))
    _log_plan(run)
    _write_training_args(run)
    if accelerator.log_with:
        accelerator.init_trackers(args.tracker_project_name, config=tracker_config(args, run.plan),
                                  init_kwargs=tracker_init_kwargs(run.tracker_run_id, run.step,
                                                                      resumed=resume_path is not None))
    if rng_state is not None:
        restore_rng_state(rng_state)  # last, so that nothing above shifts the random streams
    return run


def _metric_keys(config: DinoConfig) -> tuple[str, ...]:
    """What the run logs for its objective (:func:`dino_hf.train.metrics.metric_keys`)."""
    terms = tuple(term for term in DISTILLATION_TERMS if getattr(config, f"distillation_{term}_weight") > 0)
    return metric_keys(config.uses_ibot, config.koleo_loss_weight > 0, terms if config.distils else (),
                       dino=config.self_distils)


def _source_name(dataset: Any, name: str | None) -> str | None:
    """How the records name a run's data: the object's description, else the flag's value."""
    return describe_image_source(dataset) if dataset is not None else name


def _imported_progress_step(run: _Run) -> int:
    """The step a run from an imported official DINO checkpoint starts at (its epoch), else 0."""
    if run.args.model_name_or_path is None:
        return 0
    progress = read_json(Path(run.args.model_name_or_path) / PRETRAINING_PROGRESS_NAME)
    epoch = progress.get("epoch")
    if not isinstance(epoch, (int, float)) or epoch <= 0 or not run.plan.calibrated:
        return 0
    step = min(round(epoch * run.plan.steps_per_epoch), run.plan.total_steps - 1)
    logger.info("Continuing the schedules of %s at epoch %g: step %d of %d.", progress.get("source", "the import"),
                epoch, step, run.plan.total_steps)
    return step


def _restore(run: _Run, path: Path) -> dict[str, Any]:
    """Load a checkpoint into the run; returns the RNG state to apply just before training."""
    state, process_state = load_checkpoint(run.accelerator, path, run.stream, model=run.unwrapped,
                                             optimizer=run.step_fn.optimizer)
    if "metrics" in process_state:
        run.accumulator.load_state_dict(process_state["metrics"])
    run.step = int(state["step"])
    run.tracker_run_id = str(state.get("tracker_run_id") or run.tracker_run_id)
    run.last_good_checkpoint = path
    if run.args.max_train_minutes is not None and "plan" in state:
        # A time-budgeted run keeps the plan it calibrated (or calibrates again, with what is left of
        # its budget, when it was stopped during the calibration).
        saved = StepPlan.from_dict(state["plan"])
        run.budget_used_before = float(state.get("training_seconds", 0.0))
        if saved.calibrated:
            run.plan = saved
            run.schedules = build_schedules(run.args, saved)
    elif "plan" in state:
        _warn_if_replanned(run, StepPlan.from_dict(state["plan"]))
    logger.info("Resumed from %s at step %d.", path, run.step)
    return process_state["rng"]


def _warn_if_replanned(run: _Run, saved: StepPlan) -> None:
    """Warn when a resumed run plans another length than the checkpoint's (e.g. --max_steps changed):
    every step-indexed schedule is then stretched or squeezed from the resumed step on."""
    if run.accelerator.is_main_process and saved.total_steps != run.plan.total_steps:
        logger.warning(
            "The checkpoint was planned for %d steps and this run plans %d (--max_steps, --num_train_epochs or the "
            "data changed): the learning-rate, weight-decay, momentum and temperature schedules are re-planned, so "
            "they jump at step %d. Resume with the original length to continue the same run.",
            saved.total_steps, run.plan.total_steps, run.step)


def _training_loop(run: _Run) -> TrainingResult | None:
    """Optimiser steps until the plan's total; returns a result only when stopped by a signal."""
    args, accelerator = run.args, run.accelerator
    progress = run.progress = TrainingProgress(run.plan.total_steps, initial=run.step,
                                               enabled=accelerator.is_local_main_process)
    teacher_seconds = run.step_fn.take_teacher_seconds if run.step_fn.distillation_teacher is not None else None
    window = ThroughputWindow(run.stream, args.per_device_train_batch_size * accelerator.num_processes, teacher_seconds)
    calibration = _start_calibration(run)
    first_step = run.step
    run.loop_started = run.clock()
    if run.plan.calibrated and run.plan.replan_at:  # resumed between re-plans: the window starts here
        run.replan_window = (run.step, run.budget_used(), run.evaluation_seconds_spent)
    _update_callback_state(run)
    run.callbacks.event("on_train_begin", model=run.unwrapped)
    try:
        while run.step < run.plan.total_steps:
            values = run.schedules.at(run.step)
            run.accumulator.add(run.step_fn(run.stream, values, full_backward=calibration is not None))
            run.step += 1
            progress.update(1)
            if run.step == run.plan.freeze_backbone_steps and args.copy_student_head_after_freeze:
                run.unwrapped.copy_student_head_to_teacher()
                logger.info("Head warm-up done at step %d: the backbone trains from now on.", run.step)
            if calibration is not None:
                seconds_per_step = calibration.observe(run.step - first_step)
                if seconds_per_step is not None:
                    _plan_time_budget(run, seconds_per_step)
                    calibration = None
                    progress.set_total(run.plan.total_steps)
            elif run.plan.replan_at and run.step == run.plan.replan_at[0]:
                _replan_time_budget(run)
                progress.set_total(run.plan.total_steps)
            # One process stops at once; several stop together one step after the signal.
            stop_now = run.stop.should_stop()
            if run.step % args.logging_steps == 0 or run.step == run.plan.total_steps:
                _log_step(run, values, window.measure())
            if args.eval_steps and run.step % args.eval_steps == 0 and run.step < run.plan.total_steps:
                _evaluate(run)
            stop_asked, save_asked = _callbacks_after_step(run)
            if run.step % args.checkpointing_steps == 0 or stop_now or save_asked:
                _checkpoint(run, stop_now)
            if stop_now:
                return _interrupted(run)
            if stop_asked:
                logger.info("A callback stopped the run at step %d of %d: checkpoint, evaluation and export follow.",
                            run.step, run.plan.total_steps)
                break
    finally:
        progress.close()
    return None


def _update_callback_state(run: _Run) -> None:
    run.callbacks.update_state(run.step, run.plan.total_steps, run.plan.steps_per_epoch)


def _callbacks_after_step(run: _Run) -> tuple[bool, bool]:
    """``on_step_end``; whether the callbacks asked to stop and to save now (agreed by every process)."""
    if not run.callbacks:
        return False, False
    _update_callback_state(run)
    control = run.callbacks.event("on_step_end", model=run.unwrapped)
    stop_asked = run.stop.agree(bool(control.should_training_stop))
    save_asked = run.stop.agree(bool(control.should_save))
    control.should_save = False
    return stop_asked, save_asked


def _start_calibration(run: _Run) -> BudgetCalibration | None:
    """The calibration of a ``--max_train_minutes`` run whose plan is still provisional, else None."""
    if run.plan.calibrated:
        return None
    synchronize = torch.cuda.synchronize if run.accelerator.device.type == "cuda" else None
    remaining = run.plan.time_budget_seconds - run.budget_used_before
    calibration = BudgetCalibration(remaining, clock=run.clock, synchronize=synchronize)
    if run.accelerator.num_processes > 1:
        # every process must end its calibration at the same step: a fixed window, no time condition
        calibration.min_timed_seconds = 0.0
    logger.info("Time budget %.1f min: calibrating the step time over the first steps.", remaining / 60)
    return calibration


def _plan_time_budget(run: _Run, seconds_per_step: float) -> None:
    """Replace the provisional plan by the one the measured step (and evaluation) time allows.

    With evaluation on, one evaluation runs now (a point of the learning curve) and is timed. The
    figures are the slowest process's, so that every process plans the same steps.
    """
    evaluation_seconds = 0.0
    if run.knn_monitor is not None:
        started = run.clock()
        _evaluate(run)
        evaluation_seconds = run.clock() - started
    measured = torch.tensor([seconds_per_step, evaluation_seconds, run.budget_used()], dtype=torch.float64,
                            device=run.accelerator.device)
    if run.accelerator.num_processes > 1:
        measured = run.accelerator.gather(measured.unsqueeze(0)).amax(dim=0)
    seconds_per_step, evaluation_seconds, used = measured.tolist()
    run.plan = plan_for_time_budget(run.run_length, run.num_examples_per_process, run.accelerator.num_processes,
                                    elapsed_seconds=used, steps_done=run.step, seconds_per_step=seconds_per_step,
                                    evaluation_seconds=evaluation_seconds, continued=run.continued)
    run.schedules = build_schedules(run.args, run.plan)
    run.replan_window = (run.step, run.budget_used(), run.evaluation_seconds_spent)
    if 0 < run.plan.freeze_backbone_steps <= run.step and run.args.copy_student_head_after_freeze:
        run.unwrapped.copy_student_head_to_teacher()  # a budget so short that the warm-up ended in the calibration
    logger.info("Calibrated: %.3g s per step%s; %.1f of %.1f min used: planning %d steps in all.",
                seconds_per_step, f", {evaluation_seconds:.1f} s per evaluation" if run.knn_monitor else "",
                used / 60, run.plan.time_budget_seconds / 60, run.plan.total_steps)
    _log_plan(run)
    _write_training_args(run)


def _replan_time_budget(run: _Run) -> None:
    """Fit the plan to what is left of the budget again, from the step time since the last plan
    (evaluations apart; checkpoints included): a step time that moved since the calibration still
    ends the run within its budget. The slowest process's figures decide, as for the calibration."""
    start_step, start_used, start_evaluations = run.replan_window
    used = run.budget_used()
    loop_seconds = (used - start_used) - (run.evaluation_seconds_spent - start_evaluations)
    measured = torch.tensor([loop_seconds / max(run.step - start_step, 1), used], dtype=torch.float64,
                            device=run.accelerator.device)
    if run.accelerator.num_processes > 1:
        measured = run.accelerator.gather(measured.unsqueeze(0)).amax(dim=0)
    seconds_per_step, used = measured.tolist()
    previous = run.plan
    run.plan = plan_for_time_budget(run.run_length, run.num_examples_per_process, run.accelerator.num_processes,
                                    elapsed_seconds=used, steps_done=run.step, seconds_per_step=seconds_per_step,
                                    evaluation_seconds=previous.evaluation_seconds or 0.0, continued=run.continued,
                                    replanning=previous)
    run.schedules = build_schedules(run.args, run.plan)
    run.replan_window = (run.step, used, run.evaluation_seconds_spent)
    if (run.plan.freeze_backbone_steps <= run.step < previous.freeze_backbone_steps
            and run.args.copy_student_head_after_freeze):
        run.unwrapped.copy_student_head_to_teacher()  # the new plan ends the head warm-up before this step
    logger.info("Re-planned at step %d (%d of %d): %.3g s per step since the last plan, %.1f of %.1f min used: "
                "%d steps in all (was %d).", run.step, run.plan.replans, len(REPLAN_FRACTIONS), seconds_per_step,
                used / 60, run.plan.time_budget_seconds / 60, run.plan.total_steps, previous.total_steps)
    _write_training_args(run)


def _log_step(run: _Run, values: ScheduleValues, timing: dict[str, float]) -> None:
    """Write one metrics row; check non-finite runs, collapse and gradient spikes (the one place where
    the loop reads values back from the device)."""
    accelerator = run.accelerator
    row_values = run.accumulator.flush(accelerator)
    longest = row_values.pop("longest_nonfinite_run")
    row: dict[str, Any] = {
        "step": run.step,
        "epoch": round(run.step / run.plan.steps_per_epoch, 4),
        **{key: row_values[key] for key in (*run.accumulator.keys, "grad_norm_max")},
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
    run.callbacks.log(row, model=run.unwrapped)
    if run.progress is not None:
        loss = row["loss"] if math.isfinite(row["loss"]) else None
        run.progress.log_step(loss, values.learning_rate, row["images_per_second"])
    if row["nonfinite_steps"]:
        logger.warning("%d of the last optimiser steps had a non-finite loss or gradient and were skipped.",
                       row["nonfinite_steps"])
    _check_nonfinite(run, longest)
    for monitor in (run.collapse, run.spikes):
        warning = monitor.update(run.step, row)
        if warning and accelerator.is_main_process:
            logger.warning(warning)


def _learning_rate_setting(args: DinoTrainingArguments) -> dict[str, Any]:
    """The learning-rate flag the run set and its value, for the remedies the monitors name: ``--learning_rate``
    (absolute) when given, else ``--base_learning_rate`` (per 256 images)."""
    if args.learning_rate is not None:
        return {"learning_rate": args.learning_rate, "learning_rate_flag": "--learning_rate"}
    return {"learning_rate": args.base_learning_rate, "learning_rate_flag": "--base_learning_rate"}


def _check_nonfinite(run: _Run, longest_run: int) -> None:
    limit = run.args.max_consecutive_nonfinite_steps
    if longest_run >= limit:
        where = f"the last good checkpoint is {run.last_good_checkpoint}" if run.last_good_checkpoint else "no checkpoint was written"
        raise NonFiniteLossError(
            f"Stopped at step {run.step}: {longest_run} optimiser steps in a row had a non-finite loss or gradient "
            f"(limit --max_consecutive_nonfinite_steps {limit}); {where}; try a lower "
            f"{_learning_rate_setting(run.args)['learning_rate_flag']}, a smaller --max_grad_norm or --mixed_precision bf16/no."
        )


def _checkpoint(run: _Run, forced: bool) -> None:
    """Save a checkpoint unless the current steps are being skipped (keep the last good one)."""
    current, longest = run.accumulator.nonfinite_run_lengths()
    _check_nonfinite(run, longest)
    if current > 0 and not forced:
        logger.warning("Not saving a checkpoint at step %d: the last %d steps were skipped as non-finite.",
                       run.step, current)
        return
    training_state = {"epoch": run.stream.epoch, "plan": run.plan.to_dict(), "training_seconds": run.budget_used(),
                      "tracker_run_id": run.tracker_run_id}
    path = save_checkpoint(run.accelerator, run.folder.root, run.step, run.stream,
                           training_state, run.args.checkpoints_total_limit,
                           process_extras={"metrics": run.accumulator.state_dict()})
    run.last_good_checkpoint = path
    logger.info("Saved checkpoint %s.", path)
    run.callbacks.event("on_save", model=run.unwrapped, checkpoint=path)
    if run.args.push_to_hub and run.args.hub_strategy == "checkpoint":
        _export_and_push(run, f"Checkpoint at step {run.step}")


def _interrupted(run: _Run) -> TrainingResult:
    command = resume_command(sys.argv) if sys.argv and sys.argv[0] else "scripts/train.py ... --resume_from_checkpoint latest"
    command = scrub_secrets(command, get_token())  # a token given as an argument value is not printed
    if run.accelerator.is_main_process:
        sys.stderr.write(
            f"Stopped by {run.signals.received} at step {run.step}; checkpoint saved to {run.last_good_checkpoint}. "
            f"Resume with the same launcher (python, accelerate launch or torchrun) and: {command}\n"
        )
    run.accelerator.end_training()
    return TrainingResult(model=run.unwrapped, step=run.step, output_dir=run.folder.root,
                          interrupted_by=run.signals.received, checkpoint=run.last_good_checkpoint,
                          last_metrics=run.last_row, state=run.callbacks.state)


def _evaluate(run: _Run) -> dict[str, float]:
    if run.knn_monitor is None:
        return {}
    started = run.clock()
    metrics = run.knn_monitor.evaluate(run.unwrapped.teacher.backbone, run.accelerator)
    if run.accelerator.is_main_process:
        _save_attention_snapshot(run)
    run.model.train()
    run.metrics.write({"step": run.step, **metrics})
    run.callbacks.log({"step": run.step, **metrics}, model=run.unwrapped)
    run.callbacks.event("on_evaluate", model=run.unwrapped, metrics=dict(metrics))
    logger.info("Step %d k-NN evaluation: %s", run.step,
                ", ".join(f"{key} {value:.4f}" for key, value in metrics.items()))
    run.evaluation_seconds_spent += run.clock() - started
    return metrics


def _save_attention_snapshot(run: _Run) -> None:
    """Teacher attention of a few fixed eval images: ``output_dir/attention/step_N/`` and the trackers.

    A failure here (e.g. an exotic backbone without attention weights) is logged, never fatal.
    """
    output_dir = run.folder.attention(run.step)
    try:
        grids = run.knn_monitor.attention_snapshot(run.unwrapped.teacher.backbone, output_dir)
    except Exception as error:  # noqa: BLE001 - visualisation must not stop training
        logger.warning("Could not draw attention maps at step %d: %s", run.step, error)
        return
    log_images(run.accelerator.trackers, "attention", grids, run.step)


def _finish(run: _Run) -> None:
    """Final checkpoint, evaluation, exports, plot and push."""
    accelerator = run.accelerator
    if not is_complete_checkpoint(checkpoint_path(run.folder.root, run.step)):
        _checkpoint(run, forced=False)
    eval_metrics = _evaluate(run)
    pushed = True
    model = _consolidated_model(run)  # a collective under FSDP
    if accelerator.is_main_process:
        try:
            model.save_pretrained(run.folder.root)
            model.save_backbone(run.folder.backbone, image_size=run.args.global_crop_size)
            _write_training_args(run, final=True)
            if eval_metrics:
                results = {"step": run.step, **eval_metrics, "eval_dataset_name": run.eval_source,
                           "eval_split": run.args.eval_split, "eval_train_split": run.args.eval_train_split}
                run.folder.eval_results.write_text(json.dumps(portable_paths(results), indent=2) + "\n")
        except Exception as error:  # noqa: BLE001 - safetensors and torch wrap the OS error in their own
            raise RunError(describe_os_error(
                error, run.folder.root, "writing the final model",
                f"the final checkpoint {run.last_good_checkpoint} is complete: rerun with --resume_from_checkpoint "
                "latest to write the model again")) from None
        _plot(run)
        _write_cards(run)
        if run.args.push_to_hub:
            pushed = _push(run, f"End of training (step {run.step})", final=True)
        logger.info("Wrote the model to %s and the teacher backbone to %s.", run.folder.root, run.folder.backbone)
    accelerator.wait_for_everyone()
    _update_callback_state(run)
    run.callbacks.event("on_train_end", model=run.unwrapped)
    accelerator.end_training()
    if not pushed:
        # the last line the user sees: the model is safe on disk, the Hub does not have it
        logger.warning(
            "Training finished, but the final push to %s failed (see above) and will not be retried: push the run "
            "with python scripts/push_to_hub.py --model_dir %s --repo_id %s.",
            run.args.hub_model_id, shlex.quote(str(run.folder.root)), shlex.quote(str(run.args.hub_model_id)))


def _plot(run: _Run) -> None:
    try:
        plot_training_curves(run.folder.metrics, run.folder.training_curves, run.unwrapped.config.num_prototypes)
    except Exception as error:  # noqa: BLE001 - a plot must never fail a finished run
        logger.warning("Could not plot the training curves: %s", error)


def _write_cards(run: _Run) -> None:
    """The model card of the export, in ``backbone/README.md`` and the run folder's ``README.md``."""
    try:
        write_run_cards(run.folder.root, run.args.hub_model_id if run.args.push_to_hub else None)
    except Exception as error:  # noqa: BLE001 - a card must never fail a finished run
        logger.warning("Could not write the model card: %s", error)


def _consolidated_model(run: _Run) -> DinoForPreTraining | None:
    """The model to export: the unwrapped one, or under FSDP a copy on the main process's CPU with the
    full weights gathered from the shards (all processes must call this; the others get ``None``)."""
    if run.accelerator.distributed_type != DistributedType.FSDP:
        return run.unwrapped
    state = run.accelerator.get_state_dict(run.model)  # a collective: full tensors on the main process
    if not run.accelerator.is_main_process:
        return None
    model = DinoForPreTraining(run.unwrapped.config)
    model.load_state_dict(state)
    return model


def _export_and_push(run: _Run, message: str) -> None:
    model = _consolidated_model(run)
    if run.accelerator.is_main_process:
        model.save_backbone(run.folder.backbone, image_size=run.args.global_crop_size)
        _write_training_args(run)
        _push(run, message)
    run.accelerator.wait_for_everyone()


def _push(run: _Run, message: str, final: bool = False) -> bool:
    """Push the run to ``--hub_model_id``; False (after a warning) when it failed."""
    return try_push_training_output(run.folder.root, run.args.hub_model_id, private=run.args.hub_private_repo,
                                    commit_message=message, retried=not final)


# ------------------------------------------------------------------------------- setup helpers
def _prepare_output_dir(args: DinoTrainingArguments, accelerator: Accelerator, folder: RunFolder, resuming: bool) -> None:
    """Refuse to start afresh over an earlier run's checkpoints unless told to overwrite them."""
    output_dir = folder.root
    has_checkpoints = bool(list_checkpoints(output_dir))
    if has_checkpoints and not resuming and args.resume_from_checkpoint is None and not args.overwrite_output_dir:
        raise ValueError(
            f"--output_dir {output_dir} already holds checkpoints of an earlier run: pass --resume_from_checkpoint "
            "latest to continue it or --overwrite_output_dir to start over."
        )
    if accelerator.is_main_process:
        # this run holds the folder's lock: no live run's checkpoints or save in progress is deleted here
        try:
            remove_leftovers(output_dir)
            if args.overwrite_output_dir:
                discard_folder(folder.checkpoints)
        except OSError as error:
            raise RunError(describe_os_error(error, folder.checkpoints, "clearing the earlier checkpoints", "")) from None
    accelerator.wait_for_everyone()


def _log_plan(run: _Run) -> None:
    log_plan(run.plan, run.args, run.accelerator, run.machine, run.unwrapped)


def _write_training_args(run: _Run, final: bool = False) -> None:
    write_training_args(run.folder, run.args, run.plan, run.accelerator, run.machine,
                        data={"train_data": run.train_source, "eval_data": run.eval_source, **run.teacher_facts},
                        runtime_seconds=time.perf_counter() - run.started if final else None)

"""The step plan: the arguments' run length (epochs, steps or a time budget), the data size and the
process count -> every step count of the run, once.

:class:`RunLength` is the part of ``DinoTrainingArguments`` the plan reads
(``DinoTrainingArguments.run_length()``), so the plan does not depend on the arguments class. A
time-budgeted run (``--max_train_minutes``) starts on a provisional plan, measures its step time
(:class:`BudgetCalibration`) and then fits the plan to the budget (:func:`plan_for_time_budget`).

A run shorter than the recipe's nominal one (``--num_train_epochs``, else the official 100 epochs),
because ``--max_steps`` or a time budget cut it, keeps the recipe's proportions: each phase given in
epochs (learning-rate and teacher-temperature warm-ups, last-layer freeze, head warm-up) takes the
same share of the run as of the nominal run, instead of its epochs covering most or all of the run
(:attr:`StepPlan.scaled_phases`, :func:`scaling_note`). Explicit ``--*_steps`` are obeyed.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from dino_hf.base.official_recipe import OFFICIAL_NUM_TRAIN_EPOCHS


@dataclass(frozen=True)
class RunLength:
    """What the arguments say about the run's length, batch and epoch-denominated phases.

    ``*_steps`` values are explicit step counts (``None``: derived from the matching ``*_epochs``). No
    field has a default: the arguments' defaults are the only ones.
    """

    per_device_train_batch_size: int
    gradient_accumulation_steps: int
    base_learning_rate: float  # per 256 images
    learning_rate: float | None  # absolute: replaces the scaled base rate when given
    num_train_epochs: float | None
    max_steps: int | None
    max_train_minutes: float | None
    warmup_steps: int | None
    warmup_epochs: float
    warmup_teacher_temperature_steps: int | None
    warmup_teacher_temperature_epochs: float
    freeze_last_layer_steps: int | None
    freeze_last_layer_epochs: float
    freeze_backbone_steps: int | None
    freeze_backbone_epochs: float | None
    eval_steps: int | None
    evaluates: bool  # an eval set is given (a final evaluation ends the run)

    def global_batch_size(self, num_processes: int) -> int:
        """Source images per optimiser step over all processes and accumulation micro-steps."""
        return self.per_device_train_batch_size * self.gradient_accumulation_steps * num_processes

    def scaled_learning_rate(self, num_processes: int) -> float:
        """The peak learning rate: ``learning_rate`` when given (absolute), else the linear scaling rule,
        ``base_learning_rate * global batch / 256``."""
        if self.learning_rate is not None:
            return self.learning_rate
        return self.base_learning_rate * self.global_batch_size(num_processes) / 256.0


#: Total steps of the provisional plan a time-budgeted run uses while it calibrates: only its first
#: steps are ever used, and a cosine over this many steps is flat there (so they train at the
#: schedules' start values).
PROVISIONAL_TOTAL_STEPS = 10**9


@dataclass(frozen=True)
class StepPlan:
    """Run-dependent values derived once from the arguments, the data size and the process count.

    Epoch-denominated settings are converted with `steps_per_epoch`: the optimiser steps in one
    pass over the data when its size is known, else ``total_steps / num_train_epochs``. A
    time-budgeted run (``--max_train_minutes``) first runs on a provisional plan (``calibrated`` false)
    and then on the one :func:`plan_for_time_budget` computes from its measurements.
    """

    num_processes: int
    global_batch_size: int
    learning_rate: float  # batch-scaled peak learning rate
    steps_per_epoch: float
    total_steps: int
    warmup_steps: int
    warmup_teacher_temperature_steps: int
    freeze_last_layer_steps: int
    dataset_size_known: bool
    freeze_backbone_steps: int = 0
    calibrated: bool = True
    time_budget_seconds: float | None = None
    seconds_per_step: float | None = None  # measured by the calibration
    evaluation_seconds: float | None = None  # measured by the calibration (0 without evaluation)
    calibration_steps: int | None = None  # steps made when the plan was computed
    calibration_seconds: float | None = None  # budget used when the plan was computed
    #: The recipe's nominal run in epochs (``--num_train_epochs``, else the official 100) that
    #: epoch-denominated phases are a share of (None in plans saved before it was recorded).
    nominal_epochs: float | None = None
    #: The step-count fields (``"warmup_steps"``...) that a run shorter than the nominal one scaled
    #: to their share of it, and the epochs each was given in (same order); empty when none was.
    scaled_phases: tuple[str, ...] = ()
    scaled_phase_epochs: tuple[float, ...] = ()
    #: A time-budgeted run's later re-plans: the steps at which it measures its step time again and
    #: fits the plan to what is left of the budget (:data:`REPLAN_FRACTIONS`), and how many it made.
    replan_at: tuple[int, ...] = ()
    replans: int = 0
    replanned_seconds_per_step: float | None = None  # measured by the last re-plan

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> StepPlan:
        """The plan saved with a checkpoint (unknown keys ignored, missing optional ones defaulted;
        JSON's lists back to tuples)."""
        names = {field.name for field in dataclasses.fields(cls)}
        return cls(**{key: tuple(value) if isinstance(value, list) else value
                      for key, value in values.items() if key in names})


#: What :func:`scaling_note` calls each phase a short run may scale (StepPlan field -> words).
PHASE_NAMES = {
    "warmup_steps": "the learning-rate warm-up",
    "warmup_teacher_temperature_steps": "the teacher-temperature warm-up",
    "freeze_last_layer_steps": "the last-layer freeze",
    "freeze_backbone_steps": "the head warm-up",
}


def scaling_note(plan: StepPlan) -> str | None:
    """One sentence saying which epoch-denominated phases a run shorter than the recipe's nominal
    run scaled to their share of it (None when none was): for the log."""
    if not plan.scaled_phases or plan.nominal_epochs is None:
        return None
    phases = [
        f"{PHASE_NAMES.get(name, name)} {epochs:g} epoch{'' if epochs == 1 else 's'} -> "
        f"{getattr(plan, name)} step{'' if getattr(plan, name) == 1 else 's'}"
        for name, epochs in zip(plan.scaled_phases, plan.scaled_phase_epochs, strict=False)
    ]
    listed = phases[0] if len(phases) == 1 else ", ".join(phases[:-1]) + " and " + phases[-1]
    nominal_steps = plan.nominal_epochs * plan.steps_per_epoch
    return (
        f"The run is shorter than the recipe's {plan.nominal_epochs:g} epochs ({plan.total_steps} of "
        f"{nominal_steps:.0f} steps): {listed} {'keeps its' if len(phases) == 1 else 'keep their'} share of it."
    )


def plan_steps(
    run_length: RunLength,
    num_examples_per_process: int | None,
    num_processes: int,
    total_steps: int | None = None,
    continued: bool = False,
) -> StepPlan:
    """Compute the batch-scaled learning rate and every step count of the run.

    Args:
        run_length: the arguments' run length (``DinoTrainingArguments.run_length()``).
        num_examples_per_process: images one process sees per epoch (`DinoDataLoader.num_examples`),
            or None for a stream of unknown length.
        num_processes: number of training processes.
        total_steps: the run's length when already decided (a time budget's plan); by default it
            comes from ``--max_steps`` or ``--num_train_epochs``, and a ``--max_train_minutes`` run
            gets a provisional plan (``calibrated`` false) to start its calibration with.
        continued: the run starts from a pretrained backbone with fresh heads (continued
            pre-training), which sets the default of the head warm-up (``--freeze_backbone_*``).

    A phase given in epochs counts ``epochs * steps_per_epoch`` steps, except in a run shorter than
    the nominal one (``total_steps < nominal_epochs * steps_per_epoch``, a ``--max_steps`` or time
    budget that cuts the recipe short) in which some phase's epochs would cover the whole run: there
    every phase given in epochs counts ``round(epochs / nominal_epochs * total_steps)``, its share of
    the nominal run (recorded in ``scaled_phases``). A stream of unknown
    length is already proportional (its epoch is ``total_steps / num_train_epochs``), and the
    provisional plan of a calibrating run keeps the epochs' steps (only its first steps are used).

    Raises:
        ValueError: with one sentence naming the flag, when the run length cannot be determined.
    """
    micro_batch = run_length.per_device_train_batch_size
    num_train_epochs = run_length.num_train_epochs if run_length.num_train_epochs is not None else OFFICIAL_NUM_TRAIN_EPOCHS
    budgeted = run_length.max_train_minutes is not None
    if total_steps is None:
        if budgeted:
            total_steps = PROVISIONAL_TOTAL_STEPS
        elif run_length.max_steps is not None:
            total_steps = run_length.max_steps
    if num_examples_per_process is not None:
        steps_per_epoch = float(num_examples_per_process // (micro_batch * run_length.gradient_accumulation_steps))
        _check(
            steps_per_epoch >= 1,
            f"The dataset has only {num_examples_per_process} images per process, fewer than one optimiser step "
            f"needs: lower --per_device_train_batch_size or --gradient_accumulation_steps.",
        )
    else:
        _check(
            total_steps is not None,
            "The dataset is a stream of unknown length, so --num_train_epochs cannot be converted to "
            "steps: pass --max_steps or --max_train_minutes.",
        )
        steps_per_epoch = total_steps / num_train_epochs
    if total_steps is None:
        total_steps = math.ceil(num_train_epochs * steps_per_epoch)
    calibrated = not (budgeted and total_steps == PROVISIONAL_TOTAL_STEPS)
    # A run cut short of the nominal one, so short that a phase given in epochs would cover all of it:
    # then every epoch-denominated phase keeps its share of the nominal run instead. (A phase that fits,
    # e.g. the demo recipe's 0.1-epoch warm-up, keeps its epochs.)
    epoch_phases = [(run_length.warmup_steps, run_length.warmup_epochs),
                    (run_length.warmup_teacher_temperature_steps, run_length.warmup_teacher_temperature_epochs),
                    (run_length.freeze_last_layer_steps, run_length.freeze_last_layer_epochs),
                    (run_length.freeze_backbone_steps, run_length.freeze_backbone_epochs)]
    covers_the_run = any(explicit is None and epochs and round(epochs * steps_per_epoch) >= total_steps
                         for explicit, epochs in epoch_phases)
    shortened = (num_examples_per_process is not None and calibrated and covers_the_run
                 and total_steps < num_train_epochs * steps_per_epoch)
    scaled: dict[str, float] = {}

    def epoch_steps(name: str, epochs: float) -> int:
        """The steps of a phase given in epochs: its epochs' steps, or its share of a shortened run."""
        if shortened and epochs > 0:
            scaled[name] = epochs
            return round(epochs / num_train_epochs * total_steps)
        return round(epochs * steps_per_epoch)

    def steps(name: str, explicit: int | None, epochs: float) -> int:
        """Explicit step counts must fit in the run; epoch-derived ones are capped at its length."""
        if explicit is not None:
            if budgeted:  # the budget decides the length: the warm-up takes what fits
                return min(explicit, int(total_steps))
            _check(
                explicit <= total_steps,
                f"--{name} ({explicit}) exceeds the run's {total_steps} optimiser steps.",
            )
            return explicit
        return min(epoch_steps(name, epochs), int(total_steps))

    warmup_steps = steps("warmup_steps", run_length.warmup_steps, run_length.warmup_epochs)
    warmup_teacher_temperature_steps = steps(
        "warmup_teacher_temperature_steps",
        run_length.warmup_teacher_temperature_steps,
        run_length.warmup_teacher_temperature_epochs,
    )
    freeze_last_layer_steps = steps(
        "freeze_last_layer_steps", run_length.freeze_last_layer_steps, run_length.freeze_last_layer_epochs
    )
    freeze_backbone_steps = _freeze_backbone_steps(run_length, int(total_steps), epoch_steps, continued)
    return StepPlan(
        num_processes=num_processes,
        global_batch_size=run_length.global_batch_size(num_processes),
        learning_rate=run_length.scaled_learning_rate(num_processes),
        steps_per_epoch=steps_per_epoch,
        total_steps=int(total_steps),
        warmup_steps=warmup_steps,
        warmup_teacher_temperature_steps=warmup_teacher_temperature_steps,
        freeze_last_layer_steps=freeze_last_layer_steps,
        dataset_size_known=num_examples_per_process is not None,
        freeze_backbone_steps=freeze_backbone_steps,
        calibrated=calibrated,
        time_budget_seconds=run_length.max_train_minutes * 60.0 if budgeted else None,
        nominal_epochs=float(num_train_epochs),
        scaled_phases=tuple(scaled),
        scaled_phase_epochs=tuple(float(epochs) for epochs in scaled.values()),
    )


#: The head warm-up of continued pre-training when --freeze_backbone_steps/epochs are unset: this
#: share of the run trains the fresh heads on the frozen backbone (chosen by measurement,
#: the `continued_pretraining` rows of benchmarks/RESULTS.md).
CONTINUED_FREEZE_BACKBONE_FRACTION = 0.1


def _freeze_backbone_steps(
    run_length: RunLength, total_steps: int, epoch_steps: Callable[[str, float], int], continued: bool
) -> int:
    """The head warm-up: the flags' value (``epoch_steps`` converts epochs), else
    :data:`CONTINUED_FREEZE_BACKBONE_FRACTION` of a continued run and none from scratch."""
    if run_length.freeze_backbone_steps is None and run_length.freeze_backbone_epochs is None:
        return round(CONTINUED_FREEZE_BACKBONE_FRACTION * total_steps) if continued else 0
    if run_length.freeze_backbone_steps is not None:
        frozen = run_length.freeze_backbone_steps
    else:
        frozen = epoch_steps("freeze_backbone_steps", run_length.freeze_backbone_epochs)
    if run_length.max_train_minutes is not None:  # the budget decides the length: keep a step to train the backbone
        return min(frozen, max(total_steps - 1, 0))
    flag = "--freeze_backbone_steps" if run_length.freeze_backbone_steps is not None else "--freeze_backbone_epochs"
    _check(
        frozen < total_steps or frozen == 0,
        f"{flag} freezes the backbone for {frozen} of the run's {total_steps} optimiser steps, so it would never "
        "train: give a warm-up shorter than the run.",
    )
    return frozen


class BudgetCalibration:
    """Measures the seconds per optimiser step of a time-budgeted run, from its first steps.

    The first ``warmup_steps`` steps (allocation, first batches, kernel selection) are not timed. Then
    the steps are timed until there are at least ``min_timed_steps`` of them over at least
    ``min_timed_seconds``, or at least 3 of them over three times that (slow steps); the figure is the
    mean over that window. ``clock`` is the time source (``time.perf_counter``; tests pass a fake one).

    Args:
        time_budget_seconds: the run's budget; the window is at most 2% of it (and at most 10 s).
        warmup_steps, min_timed_steps: see above.
        clock: seconds, monotonic.
        synchronize: called before reading the clock (``torch.cuda.synchronize`` on a GPU, where steps
            are asynchronous).
    """

    def __init__(
        self,
        time_budget_seconds: float,
        warmup_steps: int = 5,
        min_timed_steps: int = 20,
        clock: Callable[[], float] = time.perf_counter,
        synchronize: Callable[[], None] | None = None,
    ) -> None:
        self.warmup_steps = warmup_steps
        self.min_timed_steps = min_timed_steps
        self.min_timed_seconds = min(10.0, 0.02 * time_budget_seconds)
        self.clock = clock
        self.synchronize = synchronize
        self._started_at: float | None = None
        self._timed_steps = 0

    def observe(self, steps_done: int) -> float | None:
        """Call after each optimiser step (``steps_done`` since this process started); the seconds
        per step once the window is complete, else ``None``."""
        if steps_done < self.warmup_steps:
            return None
        if self.synchronize is not None:
            self.synchronize()
        now = self.clock()
        if self._started_at is None:
            self._started_at = now
            return None
        self._timed_steps += 1
        seconds = now - self._started_at
        enough = self._timed_steps >= self.min_timed_steps and seconds >= self.min_timed_seconds
        slow = self._timed_steps >= 3 and seconds >= 3 * self.min_timed_seconds
        return seconds / self._timed_steps if enough or slow else None


#: Share of the remaining budget the plan may fill: the rest absorbs the noise of a shared machine.
TIME_BUDGET_MARGIN = 0.03


def steps_for_time_budget(
    remaining_seconds: float,
    steps_done: int,
    seconds_per_step: float,
    evaluation_seconds: float = 0.0,
    eval_steps: int | None = None,
    final_evaluation: bool = False,
) -> int:
    """The largest total step count whose remaining steps and evaluations fit in ``remaining_seconds``.

    The remaining ``total - steps_done`` steps cost ``seconds_per_step`` each; an evaluation costs
    ``evaluation_seconds`` and happens every ``eval_steps`` steps before the last one, plus once at
    the end with ``final_evaluation``. :data:`TIME_BUDGET_MARGIN` of the time is kept free.

    Raises:
        ValueError: not even one more step fits (the budget was used up by the calibration).
    """
    available = remaining_seconds * (1.0 - TIME_BUDGET_MARGIN) - (evaluation_seconds if final_evaluation else 0.0)

    def cost(total: int) -> float:
        evaluations = 0
        if eval_steps:
            evaluations = (total - 1) // eval_steps - steps_done // eval_steps
        return (total - steps_done) * seconds_per_step + max(evaluations, 0) * evaluation_seconds

    per_step = seconds_per_step + (evaluation_seconds / eval_steps if eval_steps else 0.0)
    total = steps_done + int(max(available, 0.0) / max(per_step, 1e-12))
    while total > steps_done and cost(total) > available:
        total -= 1
    while cost(total + 1) <= available:
        total += 1
    if total <= steps_done:
        raise ValueError(
            f"--max_train_minutes leaves no time to train after the calibration ({steps_done} steps, "
            f"{seconds_per_step:.3g} s each): give a longer budget."
        )
    return total


#: Shares of the run after the calibration at which a time-budgeted run re-plans: the step time
#: moves after the first steps (kernels warming up, an evaluation's first call, a machine that slows
#: down or speeds up), so the plan is fitted to the budget again while the cosine schedules are still
#: early enough that a new length hardly moves them, and once more near the end.
REPLAN_FRACTIONS = (0.2, 0.45, 0.7, 0.9)


def plan_for_time_budget(
    run_length: RunLength,
    num_examples_per_process: int | None,
    num_processes: int,
    elapsed_seconds: float,
    steps_done: int,
    seconds_per_step: float,
    evaluation_seconds: float = 0.0,
    continued: bool = False,
    replanning: StepPlan | None = None,
) -> StepPlan:
    """The plan of a ``--max_train_minutes`` run from its measurements: after the calibration, and
    again at each of ``replanning.replan_at`` (the plan being re-planned), whose calibration figures
    are kept.

    Args:
        elapsed_seconds: budget already used (steps, evaluations and checkpoints included).
        steps_done: optimiser steps already made.
        seconds_per_step, evaluation_seconds: what was measured (0 without evaluation).

    A budget already used up ends the run at ``steps_done`` (a re-plan never raises).
    """
    budget = run_length.max_train_minutes * 60.0
    if replanning is not None and replanning.time_budget_seconds is not None:
        budget = replanning.time_budget_seconds  # a resumed run keeps its own budget
    try:
        total_steps = steps_for_time_budget(
            budget - elapsed_seconds,
            steps_done,
            seconds_per_step,
            evaluation_seconds,
            eval_steps=run_length.eval_steps,
            final_evaluation=run_length.evaluates,
        )
    except ValueError:
        if replanning is None:
            raise
        total_steps = max(steps_done, 1)
    plan = plan_steps(run_length, num_examples_per_process, num_processes, total_steps=total_steps, continued=continued)
    plan = dataclasses.replace(plan, calibrated=True, time_budget_seconds=budget, seconds_per_step=seconds_per_step,
                               evaluation_seconds=evaluation_seconds)
    if replanning is None:
        calibration = dataclasses.replace(plan, calibration_steps=steps_done, calibration_seconds=elapsed_seconds)
        return dataclasses.replace(calibration, replan_at=_replan_points(calibration, 0))
    kept = dataclasses.replace(plan, seconds_per_step=replanning.seconds_per_step,
                               replanned_seconds_per_step=seconds_per_step,
                               calibration_steps=replanning.calibration_steps,
                               calibration_seconds=replanning.calibration_seconds, replans=replanning.replans + 1)
    return dataclasses.replace(kept, replan_at=_replan_points(kept, kept.replans, after=steps_done))


def _replan_points(plan: StepPlan, made: int, after: int | None = None) -> tuple[int, ...]:
    """The steps of the re-plans still to come: :data:`REPLAN_FRACTIONS` (less the ``made`` ones) of
    the run between its calibration and its planned end, after step ``after``."""
    start = plan.calibration_steps or 0
    after = start if after is None else after
    points = {start + round(fraction * (plan.total_steps - start)) for fraction in REPLAN_FRACTIONS[made:]}
    return tuple(sorted(point for point in points if after < point < plan.total_steps))


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise ValueError(message)

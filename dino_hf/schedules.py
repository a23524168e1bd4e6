"""Step-indexed schedules of DINO training (learning rate, weight decay, teacher momentum and
temperature, last-layer freeze), in the style of DINOv2's ``CosineScheduler``, and the step plan that
turns epochs, a step count or a time budget into the run's step counts.

Every value is a pure function of the optimiser step, so resuming from a checkpoint only needs the
step counter. Values follow the official implementations exactly: a warmup of ``W`` steps is
``numpy.linspace(start, base, W)`` (it starts at ``start`` and reaches ``base`` on its last step),
then a half cosine runs from ``base`` (first step after warmup) towards ``final`` (reached at
``total_steps``). Steps at or beyond ``total_steps`` return the final values.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # the arguments import this module's defaults: no import at run time
    from .training_args import DinoTrainingArguments

# The official ViT-S/16 recipe (facebookresearch/dino main_dino.py): the defaults of DinoSchedules and
# of the DinoTrainingArguments flags that feed it, written once here.
OFFICIAL_LEARNING_RATE = 5e-4  # per 256 images (scaled by the global batch)
OFFICIAL_MIN_LEARNING_RATE = 1e-6
OFFICIAL_WEIGHT_DECAY = 0.04
OFFICIAL_WEIGHT_DECAY_END = 0.4
OFFICIAL_TEACHER_MOMENTUM = 0.996
OFFICIAL_TEACHER_TEMPERATURE = 0.04  # after the warm-up, and at its start


def cosine_schedule(
    step: int,
    total_steps: int,
    base_value: float,
    final_value: float,
    warmup_steps: int = 0,
    warmup_start_value: float = 0.0,
) -> float:
    """Linear warmup ``warmup_start_value -> base_value``, then cosine ``base_value -> final_value``.

    Args:
        step: optimiser step, >= 0 (steps >= ``total_steps`` give ``final_value``).
        total_steps: length of the schedule, >= 1.
        base_value: value at the end of the warmup and start of the cosine.
        final_value: value the cosine reaches at ``total_steps``.
        warmup_steps: linear warmup length in ``[0, total_steps]``.
        warmup_start_value: value at step 0 when ``warmup_steps > 0``.

    Returns:
        The value at ``step`` (a Python float).
    """
    _check_step(step)
    _check_positive_integer("total_steps", total_steps)
    _check_step_count("warmup_steps", warmup_steps, total_steps)
    if step >= total_steps:
        return float(final_value)
    if step < warmup_steps:
        return linear_warmup_schedule(step, warmup_steps, warmup_start_value, base_value)
    progress = (step - warmup_steps) / (total_steps - warmup_steps)
    return float(
        final_value + 0.5 * (base_value - final_value) * (1.0 + math.cos(math.pi * progress))
    )


def linear_warmup_schedule(
    step: int, warmup_steps: int, start_value: float, end_value: float
) -> float:
    """``start_value`` at step 0, linear to ``end_value`` at step ``warmup_steps - 1``, then constant.

    Args:
        step: optimiser step, >= 0.
        warmup_steps: warmup length, >= 0 (0: always ``end_value``).
        start_value: value at step 0.
        end_value: value from step ``warmup_steps - 1`` on.

    Returns:
        The value at ``step`` (a Python float).
    """
    _check_step(step)
    if not _is_integer(warmup_steps) or warmup_steps < 0:
        raise ValueError(f"warmup_steps must be a non-negative integer, got {warmup_steps!r}.")
    if step >= warmup_steps:
        return float(end_value)
    if warmup_steps == 1:
        return float(start_value)
    fraction = step / (warmup_steps - 1)
    return float(start_value + (end_value - start_value) * fraction)


@dataclass(frozen=True)
class ScheduleValues:
    """All scheduled quantities at one optimiser step."""

    learning_rate: float
    weight_decay: float
    teacher_momentum: float
    teacher_temperature: float
    freeze_last_layer: bool
    freeze_backbone: bool = False


@dataclass(frozen=True)
class DinoSchedules:
    """The DINO schedules, indexed by optimiser step (defaults: the official ViT-S/16 recipe).

    Built from plain numbers (steps, not epochs): the caller converts epochs with its own
    steps-per-epoch and scales the learning rate by the batch size before building this.

    Args:
        total_steps: number of optimiser steps of the run, >= 1.
        learning_rate: peak learning rate, reached at the end of the warmup (official:
            5e-4 x global_batch / 256).
        min_learning_rate: learning rate at the end of the cosine (official 1e-6).
        warmup_steps: linear learning-rate warmup from 0 (official: 10 epochs).
        weight_decay: weight decay at step 0 (official 0.04).
        weight_decay_end: weight decay at the end of the cosine (official 0.4).
        teacher_momentum: EMA momentum at step 0; a cosine takes it to 1.0 (official 0.996).
        teacher_temperature: teacher temperature after its warmup (official 0.04; 0.07 in the
            longer "boost" recipes).
        warmup_teacher_temperature: teacher temperature at step 0 (official 0.04).
        warmup_teacher_temperature_steps: linear teacher-temperature warmup (official: 0 epochs,
            30 epochs in the "boost" recipes).
        freeze_last_layer_steps: the head's last layer receives no update during the first
            this-many steps (official: 1 epoch), which stabilises the start of training.
        freeze_backbone_steps: the student's backbone receives no update during the first this-many
            steps, so that fresh heads learn on a pretrained backbone before it moves (continued
            pre-training); 0 from scratch.
    """

    total_steps: int
    learning_rate: float = OFFICIAL_LEARNING_RATE
    min_learning_rate: float = OFFICIAL_MIN_LEARNING_RATE
    warmup_steps: int = 0
    weight_decay: float = OFFICIAL_WEIGHT_DECAY
    weight_decay_end: float = OFFICIAL_WEIGHT_DECAY_END
    teacher_momentum: float = OFFICIAL_TEACHER_MOMENTUM
    teacher_temperature: float = OFFICIAL_TEACHER_TEMPERATURE
    warmup_teacher_temperature: float = OFFICIAL_TEACHER_TEMPERATURE
    warmup_teacher_temperature_steps: int = 0
    freeze_last_layer_steps: int = 0
    freeze_backbone_steps: int = 0

    def __post_init__(self) -> None:
        _check_positive_integer("total_steps", self.total_steps)
        for name in ("learning_rate", "min_learning_rate", "weight_decay", "weight_decay_end"):
            value = getattr(self, name)
            if not _is_finite_number(value) or value < 0:
                raise ValueError(f"{name} must be a non-negative number, got {value!r}.")
        if not _is_finite_number(self.teacher_momentum) or not 0 <= self.teacher_momentum <= 1:
            raise ValueError(
                f"teacher_momentum must be a number in [0, 1], got {self.teacher_momentum!r}."
            )
        for name in ("teacher_temperature", "warmup_teacher_temperature"):
            value = getattr(self, name)
            if not _is_finite_number(value) or value <= 0:
                raise ValueError(f"{name} must be a positive number, got {value!r}.")
        for name in ("warmup_steps", "warmup_teacher_temperature_steps", "freeze_last_layer_steps",
                     "freeze_backbone_steps"):
            _check_step_count(name, getattr(self, name), self.total_steps)

    def learning_rate_at(self, step: int) -> float:
        """Linear warmup 0 -> ``learning_rate``, then cosine -> ``min_learning_rate``."""
        return cosine_schedule(
            step,
            self.total_steps,
            self.learning_rate,
            self.min_learning_rate,
            warmup_steps=self.warmup_steps,
        )

    def weight_decay_at(self, step: int) -> float:
        """Cosine ``weight_decay`` -> ``weight_decay_end``."""
        return cosine_schedule(step, self.total_steps, self.weight_decay, self.weight_decay_end)

    def teacher_momentum_at(self, step: int) -> float:
        """Cosine ``teacher_momentum`` -> 1.0."""
        return cosine_schedule(step, self.total_steps, self.teacher_momentum, 1.0)

    def teacher_temperature_at(self, step: int) -> float:
        """Linear ``warmup_teacher_temperature`` -> ``teacher_temperature``, then constant."""
        return linear_warmup_schedule(
            step,
            self.warmup_teacher_temperature_steps,
            self.warmup_teacher_temperature,
            self.teacher_temperature,
        )

    def freeze_last_layer_at(self, step: int) -> bool:
        """True while the head's last layer must not be updated (``step < freeze_last_layer_steps``)."""
        _check_step(step)
        return step < self.freeze_last_layer_steps

    def freeze_backbone_at(self, step: int) -> bool:
        """True while the student's backbone must not be updated (``step < freeze_backbone_steps``)."""
        _check_step(step)
        return step < self.freeze_backbone_steps

    def at(self, step: int) -> ScheduleValues:
        """Every scheduled value at optimiser ``step`` (>= 0; clamped to the final values)."""
        return ScheduleValues(
            learning_rate=self.learning_rate_at(step),
            weight_decay=self.weight_decay_at(step),
            teacher_momentum=self.teacher_momentum_at(step),
            teacher_temperature=self.teacher_temperature_at(step),
            freeze_last_layer=self.freeze_last_layer_at(step),
            freeze_backbone=self.freeze_backbone_at(step),
        )


def _is_integer(value: object) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_finite_number(value: object) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)


def _check_step(step: object) -> None:
    if not _is_integer(step) or step < 0:
        raise ValueError(f"step must be a non-negative integer, got {step!r}.")


def _check_positive_integer(name: str, value: object) -> None:
    if not _is_integer(value) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}.")


def _check_step_count(name: str, value: object, total_steps: int) -> None:
    if not _is_integer(value) or not 0 <= value <= total_steps:
        raise ValueError(
            f"{name} must be an integer in [0, total_steps={total_steps}], got {value!r}."
        )


# --------------------------------------------------------------------------------------------------
# The step plan: epochs, steps or a time budget -> every step count of the run
# --------------------------------------------------------------------------------------------------
#: Passes over the data when neither --num_train_epochs, --max_steps nor --max_train_minutes is given
#: (the official short recipe).
DEFAULT_NUM_TRAIN_EPOCHS = 100.0

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

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> StepPlan:
        """The plan saved with a checkpoint (unknown keys ignored, missing optional ones defaulted)."""
        names = {field.name for field in dataclasses.fields(cls)}
        return cls(**{key: value for key, value in values.items() if key in names})


def plan_steps(
    args: DinoTrainingArguments,
    num_examples_per_process: int | None,
    num_processes: int,
    total_steps: int | None = None,
    continued: bool = False,
) -> StepPlan:
    """Compute the batch-scaled learning rate and every step count of the run.

    Args:
        args: parsed arguments.
        num_examples_per_process: images one process sees per epoch (`DinoDataLoader.num_examples`),
            or None for a stream of unknown length.
        num_processes: number of training processes.
        total_steps: the run's length when already decided (a time budget's plan); by default it
            comes from ``--max_steps`` or ``--num_train_epochs``, and a ``--max_train_minutes`` run
            gets a provisional plan (``calibrated`` false) to start its calibration with.
        continued: the run starts from a pretrained backbone with fresh heads (continued
            pre-training), which sets the default of the head warm-up (``--freeze_backbone_*``).

    Raises:
        ValueError: with one sentence naming the flag, when the run length cannot be determined.
    """
    micro_batch = args.per_device_train_batch_size
    num_train_epochs = args.num_train_epochs if args.num_train_epochs is not None else DEFAULT_NUM_TRAIN_EPOCHS
    budgeted = args.max_train_minutes is not None
    if total_steps is None:
        if budgeted:
            total_steps = PROVISIONAL_TOTAL_STEPS
        elif args.max_steps is not None:
            total_steps = args.max_steps
    if num_examples_per_process is not None:
        steps_per_epoch = float(num_examples_per_process // (micro_batch * args.gradient_accumulation_steps))
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
        return min(round(epochs * steps_per_epoch), int(total_steps))

    return StepPlan(
        num_processes=num_processes,
        global_batch_size=args.global_batch_size(num_processes),
        learning_rate=args.scaled_learning_rate(num_processes),
        steps_per_epoch=steps_per_epoch,
        total_steps=int(total_steps),
        warmup_steps=steps("warmup_steps", args.warmup_steps, args.warmup_epochs),
        warmup_teacher_temperature_steps=steps(
            "warmup_teacher_temperature_steps",
            args.warmup_teacher_temperature_steps,
            args.warmup_teacher_temperature_epochs,
        ),
        freeze_last_layer_steps=steps(
            "freeze_last_layer_steps", args.freeze_last_layer_steps, args.freeze_last_layer_epochs
        ),
        dataset_size_known=num_examples_per_process is not None,
        freeze_backbone_steps=_freeze_backbone_steps(args, int(total_steps), steps_per_epoch, continued),
        calibrated=not (budgeted and total_steps == PROVISIONAL_TOTAL_STEPS),
        time_budget_seconds=args.max_train_minutes * 60.0 if budgeted else None,
    )


#: The head warm-up of continued pre-training when --freeze_backbone_steps/epochs are unset: this
#: share of the run trains the fresh heads on the frozen backbone (chosen by measurement,
#: benchmarks/RESULTS.md "Continued pre-training").
CONTINUED_FREEZE_BACKBONE_FRACTION = 0.1


def _freeze_backbone_steps(
    args: DinoTrainingArguments, total_steps: int, steps_per_epoch: float, continued: bool
) -> int:
    """The head warm-up: the flags' value, else :data:`CONTINUED_FREEZE_BACKBONE_FRACTION` of a
    continued run and none from scratch."""
    if args.freeze_backbone_steps is None and args.freeze_backbone_epochs is None:
        return round(CONTINUED_FREEZE_BACKBONE_FRACTION * total_steps) if continued else 0
    if args.freeze_backbone_steps is not None:
        frozen = args.freeze_backbone_steps
    else:
        frozen = round(args.freeze_backbone_epochs * steps_per_epoch)
    if args.max_train_minutes is not None:  # the budget decides the length: keep a step to train the backbone
        return min(frozen, max(total_steps - 1, 0))
    flag = "--freeze_backbone_steps" if args.freeze_backbone_steps is not None else "--freeze_backbone_epochs"
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


def plan_for_time_budget(
    args: DinoTrainingArguments,
    num_examples_per_process: int | None,
    num_processes: int,
    elapsed_seconds: float,
    steps_done: int,
    seconds_per_step: float,
    evaluation_seconds: float = 0.0,
    continued: bool = False,
) -> StepPlan:
    """The final plan of a ``--max_train_minutes`` run, from its calibration's measurements.

    Args:
        elapsed_seconds: budget already used (the calibration steps and evaluation included).
        steps_done: optimiser steps already made.
        seconds_per_step, evaluation_seconds: what the calibration measured (0 without evaluation).
    """
    budget = args.max_train_minutes * 60.0
    total_steps = steps_for_time_budget(
        budget - elapsed_seconds,
        steps_done,
        seconds_per_step,
        evaluation_seconds,
        eval_steps=args.eval_steps,
        final_evaluation=bool(args.eval_dataset_name),
    )
    plan = plan_steps(args, num_examples_per_process, num_processes, total_steps=total_steps, continued=continued)
    return dataclasses.replace(
        plan,
        calibrated=True,
        seconds_per_step=seconds_per_step,
        evaluation_seconds=evaluation_seconds,
        calibration_steps=steps_done,
        calibration_seconds=elapsed_seconds,
    )


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise ValueError(message)

"""Step-indexed schedules of DINO training (learning rate, weight decay, teacher momentum and
temperature, last-layer freeze), in the style of DINOv2's ``CosineScheduler`` (the step counts they
run over come from :mod:`dino_hf.train.step_plan`).

Every value is a pure function of the optimiser step, so resuming from a checkpoint only needs the
step counter. Values follow the official implementations exactly: a warmup of ``W`` steps is
``numpy.linspace(start, base, W)`` (it starts at ``start`` and reaches ``base`` on its last step),
then a half cosine runs from ``base`` (first step after warmup) towards ``final`` (reached at
``total_steps``). Steps at or beyond ``total_steps`` return the final values.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

from dino_hf.base.official_recipe import (
    OFFICIAL_LEARNING_RATE,
    OFFICIAL_MIN_LEARNING_RATE,
    OFFICIAL_TEACHER_MOMENTUM,
    OFFICIAL_TEACHER_TEMPERATURE,
    OFFICIAL_WEIGHT_DECAY,
    OFFICIAL_WEIGHT_DECAY_END,
)
from dino_hf.losses.validation import check_positive_number


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
            check_positive_number(name, getattr(self, name))  # the loss's own rule
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

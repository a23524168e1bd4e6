"""Step-indexed schedules against the official numpy schedules of facebookresearch/dino."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

from dino_hf.train.arguments import DinoTrainingArguments
from dino_hf.train.schedules import DinoSchedules, ScheduleValues, cosine_schedule, linear_warmup_schedule


def make_args(**overrides) -> DinoTrainingArguments:
    return DinoTrainingArguments(dataset_name="data", output_dir="out", **overrides)


def official_cosine_scheduler(
    base_value: float,
    final_value: float,
    total_steps: int,
    warmup_steps: int = 0,
    start_warmup_value: float = 0.0,
) -> np.ndarray:
    """``dino/utils.py: cosine_scheduler`` with one iteration per epoch."""
    warmup_schedule = np.array([])
    if warmup_steps > 0:
        warmup_schedule = np.linspace(start_warmup_value, base_value, warmup_steps)
    iters = np.arange(total_steps - warmup_steps)
    schedule = final_value + 0.5 * (base_value - final_value) * (
        1 + np.cos(np.pi * iters / len(iters))
    )
    return np.concatenate((warmup_schedule, schedule))


@pytest.mark.parametrize("warmup_steps", [0, 1, 7, 50])
def test_cosine_schedule_matches_official(warmup_steps):
    total_steps = 50
    expected = official_cosine_scheduler(5e-4, 1e-6, total_steps, warmup_steps)
    actual = [
        cosine_schedule(step, total_steps, 5e-4, 1e-6, warmup_steps=warmup_steps)
        for step in range(total_steps)
    ]
    np.testing.assert_allclose(actual, expected, rtol=1e-12, atol=0)


def test_cosine_schedule_endpoints_and_clamping():
    assert cosine_schedule(0, 100, 0.04, 0.4) == pytest.approx(0.04)
    assert cosine_schedule(50, 100, 0.04, 0.4) == pytest.approx(0.22)
    assert cosine_schedule(99, 100, 0.04, 0.4) == pytest.approx(0.4, abs=1e-4)
    for step in (100, 101, 10**9):
        assert cosine_schedule(step, 100, 0.04, 0.4) == 0.4
    # warmup from warmup_start_value to base_value
    assert cosine_schedule(0, 100, 1.0, 0.0, warmup_steps=5, warmup_start_value=0.5) == 0.5
    assert cosine_schedule(4, 100, 1.0, 0.0, warmup_steps=5, warmup_start_value=0.5) == 1.0


def test_linear_warmup_schedule():
    values = [linear_warmup_schedule(step, 5, 0.04, 0.07) for step in range(10)]
    np.testing.assert_allclose(values[:5], np.linspace(0.04, 0.07, 5))
    assert values[5:] == [0.07] * 5
    assert linear_warmup_schedule(0, 0, 0.04, 0.07) == 0.07
    assert linear_warmup_schedule(0, 1, 0.04, 0.07) == 0.04
    assert linear_warmup_schedule(1, 1, 0.04, 0.07) == 0.07


def test_dino_schedules_endpoints_monotonicity_and_freeze():
    schedules = DinoSchedules(
        total_steps=200,
        learning_rate=1e-3,
        min_learning_rate=1e-6,
        warmup_steps=20,
        weight_decay=0.04,
        weight_decay_end=0.4,
        teacher_momentum=0.996,
        teacher_temperature=0.07,
        warmup_teacher_temperature=0.04,
        warmup_teacher_temperature_steps=60,
        freeze_last_layer_steps=10,
    )
    values = [schedules.at(step) for step in range(200)]
    assert all(isinstance(value, ScheduleValues) for value in values)
    learning_rates = [value.learning_rate for value in values]
    weight_decays = [value.weight_decay for value in values]
    momenta = [value.teacher_momentum for value in values]
    temperatures = [value.teacher_temperature for value in values]

    # learning rate: 0 -> peak over the warmup (inclusive, as the official linspace), then down
    assert learning_rates[0] == 0.0
    assert learning_rates[19] == pytest.approx(1e-3)
    assert learning_rates[20] == pytest.approx(1e-3)
    assert all(a < b for a, b in itertools.pairwise(learning_rates[:20]))
    assert all(a >= b for a, b in itertools.pairwise(learning_rates[20:]))
    assert learning_rates[-1] > 1e-6
    np.testing.assert_allclose(
        learning_rates, official_cosine_scheduler(1e-3, 1e-6, 200, 20), rtol=1e-12
    )

    # weight decay and teacher momentum increase along a cosine
    assert weight_decays[0] == pytest.approx(0.04)
    assert momenta[0] == pytest.approx(0.996)
    assert all(a <= b for a, b in itertools.pairwise(weight_decays))
    assert all(a <= b for a, b in itertools.pairwise(momenta))
    assert weight_decays[-1] < 0.4 and momenta[-1] < 1.0
    np.testing.assert_allclose(weight_decays, official_cosine_scheduler(0.04, 0.4, 200))
    np.testing.assert_allclose(momenta, official_cosine_scheduler(0.996, 1.0, 200))

    # teacher temperature: linear warmup, then constant
    np.testing.assert_allclose(temperatures[:60], np.linspace(0.04, 0.07, 60))
    assert temperatures[60:] == [0.07] * 140

    # last layer frozen for exactly the first 10 steps
    assert [value.freeze_last_layer for value in values[:12]] == [True] * 10 + [False] * 2

    # beyond the end: final values
    for step in (200, 201, 5000):
        final = schedules.at(step)
        assert final == ScheduleValues(
            learning_rate=1e-6,
            weight_decay=0.4,
            teacher_momentum=1.0,
            teacher_temperature=0.07,
            freeze_last_layer=False,
        )


def test_defaults_are_the_official_recipe():
    schedules = DinoSchedules(total_steps=10)
    first = schedules.at(0)
    assert first.learning_rate == 5e-4  # no warmup by default
    assert first.weight_decay == pytest.approx(0.04)
    assert first.teacher_momentum == pytest.approx(0.996)
    assert first.teacher_temperature == 0.04
    assert first.freeze_last_layer is False
    assert math.isclose(schedules.at(10).learning_rate, 1e-6)


@pytest.mark.parametrize(
    ("expected_name", "kwargs"),
    [
        ("total_steps", {"total_steps": 0}),
        ("total_steps", {"total_steps": 10.5}),
        ("learning_rate", {"total_steps": 10, "learning_rate": -1.0}),
        ("min_learning_rate", {"total_steps": 10, "min_learning_rate": float("nan")}),
        ("weight_decay_end", {"total_steps": 10, "weight_decay_end": -0.1}),
        ("teacher_momentum", {"total_steps": 10, "teacher_momentum": 1.5}),
        ("teacher_temperature", {"total_steps": 10, "teacher_temperature": 0.0}),
        ("warmup_teacher_temperature", {"total_steps": 10, "warmup_teacher_temperature": -1}),
        ("warmup_steps", {"total_steps": 10, "warmup_steps": 11}),
        ("warmup_steps", {"total_steps": 10, "warmup_steps": -1}),
        (
            "warmup_teacher_temperature_steps",
            {"total_steps": 10, "warmup_teacher_temperature_steps": 20},
        ),
        ("freeze_last_layer_steps", {"total_steps": 10, "freeze_last_layer_steps": 1.5}),
    ],
)
def test_bad_arguments_raise_one_sentence_value_error(expected_name, kwargs):
    with pytest.raises(ValueError, match=f"^{expected_name} must") as error:
        DinoSchedules(**kwargs)
    assert "\n" not in str(error.value) and str(error.value).endswith(".")


@pytest.mark.parametrize(
    ("expected_name", "call"),
    [
        ("step", lambda: DinoSchedules(total_steps=10).at(-1)),
        ("step", lambda: cosine_schedule(1.5, 10, 1.0, 0.0)),
        ("total_steps", lambda: cosine_schedule(0, 0, 1.0, 0.0)),
        ("warmup_steps", lambda: cosine_schedule(0, 10, 1.0, 0.0, warmup_steps=11)),
        ("warmup_steps", lambda: linear_warmup_schedule(0, -1, 1.0, 0.0)),
    ],
)
def test_bad_steps_raise_value_error(expected_name, call):
    with pytest.raises(ValueError, match=f"^{expected_name} must"):
        call()

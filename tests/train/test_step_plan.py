"""The step plan: run lengths, epoch-denominated phases and time budgets -> step counts."""

from __future__ import annotations

import pytest

from dino_hf.train.arguments import DinoTrainingArguments
from dino_hf.train.schedules import DinoSchedules
from dino_hf.train.step_plan import (
    TIME_BUDGET_MARGIN,
    BudgetCalibration,
    plan_for_time_budget,
    plan_steps,
    steps_for_time_budget,
)


def make_args(**overrides) -> DinoTrainingArguments:
    return DinoTrainingArguments(dataset_name="data", output_dir="out", **overrides)


# ------------------------------------------------------------------------------- step plan
def test_plan_with_known_dataset_size():
    args = make_args(per_device_train_batch_size=64, gradient_accumulation_steps=2, num_train_epochs=3,
                     warmup_epochs=1, freeze_last_layer_epochs=0.5, warmup_teacher_temperature_epochs=2)
    plan = plan_steps(args.run_length(), num_examples_per_process=1000, num_processes=4)
    assert plan.global_batch_size == 64 * 2 * 4
    assert plan.learning_rate == pytest.approx(5e-4 * 512 / 256)
    assert plan.steps_per_epoch == 7  # 1000 // 128
    assert plan.total_steps == 21 and plan.warmup_steps == 7
    assert plan.freeze_last_layer_steps == 4 and plan.warmup_teacher_temperature_steps == 14
    assert args.learning_rate == 5e-4  # the arguments themselves are untouched


def test_plan_for_a_stream_of_unknown_length():
    args = make_args(max_steps=1000, num_train_epochs=100)
    plan = plan_steps(args.run_length(), num_examples_per_process=None, num_processes=1)
    assert plan.steps_per_epoch == 10 and plan.total_steps == 1000
    assert plan.warmup_steps == 100 and plan.freeze_last_layer_steps == 10
    with pytest.raises(ValueError, match="pass --max_steps"):
        plan_steps(make_args().run_length(), num_examples_per_process=None, num_processes=1)


def test_plan_caps_epoch_settings_and_rejects_explicit_steps_beyond_the_run():
    plan = plan_steps(make_args(max_steps=5).run_length(), num_examples_per_process=6400, num_processes=1)
    assert plan.total_steps == 5 and plan.warmup_steps == 5  # 10 epochs capped at the run
    with pytest.raises(ValueError, match="--warmup_steps"):
        plan_steps(make_args(max_steps=5, warmup_steps=6).run_length(), num_examples_per_process=6400, num_processes=1)
    with pytest.raises(ValueError, match="--per_device_train_batch_size"):
        plan_steps(make_args().run_length(), num_examples_per_process=10, num_processes=1)


# ------------------------------------------------------------------------------- time budget
class FakeClock:
    """Advances by ``tick`` seconds at every reading: one reading per step in the calibration."""

    def __init__(self, tick: float) -> None:
        self.now = 0.0
        self.tick = tick

    def __call__(self) -> float:
        self.now += self.tick
        return self.now


def test_calibration_skips_its_warm_up_steps_and_times_a_window():
    clock = FakeClock(0.25)
    calibration = BudgetCalibration(600.0, warmup_steps=5, min_timed_steps=20, clock=clock)
    results = [calibration.observe(step) for step in range(1, 60)]
    first = next(index for index, value in enumerate(results) if value is not None)
    # steps 1-4 untimed, the clock starts at step 5, 20 timed steps and 10 s (min(10, 2% of 600)) later
    assert first + 1 == 5 + 40  # 10 s / 0.25 s = 40 timed steps after the 5th
    assert results[first] == pytest.approx(0.25)
    assert all(value is None for value in results[:first])
    # slow steps: three of them over 3x the window suffice
    slow = BudgetCalibration(600.0, warmup_steps=1, clock=FakeClock(20.0))
    assert [slow.observe(step) for step in range(1, 6)] == [None, None, None, pytest.approx(20.0), pytest.approx(20.0)]


def test_steps_for_a_time_budget_fill_it_with_steps_and_evaluations():
    total = steps_for_time_budget(100.0, steps_done=30, seconds_per_step=0.1, evaluation_seconds=5.0,
                                  eval_steps=200, final_evaluation=True)

    def cost(total_steps: int) -> float:
        evaluations = (total_steps - 1) // 200 - 30 // 200
        return (total_steps - 30) * 0.1 + evaluations * 5.0 + 5.0

    available = 100.0 * (1 - TIME_BUDGET_MARGIN)
    assert cost(total) <= available < cost(total + 1)
    assert steps_for_time_budget(10.0, 0, 0.5) == int(10.0 * (1 - TIME_BUDGET_MARGIN) / 0.5)
    with pytest.raises(ValueError, match="--max_train_minutes"):
        steps_for_time_budget(1.0, steps_done=25, seconds_per_step=2.0)


def test_a_time_budgeted_plan_completes_every_schedule_at_its_last_step():
    args = make_args(max_train_minutes=2.0, per_device_train_batch_size=10, warmup_epochs=2,
                     warmup_teacher_temperature_epochs=1, freeze_last_layer_epochs=1, warmup_teacher_temperature=0.02)
    provisional = plan_steps(args.run_length(), num_examples_per_process=1000, num_processes=1)
    assert not provisional.calibrated and provisional.time_budget_seconds == 120.0
    plan = plan_for_time_budget(args.run_length(), 1000, 1, elapsed_seconds=12.0, steps_done=25, seconds_per_step=0.05)
    assert plan.calibrated and plan.seconds_per_step == 0.05
    assert plan.total_steps == steps_for_time_budget(108.0, 25, 0.05)
    assert plan.warmup_steps == 200 and plan.freeze_last_layer_steps == 100 <= plan.total_steps
    schedules = DinoSchedules(total_steps=plan.total_steps, learning_rate=plan.learning_rate, min_learning_rate=1e-6,
                              warmup_steps=plan.warmup_steps, teacher_temperature=0.04,
                              warmup_teacher_temperature=0.02,
                              warmup_teacher_temperature_steps=plan.warmup_teacher_temperature_steps,
                              freeze_last_layer_steps=plan.freeze_last_layer_steps)
    last = schedules.at(plan.total_steps - 1)
    assert last.learning_rate == pytest.approx(1e-6, abs=1e-6) and last.teacher_temperature == 0.04
    assert last.teacher_momentum == pytest.approx(1.0, abs=1e-4) and not last.freeze_last_layer
    assert schedules.at(plan.total_steps).learning_rate == 1e-6  # the final values, exactly
    # a budget too short for the warm-ups shortens them: they end within the run
    short = plan_for_time_budget(args.run_length(), 1000, 1, elapsed_seconds=110.0, steps_done=25, seconds_per_step=0.5)
    assert short.warmup_steps <= short.total_steps and short.freeze_last_layer_steps <= short.total_steps

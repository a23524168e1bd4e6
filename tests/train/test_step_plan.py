"""The step plan: run lengths, epoch-denominated phases and time budgets -> step counts."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from dino_hf.train.arguments import DinoTrainingArguments
from dino_hf.train.schedules import DinoSchedules
from dino_hf.train.step_plan import (
    TIME_BUDGET_MARGIN,
    BudgetCalibration,
    StepPlan,
    plan_for_time_budget,
    plan_steps,
    scaling_note,
    steps_for_time_budget,
)


def make_args(**overrides) -> DinoTrainingArguments:
    return DinoTrainingArguments(dataset_name="data", output_dir="out", **overrides)


def schedules_of(plan: StepPlan, warmup_teacher_temperature: float = 0.02) -> DinoSchedules:
    """The schedules the loop builds from a plan (as ``builders.build_schedules``), temperature 0.02 -> 0.04."""
    return DinoSchedules(total_steps=plan.total_steps, learning_rate=plan.learning_rate, min_learning_rate=1e-6,
                         warmup_steps=plan.warmup_steps, teacher_temperature=0.04,
                         warmup_teacher_temperature=warmup_teacher_temperature,
                         warmup_teacher_temperature_steps=plan.warmup_teacher_temperature_steps,
                         freeze_last_layer_steps=plan.freeze_last_layer_steps,
                         freeze_backbone_steps=plan.freeze_backbone_steps)


def assert_every_schedule_completes(plan: StepPlan) -> None:
    """The learning rate reaches its peak and decays to its end, the teacher temperature reaches its
    final value, the last layer and the backbone unfreeze, all before the last step."""
    schedules = schedules_of(plan)
    last = plan.total_steps - 1
    assert plan.warmup_steps < plan.total_steps
    assert schedules.at(plan.warmup_steps).learning_rate == pytest.approx(plan.learning_rate)  # the peak
    peak = max(schedules.at(step).learning_rate for step in range(plan.total_steps))
    assert peak == pytest.approx(plan.learning_rate)
    assert schedules.at(last).learning_rate == pytest.approx(1e-6, abs=1e-6)
    assert schedules.at(plan.total_steps).learning_rate == 1e-6
    assert plan.warmup_teacher_temperature_steps < plan.total_steps
    assert schedules.at(last).teacher_temperature == pytest.approx(0.04)
    assert schedules.at(last).teacher_momentum == pytest.approx(1.0, abs=1e-4)
    assert plan.freeze_last_layer_steps < plan.total_steps and not schedules.at(last).freeze_last_layer
    assert plan.freeze_backbone_steps < plan.total_steps and not schedules.at(last).freeze_backbone


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
    assert args.base_learning_rate == 5e-4 and args.learning_rate is None  # the arguments themselves are untouched


def test_learning_rate_is_absolute_and_base_learning_rate_per_256_images():
    """HF's convention (transformers' run_mae.py): --base_learning_rate scales with the batch, --learning_rate
    is the absolute peak and wins; the schedules reach exactly that peak."""
    scaled = plan_steps(make_args(max_steps=10, per_device_train_batch_size=32, base_learning_rate=1e-3).run_length(),
                        num_examples_per_process=None, num_processes=2)
    assert scaled.learning_rate == pytest.approx(1e-3 * 64 / 256)
    absolute = plan_steps(make_args(max_steps=10, per_device_train_batch_size=32, base_learning_rate=1e-3,
                                    learning_rate=3e-4).run_length(), num_examples_per_process=None, num_processes=2)
    assert absolute.learning_rate == 3e-4


def test_plan_for_a_stream_of_unknown_length():
    args = make_args(max_steps=1000, num_train_epochs=100)
    plan = plan_steps(args.run_length(), num_examples_per_process=None, num_processes=1)
    assert plan.steps_per_epoch == 10 and plan.total_steps == 1000
    assert plan.warmup_steps == 100 and plan.freeze_last_layer_steps == 10
    with pytest.raises(ValueError, match="pass --max_steps"):
        plan_steps(make_args().run_length(), num_examples_per_process=None, num_processes=1)


def test_plan_caps_epoch_settings_and_rejects_explicit_steps_beyond_the_run():
    # 200 warm-up epochs of the nominal 100: twice the run, capped at it (10 epochs would be 10% of it)
    plan = plan_steps(make_args(max_steps=5, warmup_epochs=200).run_length(), num_examples_per_process=6400,
                      num_processes=1)
    assert plan.total_steps == 5 and plan.warmup_steps == 5
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
                     warmup_teacher_temperature_epochs=30, freeze_last_layer_epochs=1, warmup_teacher_temperature=0.02)
    provisional = plan_steps(args.run_length(), num_examples_per_process=1000, num_processes=1)
    assert not provisional.calibrated and provisional.time_budget_seconds == 120.0
    plan = plan_for_time_budget(args.run_length(), 1000, 1, elapsed_seconds=12.0, steps_done=25, seconds_per_step=0.05)
    assert plan.calibrated and plan.seconds_per_step == 0.05
    assert plan.total_steps == steps_for_time_budget(108.0, 25, 0.05) == 2120  # of the nominal 100 x 100 steps
    # the 30-epoch temperature warm-up would cover the run (3,000 of its 2,120 steps): 2, 30 and 1 of the
    # nominal 100 epochs take their share of the run instead (not 200, 2,120 and 100 steps)
    assert plan.warmup_steps == 42 and plan.warmup_teacher_temperature_steps == 636 and plan.freeze_last_layer_steps == 21
    assert plan.scaled_phases == ("warmup_steps", "warmup_teacher_temperature_steps", "freeze_last_layer_steps")
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


# ------------------------------------------------------------------------------- short runs
def test_epoch_phases_of_a_run_shorter_than_the_recipe_keep_their_share_of_it():
    # 100 steps per epoch: the official 100 epochs are 10,000 steps and --max_steps 300 cuts them short
    args = make_args(max_steps=300, per_device_train_batch_size=10, warmup_teacher_temperature_epochs=30,
                     freeze_backbone_epochs=5)
    plan = plan_steps(args.run_length(), num_examples_per_process=1000, num_processes=1)
    assert plan.steps_per_epoch == 100 and plan.total_steps == 300 and plan.nominal_epochs == 100
    # 10, 30, 1 and 5 of 100 epochs: 10%, 30%, 1% and 5% of the run (epochs would give 1000, 3000, 100, 500)
    assert (plan.warmup_steps, plan.warmup_teacher_temperature_steps, plan.freeze_last_layer_steps,
            plan.freeze_backbone_steps) == (30, 90, 3, 15)
    assert plan.scaled_phases == ("warmup_steps", "warmup_teacher_temperature_steps", "freeze_last_layer_steps",
                                  "freeze_backbone_steps")
    assert plan.scaled_phase_epochs == (10.0, 30.0, 1.0, 5.0)
    assert_every_schedule_completes(plan)
    schedules = schedules_of(plan)
    assert schedules.at(2).freeze_last_layer and not schedules.at(3).freeze_last_layer
    assert schedules.at(88).teacher_temperature < 0.04 == schedules.at(89).teacher_temperature
    note = scaling_note(plan)
    assert note.startswith("The run is shorter than the recipe's 100 epochs (300 of 10000 steps): ")
    for part in ("the learning-rate warm-up 10 epochs -> 30 steps",
                 "the teacher-temperature warm-up 30 epochs -> 90 steps",
                 "the last-layer freeze 1 epoch -> 3 steps", "the head warm-up 5 epochs -> 15 steps"):
        assert part in note
    assert note.endswith("keep their share of it.")
    # --num_train_epochs is the nominal run when given: 10 of 20 epochs is half of a 300-step run
    halved = plan_steps(make_args(max_steps=300, num_train_epochs=20, per_device_train_batch_size=10).run_length(),
                        num_examples_per_process=1000, num_processes=1)
    assert halved.nominal_epochs == 20 and halved.warmup_steps == 150 and halved.freeze_last_layer_steps == 15
    assert "recipe's 20 epochs (300 of 2000 steps)" in scaling_note(halved)


def test_explicit_step_counts_are_obeyed_in_a_short_run():
    args = make_args(max_steps=300, per_device_train_batch_size=10, warmup_steps=300, freeze_last_layer_steps=50,
                     warmup_teacher_temperature_steps=0, freeze_backbone_steps=299)
    plan = plan_steps(args.run_length(), num_examples_per_process=1000, num_processes=1)
    assert (plan.warmup_steps, plan.freeze_last_layer_steps, plan.warmup_teacher_temperature_steps,
            plan.freeze_backbone_steps) == (300, 50, 0, 299)  # a warm-up covering the run: asked for exactly that
    assert plan.scaled_phases == () and scaling_note(plan) is None
    # explicit and epoch-denominated phases mixed: only the latter scale
    mixed = plan_steps(make_args(max_steps=300, per_device_train_batch_size=10, warmup_steps=7,
                                 warmup_teacher_temperature_epochs=30).run_length(), 1000, 1)
    assert mixed.warmup_steps == 7 and mixed.warmup_teacher_temperature_steps == 90 and mixed.freeze_last_layer_steps == 3
    assert mixed.scaled_phases == ("warmup_teacher_temperature_steps", "freeze_last_layer_steps")
    assert scaling_note(mixed).endswith("the last-layer freeze 1 epoch -> 3 steps keep their share of it.")
    # no phase covering the run (a 0.1-epoch warm-up, as the demo recipe's, in a 3-epoch run): epochs kept
    fits = plan_steps(make_args(max_steps=300, per_device_train_batch_size=10, warmup_epochs=0.1,
                                freeze_last_layer_epochs=0).run_length(), 1000, 1)
    assert fits.warmup_steps == 10 and fits.scaled_phases == () and scaling_note(fits) is None
    with pytest.raises(ValueError, match="--freeze_last_layer_steps"):
        plan_steps(make_args(max_steps=300, per_device_train_batch_size=10, freeze_last_layer_steps=301).run_length(),
                   1000, 1)


def test_runs_at_least_as_long_as_the_recipe_and_streams_count_epochs_as_before():
    full = plan_steps(make_args(num_train_epochs=3, per_device_train_batch_size=10, warmup_epochs=1).run_length(),
                      1000, 1)
    assert full.total_steps == 300 and full.warmup_steps == 100 and full.scaled_phases == ()
    longer = plan_steps(make_args(max_steps=20_000, per_device_train_batch_size=10).run_length(), 1000, 1)
    assert longer.warmup_steps == 1000 and longer.freeze_last_layer_steps == 100 and scaling_note(longer) is None
    # a stream of unknown length: its epoch is total / num_train_epochs, already the share
    stream = plan_steps(make_args(max_steps=300).run_length(), num_examples_per_process=None, num_processes=1)
    assert stream.steps_per_epoch == 3 and stream.warmup_steps == 30 and stream.freeze_last_layer_steps == 3
    assert stream.scaled_phases == ()
    assert_every_schedule_completes(stream)


def test_a_short_time_budget_scales_the_calibrated_plan_and_keeps_the_provisional_one():
    # the official phases (10 warm-up epochs, 30 of teacher temperature, 1 frozen) in a 2-minute budget
    args = make_args(max_train_minutes=2.0, per_device_train_batch_size=10, warmup_teacher_temperature_epochs=30)
    provisional = plan_steps(args.run_length(), num_examples_per_process=1000, num_processes=1)
    assert not provisional.calibrated and provisional.scaled_phases == ()
    assert provisional.warmup_steps == 1000 and provisional.warmup_teacher_temperature_steps == 3000  # as epochs say
    plan = plan_for_time_budget(args.run_length(), 1000, 1, elapsed_seconds=12.0, steps_done=25, seconds_per_step=0.05)
    assert plan.calibrated and plan.total_steps == 2120
    assert (plan.warmup_steps, plan.warmup_teacher_temperature_steps, plan.freeze_last_layer_steps) == (212, 636, 21)
    assert_every_schedule_completes(plan)
    assert scaling_note(plan).startswith("The run is shorter than the recipe's 100 epochs (2120 of 10000 steps)")
    # a huge dataset: the provisional plan's 10**9 steps are shorter than its 100 epochs, and stay unscaled
    huge = plan_steps(args.run_length(), num_examples_per_process=10**12, num_processes=1)
    assert not huge.calibrated and huge.scaled_phases == ()
    # a budget so short the calibration used most of it: 9 steps in all, still every schedule completes
    short = plan_for_time_budget(args.run_length(), 1000, 1, elapsed_seconds=110.0, steps_done=25, seconds_per_step=0.5)
    assert short.total_steps == 25 + 19 and short.warmup_steps == 4 and short.freeze_last_layer_steps == 0
    assert_every_schedule_completes(short)
    # a stream of unknown length in a budget: already proportional
    stream = plan_for_time_budget(args.run_length(), None, 1, elapsed_seconds=12.0, steps_done=25,
                                  seconds_per_step=0.05)
    assert stream.warmup_steps == 212 and stream.scaled_phases == ()


def test_the_plan_round_trips_through_json_and_older_plans_load():
    plan = plan_steps(make_args(max_steps=300, per_device_train_batch_size=10).run_length(), 1000, 1)
    assert plan.scaled_phases and StepPlan.from_dict(json.loads(json.dumps(plan.to_dict()))) == plan
    state = Path(__file__).parents[1] / "fixtures" / "run_before_subpackages" / "run" / "checkpoints" / "step_2"
    old = StepPlan.from_dict(json.loads((state / "training_state.json").read_text())["plan"])
    assert old.total_steps == 4 and old.scaled_phases == () and old.nominal_epochs is None and scaling_note(old) is None

"""Metrics and monitors (dino_hf.train.metrics): the collapse monitor's warnings and remedies (DINO and iBOT
heads), the gradient-spike monitor, the logged keys."""

from __future__ import annotations

import math

from dino_hf.train.metrics import CollapseMonitor, GradientSpikeMonitor, metric_keys


def test_collapse_monitor_warns_once_after_patience():
    monitor = CollapseMonitor(num_prototypes=64, patience_steps=20)
    uniform = {"loss": math.log(64), "teacher_entropy": math.log(64) - 0.01, "teacher_mean_entropy": math.log(64)}
    assert monitor.update(10, uniform) is None
    assert monitor.update(20, uniform) is None
    message = monitor.update(30, uniform)
    assert message and "uniform" in message and "--teacher_temperature" in message
    assert monitor.update(40, uniform) is None  # once per episode
    healthy = {"loss": 2.0, "teacher_entropy": 1.0, "teacher_mean_entropy": 3.0}
    assert monitor.update(50, healthy) is None
    one_hot = {"loss": 0.1, "teacher_entropy": 0.0, "teacher_mean_entropy": 0.01}
    monitor.update(60, one_hot)
    assert "one-hot" in monitor.update(80, one_hot)


def test_collapse_remedies_are_computed_from_the_run():
    small = CollapseMonitor(num_prototypes=1024, patience_steps=1, teacher_temperature=0.04, teacher_momentum=0.996)
    uniform = small.remedies("uniform", {"teacher_temperature": 0.04})
    assert "--teacher_temperature 0.03" in uniform[0] and "now 0.04" in uniform[0]
    assert "num_prototypes=256 (now K = 1024)" in uniform[1] and "--teacher_momentum 0.99 " in uniform[2]
    large = CollapseMonitor(num_prototypes=65536, patience_steps=1, teacher_temperature=0.07, teacher_momentum=0.99)
    remedies = " ".join(large.remedies("uniform", {"teacher_temperature": 0.07}))
    assert "num_prototypes=4096 (now K = 65536)" in remedies and "--teacher_temperature 0.053" in remedies
    assert "--teacher_momentum" not in remedies  # already fast
    one_hot = " ".join(small.remedies("one-hot", {"teacher_temperature": 0.04}))
    assert "--teacher_temperature 0.06" in one_hot and "--center_momentum 0.8" in one_hot
    assert "--base_learning_rate 0.00025" in one_hot


def _rows(grad_norms, spike_at=None, spike=None):
    return [{"step": 10 * (index + 1), "grad_norm": value,
             "grad_norm_max": spike if index == spike_at else value * 1.5}
            for index, value in enumerate(grad_norms)]


def test_gradient_spike_warns_on_an_injected_spike_once_per_episode():
    monitor = GradientSpikeMonitor(factor=10, min_history=5, max_grad_norm=3.0, learning_rate=5e-4, warmup_steps=50)
    healthy = [2.0, 1.8, 1.5, 1.4, 1.3, 1.2, 1.25, 1.1]
    rows = _rows(healthy + [1.2, 1.1, 1.0], spike_at=8, spike=40.0)
    messages = [monitor.update(row["step"], row) for row in rows]
    assert [index for index, message in enumerate(messages) if message] == [8]
    assert "by step 90: 40" in messages[8] and "--max_grad_norm (1.0, now 3)" in messages[8]
    assert "--base_learning_rate (0.00025, now 0.0005)" in messages[8] and "--warmup_steps 100" in messages[8]
    # a spike that lasts several windows warns once; a new one after a quiet window warns again
    monitor = GradientSpikeMonitor(factor=10, min_history=3)
    rows = _rows([1.0] * 4 + [1.0, 1.0, 1.0, 1.0])
    for index in (4, 5, 7):
        rows[index]["grad_norm_max"] = 50.0
    assert [bool(monitor.update(row["step"], row)) for row in rows] == [False] * 4 + [True, False, False, True]
    assert GradientSpikeMonitor(factor=0).update(10, {"grad_norm": 1, "grad_norm_max": 1e9}) is None


def test_gradient_spike_stays_quiet_on_a_healthy_run(dataset, tiny_config_file, tmp_path, caplog):
    """The rows of a real (tiny) training run, whose gradient norm falls from its first steps: no warning."""
    import logging

    from accelerate.state import AcceleratorState, GradientState
    from tiny_models import read_rows, tiny_args

    from dino_hf.train.loop import train

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    with caplog.at_level(logging.WARNING, logger="dino_hf"):
        train(tiny_args(dataset, tmp_path / "run", tiny_config_file, max_steps=24, logging_steps=2,
                        checkpointing_steps=100))
    AcceleratorState._reset_state(reset_partial_state=True)
    rows = [row for row in read_rows(tmp_path / "run") if "grad_norm" in row]
    assert len(rows) == 12 and all(row["grad_norm_max"] >= row["grad_norm"] > 0 for row in rows)
    assert "Gradient-norm spike" not in caplog.text
    monitor = GradientSpikeMonitor(factor=10, min_history=3)  # and directly, with a shorter history
    assert not any(monitor.update(row["step"], row) for row in rows)


def test_one_hot_collapse_counts_the_prototypes_in_use():
    """Below 0.1 ln(K) nats of batch-mean entropy (fewer than K ** 0.1 prototypes in effective use), after
    the patience; a run without centering (center momentum 1) is told to centre again."""
    monitor = CollapseMonitor(num_prototypes=1024, patience_steps=100, center_momentum=1.0)
    few = {"loss": 0.5, "teacher_entropy": 0.2, "teacher_mean_entropy": 0.58}  # 1.8 prototypes of 1024
    assert monitor.update(100, few) is None
    message = monitor.update(200, few)
    assert "one-hot" in message and "about 1.8 of K = 1024 prototypes" in message
    assert "--center_momentum 0.9 (now 1" in message
    assert CollapseMonitor(num_prototypes=1024, patience_steps=0).update(0, {"teacher_mean_entropy": 0.8}) is None


def test_collapse_monitor_watches_the_ibot_head():
    monitor = CollapseMonitor(num_prototypes=64, patience_steps=20, ibot_num_prototypes=128)
    healthy = {"loss": 2.0, "teacher_entropy": 1.0, "teacher_mean_entropy": 3.0}
    patches_uniform = {**healthy, "ibot_teacher_entropy": math.log(128) - 0.01, "ibot_teacher_mean_entropy": 4.8}
    assert monitor.update(10, patches_uniform) is None
    message = monitor.update(30, patches_uniform)
    assert message and "uniform, iBOT head" in message and "4.84" in message
    patches_one_hot = {**healthy, "ibot_teacher_entropy": 0.0, "ibot_teacher_mean_entropy": 0.02}
    assert monitor.update(40, patches_one_hot) is None
    assert "one-hot, iBOT head" in monitor.update(60, patches_one_hot)
    # without an iBOT head the iBOT columns are not watched
    assert CollapseMonitor(64, 0).update(0, patches_one_hot) is None
    # the remedies of an iBOT-head collapse name the iBOT head's size, not the DINO head's
    large = CollapseMonitor(num_prototypes=1024, patience_steps=1, ibot_num_prototypes=8192)
    ibot = " ".join(large.remedies("uniform, iBOT head", {"teacher_temperature": 0.04}))
    assert "--ibot_num_prototypes 2048 (now iBOT K = 8192)" in ibot and "num_prototypes=256" not in ibot
    assert "num_prototypes=256 (now K = 1024)" in " ".join(large.remedies("uniform", {"teacher_temperature": 0.04}))


def _statistics(loss, finite=True, **loss_statistics):
    import torch

    from dino_hf.train.step import StepStatistics

    return StepStatistics(loss=torch.tensor(loss), grad_norm=torch.tensor(1.0), finite=torch.tensor(finite),
                          loss_statistics={key: torch.tensor(value) for key, value in loss_statistics.items()})


def test_each_key_is_averaged_over_the_steps_that_gave_it_and_a_resume_keeps_the_columns(fresh_accelerate_state):
    import torch
    from accelerate import Accelerator

    from dino_hf.train.metrics import MetricsAccumulator

    keys = metric_keys(ibot=True)
    accumulator = MetricsAccumulator(torch.device("cpu"), keys)
    accumulator.add(_statistics(2.0, ibot_teacher_entropy=1.0, ibot_loss=0.5))
    accumulator.add(_statistics(4.0, ibot_loss=0.0))  # no masked patch this step: no iBOT entropy
    accumulator.add(_statistics(float("nan"), finite=False, ibot_teacher_entropy=9.0))  # skipped: not counted
    state = accumulator.state_dict()
    row = accumulator.flush(Accelerator(cpu=True))
    assert row["loss"] == 3.0 and row["ibot_teacher_entropy"] == 1.0 and row["ibot_loss"] == 0.25
    assert row["nonfinite_steps"] == 1 and "koleo_loss" not in row
    resumed = MetricsAccumulator(torch.device("cpu"), keys)
    resumed.load_state_dict(state)
    assert resumed.flush(Accelerator(cpu=True))["ibot_teacher_entropy"] == 1.0  # the same window, same columns
    # other loss terms, as many columns: a fresh window, not sums in the wrong columns
    other_keys = (*metric_keys(koleo=True), "ibot_loss", "ibot_teacher_entropy")
    assert len(other_keys) == len(keys)
    other = MetricsAccumulator(torch.device("cpu"), other_keys)
    other.load_state_dict(state)
    assert other.steps == 0 and other.sums.abs().sum() == 0


def test_metric_keys_follow_the_objective():
    base = ("loss", "grad_norm", "teacher_entropy", "teacher_mean_entropy", "student_entropy", "teacher_student_kl")
    assert metric_keys() == base  # DINO: as before
    assert metric_keys(ibot=True, koleo=True) == (
        *base, "dino_loss", "ibot_loss", "ibot_teacher_entropy", "ibot_teacher_mean_entropy", "koleo_loss")
    assert metric_keys(koleo=True)[-2:] == ("dino_loss", "koleo_loss")

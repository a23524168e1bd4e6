"""Metrics and monitors (dino_hf.metrics): the collapse monitor's warnings (DINO and iBOT heads), the logged keys."""

from __future__ import annotations

import math

from dino_hf.metrics import CollapseMonitor, metric_keys


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


def test_metric_keys_follow_the_objective():
    assert metric_keys() == ("loss", "teacher_entropy", "teacher_mean_entropy", "grad_norm")  # DINO: as before
    assert metric_keys(ibot=True, koleo=True) == (
        "loss", "teacher_entropy", "teacher_mean_entropy", "grad_norm", "dino_loss", "ibot_loss",
        "ibot_teacher_entropy", "ibot_teacher_mean_entropy", "koleo_loss")
    assert metric_keys(koleo=True)[-2:] == ("dino_loss", "koleo_loss")

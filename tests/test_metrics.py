"""Metrics and monitors (dino_hf.metrics): the collapse monitor's warnings."""

from __future__ import annotations

import math

from dino_hf.metrics import CollapseMonitor


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

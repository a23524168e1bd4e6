"""What a person reads (dino_hf.base.progress): a training run whose stderr is a file logs one progress line per
logging step (no carriage-return redraws), with step, loss, images/s and ETA; durations; the ETA."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

from dino_hf.base.progress import TrainingProgress, format_duration

REPO_ROOT = Path(__file__).resolve().parents[2]


def test_a_non_interactive_run_logs_one_progress_line_per_logging_step(dataset, tiny_config_file, tmp_path):
    log = tmp_path / "train.log"
    command = [sys.executable, str(REPO_ROOT / "scripts" / "train.py"), "--dataset_name", str(dataset),
               "--output_dir", str(tmp_path / "run"), "--model_config", str(tiny_config_file),
               "--global_crop_size", "32", "--local_crop_size", "16", "--num_local_crops", "2",
               "--per_device_train_batch_size", "8", "--max_steps", "6", "--logging_steps", "2",
               "--checkpointing_steps", "100", "--dataloader_num_workers", "0", "--shuffle_buffer_size", "16",
               "--warmup_steps", "1", "--freeze_last_layer_steps", "1"]
    with log.open("w") as handle:  # a file, as under a scheduler: not a terminal
        result = subprocess.run(command, stdout=handle, stderr=subprocess.STDOUT, cwd=tmp_path, timeout=300,
                                env={**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"})
    text = log.read_text()
    assert result.returncode == 0, text[-3000:]
    assert "\r" not in text  # no progress-bar redraws
    progress = re.findall(r"step (\d+)/6 \(\d+%\) \| loss (\d+\.\d+) \| (\d+\.\d) images/s \| ETA (.+)$", text,
                          flags=re.MULTILINE)
    assert [int(step) for step, *_ in progress] == [2, 4, 6], text
    assert progress[-1][3] == "0 s"
    assert max(len(line) for line in text.splitlines()) < 400


def test_eta_and_durations():
    now = [0.0]
    progress = TrainingProgress(total=100, initial=10, enabled=True, clock=lambda: now[0])
    assert progress.eta_seconds() is None
    now[0] = 30.0
    progress.update(10)  # 10 steps in 30 s: 80 steps left take 240 s
    assert progress.eta_seconds() == 240.0
    assert [format_duration(seconds) for seconds in (9, 95, 3725)] == ["9 s", "1 min 35 s", "1 h 02 min"]


def test_a_jupyter_kernel_counts_as_interactive_so_the_notebook_bar_shows(monkeypatch):
    """In Jupyter stderr is no terminal, yet tqdm.auto's notebook bar redraws in place: bars, not log lines."""
    import types

    from dino_hf.base import progress

    monkeypatch.setattr(progress.sys.stderr, "isatty", lambda: False, raising=False)
    assert not progress.in_notebook() and not progress.is_interactive()
    kernel = types.SimpleNamespace(config={"IPKernelApp": {}})
    monkeypatch.setitem(sys.modules, "IPython", types.SimpleNamespace(get_ipython=lambda: kernel))
    assert progress.in_notebook() and progress.is_interactive()
    bar = progress.TrainingProgress(total=4)
    assert bar._bar is not None
    bar.log_step(1.5, 1e-3, 100.0)
    assert bar._bar.postfix and "loss=1.5000" in bar._bar.postfix
    bar.close()


def test_log_lines_print_above_the_terminal_bar_not_into_it(monkeypatch, capsys):
    """While the bar is shown, the root logger's console handler writes through tqdm (a line of its own)."""
    import logging

    from dino_hf.base import progress

    monkeypatch.setattr(progress, "is_interactive", lambda: True)
    root = logging.getLogger()
    handler = logging.StreamHandler(sys.stderr)
    root.addHandler(handler)
    try:
        bar = progress.TrainingProgress(total=4)
        assert not any(existing is handler for existing in root.handlers)  # replaced by tqdm's for the bar's life
        bar.close()
        assert any(existing is handler for existing in root.handlers)
    finally:
        root.removeHandler(handler)

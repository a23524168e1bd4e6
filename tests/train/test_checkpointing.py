"""Checkpoints (dino_hf.train.checkpointing) through real training runs: resuming or overwriting an output
folder that holds checkpoints, refusing unsafe process state, atomic saves, verification and the
fallback of ``latest``, pruning, the run lock, the resume command and repeated signals.

Kill-and-resume, process-group signals, two runs on one folder and full disks live in
tests/test_training_processes.py.
"""

from __future__ import annotations

import json
import logging
import os
import shlex
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from tiny_models import read_rows, tiny_args

from dino_hf.base.errors import RunError
from dino_hf.train import checkpointing
from dino_hf.train.checkpointing import (
    COMPLETE_MARKER,
    RunLock,
    StopSignals,
    discard_folder,
    list_checkpoints,
    remove_leftovers,
    resume_command,
    verify_checkpoint,
)
from dino_hf.train.loop import train

pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")

REPO = Path(__file__).resolve().parents[2]


def _strip_timing(rows: list[dict]) -> list[dict]:
    timing = {"images_per_second", "data_wait_fraction", "elapsed_seconds"}
    return [{key: value for key, value in row.items() if key not in timing} for row in rows]


def _first_format_marker(checkpoint: Path) -> None:
    """Rewrite a checkpoint's marker as the first format wrote it (no sizes or checksums)."""
    step = json.loads((checkpoint / COMPLETE_MARKER).read_text())["step"]
    (checkpoint / COMPLETE_MARKER).write_text(json.dumps({"step": step}) + "\n")


def test_existing_checkpoints_need_resume_or_overwrite(dataset, tiny_config_file, tmp_path):
    output_dir = tmp_path / "run"
    train(tiny_args(dataset, output_dir, tiny_config_file, max_steps=2))
    with pytest.raises(ValueError, match="--resume_from_checkpoint latest"):
        train(tiny_args(dataset, output_dir, tiny_config_file, max_steps=2))
    result = train(tiny_args(dataset, output_dir, tiny_config_file, max_steps=2, overwrite_output_dir=True))
    assert result.step == 2
    # resuming a finished run is a no-op that rewrites the outputs
    result = train(tiny_args(dataset, output_dir, tiny_config_file, max_steps=2, resume_from_checkpoint="latest"))
    assert result.step == 2 and [row["step"] for row in read_rows(output_dir)] == [2]
    import numpy as np

    with pytest.raises(ValueError, match="--augmentation_device"):
        train(tiny_args(dataset, output_dir, tiny_config_file, max_steps=2, resume_from_checkpoint="latest",
                        augmentation_device="cpu"))
    # a process state that needs unsafe unpickling: its checksum no longer matches, so latest refuses it...
    checkpoint = list_checkpoints(output_dir)[-1]
    torch.save({"rng": {"numpy": np.random.get_state()}}, checkpoint / "process_state_0.pt")
    with pytest.raises(RunError, match="Every checkpoint .* is damaged .*process_state_0.pt"):
        train(tiny_args(dataset, output_dir, tiny_config_file, max_steps=2, resume_from_checkpoint="latest"))
    # ... and behind a marker of the first format (no checksums) it is read with weights_only=True and refused
    _first_format_marker(checkpoint)
    with pytest.raises(ValueError, match="unsafe unpickling"):
        train(tiny_args(dataset, output_dir, tiny_config_file, max_steps=2, resume_from_checkpoint="latest"))


def test_a_failed_save_leaves_no_complete_looking_folder_and_start_up_removes_leftovers(
    dataset, tiny_config_file, tmp_path, monkeypatch
):
    original = checkpointing._fsync_folder
    calls = {"count": 0}

    def crash_on_second_save(folder):
        calls["count"] += 1
        if calls["count"] == 2:
            raise OSError(5, "Input/output error")
        original(folder)

    monkeypatch.setattr(checkpointing, "_fsync_folder", crash_on_second_save)
    output_dir = tmp_path / "run"
    with pytest.raises(RunError, match="Writing the checkpoint of step 4 failed: Input/output error") as error:
        train(tiny_args(dataset, output_dir, tiny_config_file))
    assert "the earlier checkpoints are kept (newest: step_2)" in str(error.value)
    checkpoints = output_dir / "checkpoints"
    assert sorted(path.name for path in checkpoints.iterdir()) == ["step_2"]  # the partial save is gone
    monkeypatch.setattr(checkpointing, "_fsync_folder", original)
    # what killed runs leave behind: an unfinished save and a half-deleted pruned checkpoint
    for leftover in (".tmp-step_4", ".deleting-step_1"):
        (checkpoints / leftover).mkdir()
        (checkpoints / leftover / "model.safetensors").write_bytes(b"x" * 100)
    result = train(tiny_args(dataset, output_dir, tiny_config_file, resume_from_checkpoint="latest"))
    assert result.step == 4
    assert sorted(path.name for path in checkpoints.iterdir()) == ["step_2", "step_4"]


def test_latest_skips_a_damaged_newest_checkpoint_and_an_explicit_one_is_refused(
    dataset, tiny_config_file, tmp_path, caplog
):
    damaged = tmp_path / "damaged"
    train(tiny_args(dataset, damaged, tiny_config_file, logging_steps=1, checkpoints_total_limit=0))
    uninterrupted_rows = read_rows(damaged)
    newest = damaged / "checkpoints" / "step_4"
    assert verify_checkpoint(newest) is None
    # each file that a truncation can hit is caught (size first, then the checksum for same-size damage)
    for name in ("model.safetensors", "optimizer.bin", "process_state_0.pt", "training_state.json"):
        original = (newest / name).read_bytes()
        (newest / name).write_bytes(original[: len(original) // 2])
        assert f"{name} has {len(original) // 2} bytes where its marker recorded {len(original)}" == \
            verify_checkpoint(newest)
        (newest / name).write_bytes(original[:-1] + bytes([original[-1] ^ 1]))
        assert verify_checkpoint(newest) == f"{name} does not match the checksum its marker recorded"
        (newest / name).write_bytes(original)
    model = (newest / "model.safetensors").read_bytes()
    (newest / "model.safetensors").write_bytes(model[:1000])

    with pytest.raises(RunError, match=r"--resume_from_checkpoint .*step_4 is damaged \(model.safetensors has 1000"):
        train(tiny_args(dataset, damaged, tiny_config_file, logging_steps=1, resume_from_checkpoint=str(newest)))
    assert read_rows(damaged) == uninterrupted_rows  # a refused resume removes no row

    caplog.set_level(logging.WARNING, logger="dino_hf")
    result = train(tiny_args(dataset, damaged, tiny_config_file, logging_steps=1, resume_from_checkpoint="latest"))
    assert result.step == 4
    warnings = [record.getMessage() for record in caplog.records
                if record.levelno >= logging.WARNING and "damaged checkpoint" in record.getMessage()]
    assert len(warnings) == 1 and str(newest) in warnings[0] and "model.safetensors has 1000 bytes" in warnings[0]
    # resumed from step 2: its rows kept, steps 3 and 4 trained and logged again, exactly as the first time
    assert [row["step"] for row in read_rows(damaged)] == [1, 2, 3, 4]
    assert _strip_timing(read_rows(damaged)) == _strip_timing(uninterrupted_rows)


def test_a_checkpoint_of_the_first_marker_format_still_resumes(dataset, tiny_config_file, tmp_path):
    output_dir = tmp_path / "run"
    train(tiny_args(dataset, output_dir, tiny_config_file))
    for checkpoint in list_checkpoints(output_dir):
        _first_format_marker(checkpoint)
    assert verify_checkpoint(output_dir / "checkpoints" / "step_4") is None
    result = train(tiny_args(dataset, output_dir, tiny_config_file, max_steps=6, resume_from_checkpoint="latest"))
    assert result.step == 6
    # a first-format checkpoint whose training state was cut short is refused by name
    (output_dir / "checkpoints" / "step_6" / "training_state.json").write_text('{"step": 6, "pl')
    _first_format_marker(output_dir / "checkpoints" / "step_6")
    with pytest.raises(RunError, match="step_6 is damaged \\(training_state.json is not valid JSON"):
        train(tiny_args(dataset, output_dir, tiny_config_file, max_steps=6,
                        resume_from_checkpoint=str(output_dir / "checkpoints" / "step_6")))


def test_a_resume_of_another_model_size_is_refused_and_keeps_every_metrics_row(dataset, tiny_config_file, tmp_path):
    output_dir = tmp_path / "run"
    train(tiny_args(dataset, output_dir, tiny_config_file, logging_steps=1))
    rows = read_rows(output_dir)
    with pytest.raises(RunError, match="holds another model .* resume with the --model_config"):
        train(tiny_args(dataset, output_dir, tiny_config_file, max_steps=6,
                        config_overrides="backbone_config.intermediate_size=96",
                        resume_from_checkpoint=str(output_dir / "checkpoints" / "step_2")))
    assert read_rows(output_dir) == rows and [row["step"] for row in rows] == [1, 2, 3, 4]


def test_a_total_limit_of_0_keeps_every_checkpoint(dataset, tiny_config_file, tmp_path):
    output_dir = tmp_path / "run"
    train(tiny_args(dataset, output_dir, tiny_config_file, max_steps=8, checkpointing_steps=2,
                    checkpoints_total_limit=0))
    assert [path.name for path in list_checkpoints(output_dir)] == ["step_2", "step_4", "step_6", "step_8"]
    with pytest.raises(ValueError, match="--checkpoints_total_limit must be 0"):
        tiny_args(dataset, output_dir, tiny_config_file, checkpoints_total_limit=-1)


def test_pruning_renames_a_checkpoint_out_of_the_namespace_before_deleting_it(tmp_path, monkeypatch):
    checkpoints = tmp_path / "run" / "checkpoints"
    old = checkpoints / "step_2"
    old.mkdir(parents=True)
    (old / COMPLETE_MARKER).write_text("{}")
    (old / "model.safetensors").write_bytes(b"x" * 1000)

    def killed(path, ignore_errors=False):  # the process dies while deleting
        raise KeyboardInterrupt

    monkeypatch.setattr(checkpointing.shutil, "rmtree", killed)
    with pytest.raises(KeyboardInterrupt):
        discard_folder(old)
    monkeypatch.undo()
    assert not old.exists() and (checkpoints / ".deleting-step_2" / "model.safetensors").is_file()
    assert list_checkpoints(tmp_path / "run") == []
    remove_leftovers(tmp_path / "run")
    assert list(checkpoints.iterdir()) == []


def _hold_lock_in_a_process(output_dir: Path) -> subprocess.Popen:
    code = textwrap.dedent(f"""
        import sys, time
        from dino_hf.train.checkpointing import RunLock
        lock = RunLock({str(output_dir)!r})
        lock.acquire()
        print("locked", flush=True)
        time.sleep(120)
    """)
    process = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True,
                               env={**os.environ, "PYTHONPATH": str(REPO)})
    assert process.stdout.readline().strip() == "locked"
    return process


def test_the_run_lock_names_its_holder_and_a_dead_holders_lock_is_taken_over(tmp_path, caplog):
    output_dir = tmp_path / "run"
    holder = _hold_lock_in_a_process(output_dir)
    try:
        with pytest.raises(RunError, match=f"is in use by another run \\(host .*, pid {holder.pid}, since .*\\): wait"):
            RunLock(output_dir).acquire()
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    caplog.set_level(logging.INFO, logger="dino_hf")
    lock = RunLock(output_dir)
    lock.acquire()  # the dead holder's lock file is still there, its lock is not
    assert any(f"pid {holder.pid}" in record.getMessage() and "no longer running" in record.getMessage()
               for record in caplog.records)
    assert json.loads(lock.path.read_text())["pid"] == os.getpid()
    with pytest.raises(RunError, match=f"pid {os.getpid()}"):
        RunLock(output_dir).acquire()  # a second lock in the same process is refused too (own descriptor)
    lock.release()
    RunLock(output_dir).acquire()


def test_a_run_on_a_folder_another_run_holds_is_refused_before_touching_it(dataset, tiny_config_file, tmp_path):
    output_dir = tmp_path / "run"
    train(tiny_args(dataset, output_dir, tiny_config_file))
    before = {path.relative_to(output_dir): path.stat().st_mtime_ns for path in output_dir.rglob("*")
              if path.name != ".dino_hf.lock"}
    holder = _hold_lock_in_a_process(output_dir)
    try:
        with pytest.raises(RunError, match=f"pid {holder.pid}"):
            train(tiny_args(dataset, output_dir, tiny_config_file, overwrite_output_dir=True))
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    after = {path.relative_to(output_dir): path.stat().st_mtime_ns for path in output_dir.rglob("*")
             if path.name != ".dino_hf.lock"}
    assert after == before  # --overwrite_output_dir deleted nothing


def test_the_resume_command_is_shell_quoted_and_resumes_latest():
    argv = ["scripts/train.py", "--output_dir", "runs/my run; rm -rf ~", "--overwrite_output_dir", "--max_steps", "9",
            "--tracker_project_name", "it's", "--resume_from_checkpoint", "/ckpt/step_2"]
    command = resume_command(argv)
    assert shlex.split(command) == ["scripts/train.py", "--output_dir", "runs/my run; rm -rf ~", "--max_steps", "9",
                                    "--tracker_project_name", "it's", "--resume_from_checkpoint", "latest"]
    assert shlex.split(resume_command(["train.py", "--overwrite_output_dir", "true", "--seed", "1"])) == \
        ["train.py", "--seed", "1", "--resume_from_checkpoint", "latest"]
    assert shlex.split(resume_command(["train.py", "--overwrite_output_dir=true", "--resume_from_checkpoint=x"])) == \
        ["train.py", "--resume_from_checkpoint", "latest"]


def test_repeated_stop_signals_are_noted_and_do_not_stop_the_process():
    with StopSignals() as signals:
        for signum in (signal.SIGTERM, signal.SIGTERM, signal.SIGINT):
            os.kill(os.getpid(), signum)
            deadline = time.monotonic() + 5
            while signals.received is None and time.monotonic() < deadline:
                time.sleep(0.01)
        time.sleep(0.05)
    assert signals.received == "SIGTERM" and signals.repeated == 2
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL  # restored on exit

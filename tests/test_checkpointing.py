"""Checkpoints (dino_hf.checkpointing) through real training runs: resuming or overwriting an output
folder that holds checkpoints, refusing unsafe process state, and atomic saves.

Kill-and-resume and signal tests live in tests/test_training_processes.py.
"""

from __future__ import annotations

import pytest
import torch
from tiny_models import read_rows, tiny_args

from dino_hf import checkpointing
from dino_hf.checkpointing import list_checkpoints
from dino_hf.training import train

pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")


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
    # the per-process state is read with weights_only=True: a file that needs unsafe unpickling is refused
    import numpy as np

    with pytest.raises(ValueError, match="--augmentation_device"):
        train(tiny_args(dataset, output_dir, tiny_config_file, max_steps=2, resume_from_checkpoint="latest",
                        augmentation_device="cpu"))
    process_state = list_checkpoints(output_dir)[-1] / "process_state_0.pt"
    torch.save({"rng": {"numpy": np.random.get_state()}}, process_state)
    with pytest.raises(ValueError, match="unsafe unpickling"):
        train(tiny_args(dataset, output_dir, tiny_config_file, max_steps=2, resume_from_checkpoint="latest"))


def test_a_crash_during_a_save_leaves_no_complete_looking_folder(dataset, tiny_config_file, tmp_path, monkeypatch):
    original = checkpointing._fsync_folder
    calls = {"count": 0}

    def crash_on_second_save(folder):
        calls["count"] += 1
        if calls["count"] == 2:
            raise RuntimeError("simulated crash while saving")
        original(folder)

    monkeypatch.setattr(checkpointing, "_fsync_folder", crash_on_second_save)
    output_dir = tmp_path / "run"
    with pytest.raises(RuntimeError, match="simulated crash"):
        train(tiny_args(dataset, output_dir, tiny_config_file))
    checkpoints = output_dir / "checkpoints"
    assert sorted(path.name for path in checkpoints.iterdir()) == [".tmp-step_4", "step_2"]
    assert [path.name for path in list_checkpoints(output_dir)] == ["step_2"]
    monkeypatch.setattr(checkpointing, "_fsync_folder", original)
    result = train(tiny_args(dataset, output_dir, tiny_config_file, resume_from_checkpoint="latest"))
    assert result.step == 4
    assert sorted(path.name for path in checkpoints.iterdir()) == ["step_2", "step_4"]

"""A run folder and a checkpoint written before the move into subpackages (commit 7062683, the flat
layout) still load, export and resume: ``tests/fixtures/run_before_subpackages`` (its README says how
it was made)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from tiny_models import read_rows, tiny_args
from transformers import AutoModel, ViTModel

from dino_hf import DinoForPreTraining

pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")

FIXTURE = Path(__file__).parent / "fixtures" / "run_before_subpackages"
#: Columns that measure the machine, not the run.
TIMING_COLUMNS = ("images_per_second", "data_wait_fraction", "elapsed_seconds")


def test_the_old_run_folder_loads_with_the_auto_classes_and_exports_its_teacher(tmp_path):
    model = AutoModel.from_pretrained(FIXTURE / "run")
    assert isinstance(model, DinoForPreTraining)
    model.save_backbone(tmp_path / "backbone")
    exported = ViTModel.from_pretrained(tmp_path / "backbone")  # today's export: an identity pooler added
    shipped = ViTModel.from_pretrained(FIXTURE / "run" / "backbone", add_pooling_layer=False)  # the old one had none
    exported_weights = exported.state_dict()
    for name, expected in shipped.state_dict().items():
        assert torch.equal(exported_weights[name], expected), name


def test_the_old_step_2_checkpoint_resumes_to_the_old_step_4_weights_and_rows(tmp_path):
    from dino_hf.train.loop import train

    output_dir = tmp_path / "run"
    shutil.copytree(FIXTURE / "run", output_dir)
    for name in ("model.safetensors", "config.json", "backbone"):
        path = output_dir / name
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    args = tiny_args(FIXTURE / "data", output_dir, FIXTURE / "model_config" / "config.json", max_steps=4,
                     logging_steps=1, checkpointing_steps=2, checkpoints_total_limit=None, mixed_precision="no",
                     torch_num_threads=1, resume_from_checkpoint="latest")
    train(args)

    # The fixture was written on another CPU: its kernels may sum in another order, so the weights and rows
    # agree to float32 rounding rather than bit for bit (bit-exact resumption on one machine is
    # tests/train/test_checkpointing.py's and test_loop.py's).
    expected = load_file(FIXTURE / "run" / "model.safetensors")
    resumed = load_file(output_dir / "model.safetensors")
    assert expected.keys() == resumed.keys()
    for name, value in expected.items():
        # a key bias has no gradient in exact arithmetic (softmax ignores a shift of every score): AdamW turns
        # its rounding noise into steps of the learning rate's size, so it only matches to that
        tolerance = {"atol": 1e-4} if name.endswith("attention.key.bias") else {"atol": 1e-7}
        torch.testing.assert_close(resumed[name], value, rtol=1e-5, msg=name, **tolerance)

    def comparable(rows: list[dict]) -> list[dict]:
        return [{key: value for key, value in row.items() if key not in TIMING_COLUMNS} for row in rows]

    old_rows = comparable([json.loads(line) for line in (FIXTURE / "run" / "metrics.jsonl").read_text().splitlines()])
    new_rows = comparable(read_rows(output_dir))
    assert [sorted(row) for row in new_rows] == [sorted(row) for row in old_rows]
    for new_row, old_row in zip(new_rows, old_rows, strict=True):
        for key, value in old_row.items():
            assert new_row[key] == pytest.approx(value, rel=1e-5, abs=1e-7), key

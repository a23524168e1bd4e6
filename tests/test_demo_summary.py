"""scripts/demo_summary.py: make demo's scores of any family's export, its baselines and its verdict line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from dino_hf.models.backbones import family_of, save_backbone
from tests.tiny_models import tiny_backbone_config


def _run_folder(root: Path, model_type: str) -> Path:
    config = tiny_backbone_config(model_type)
    save_backbone(family_of(config).build(config).eval(), root / "backbone", image_size=32)
    (root / "training_args.json").write_text(json.dumps({"machine_cpu": "Test CPU, 2 cores",
                                                         "resolved_mixed_precision": "no"}))
    return root


@pytest.mark.parametrize(("model_type", "described"), [("vit", "ViT: 2 layers, width 32, patch 8"),
                                                      ("resnet", "ResNet: stage widths [16, 32], depths [1, 1]")])
def test_scores_an_export_of_either_family_next_to_its_baselines(model_type, described, labelled_parquet, tmp_path,
                                                                 import_script, capsys):
    output_dir = _run_folder(tmp_path / model_type, model_type)
    summary = import_script("demo_summary")
    results = summary.main(["--output_dir", str(output_dir), "--data_dir", str(labelled_parquet), "--batch_size", "8",
                            "--k", "3"])
    printed = capsys.readouterr().out
    assert (results["num_train"], results["num_test"]) == (24, 12)
    for name in ("trained_backbone", "raw_pixels", "random_weights"):
        assert 0.0 <= results[name] <= 1.0
    assert described in printed and "same network, random weights" in printed
    # the verdict names the machine and says fp32, not the flag value "no"
    assert "on Test CPU, 2 cores, fp32 precision" in printed
    assert json.loads((output_dir / "demo_summary.json").read_text())["raw_pixels"] == results["raw_pixels"]
    # the baselines are cached next to the data: a second call reads them back
    summary.main(["--output_dir", str(output_dir), "--data_dir", str(labelled_parquet), "--batch_size", "8", "--k", "3"])
    assert "raw pixels (cached)" in capsys.readouterr().out

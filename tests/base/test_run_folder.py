"""A run's output folder (dino_hf.base.run_folder): layout errors that name the flag, and secret scrubbing."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
from tiny_models import TOKEN, write_training_output

from dino_hf.base.run_folder import read_training_output, scrub_secrets

REPO_ROOT = Path(__file__).resolve().parents[2]
PUSH_SCRIPT = REPO_ROOT / "scripts" / "push_to_hub.py"


def test_layout_errors_name_the_flag(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("push_to_hub_script", PUSH_SCRIPT)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)

    assert script.main(["--model_dir", str(tmp_path), "--repo_id", "tester/x", "--token", TOKEN]) == 2
    assert "--output_dir" in capsys.readouterr().err

    run = write_training_output(tmp_path / "run")
    (run / "backbone" / "model.safetensors").rename(run / "backbone" / "pytorch_model.bin")
    with pytest.raises(ValueError, match="safetensors"):
        read_training_output(run)
    assert script.main(["--model_dir", str(run), "--repo_id", "tester/x", "--token", TOKEN]) == 2
    assert "safetensors" in capsys.readouterr().err

    bare = write_training_output(tmp_path / "bare")
    with pytest.raises(FileNotFoundError, match="--include_training_model"):
        read_training_output(bare / "backbone", include_training_model=True)
    assert script.main(["--model_dir", str(bare), "--repo_id", "tester/x", "--dry_run"]) == 0
    out = capsys.readouterr().out
    assert "model.safetensors  <-" in out and "library_name: transformers" in out


@pytest.mark.parametrize("model_type", ["vit", "convnext", "resnet", "dinov2"])
def test_a_bare_backbone_folder_of_any_family_is_shared_as_it_is(model_type, tmp_path):
    """An exported backbone on its own (no run around it) is what it shares, whatever its family; a
    DinoForPreTraining folder without backbone/ is not mistaken for one."""
    from tiny_models import tiny_family_config

    from dino_hf.models.modeling_dino import DinoForPreTraining

    model = DinoForPreTraining(tiny_family_config(model_type))
    model.save_backbone(tmp_path / "export", image_size=32)
    shared = read_training_output(tmp_path / "export")
    assert set(shared.files) >= {"config.json", "preprocessor_config.json", "model.safetensors"}
    model.save_pretrained(tmp_path / "dino")
    with pytest.raises(FileNotFoundError, match="has no backbone/ folder"):
        read_training_output(tmp_path / "dino")


def test_scrub_secrets():
    assert scrub_secrets(f"token={TOKEN}!", TOKEN) == "token=***!"
    assert scrub_secrets("Bearer hf_abcdefghijklmnopqrstuvwxyz") == "Bearer hf_***"
    assert scrub_secrets("no secret here", None) == "no secret here"

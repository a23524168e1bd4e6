"""The converter against an independent implementation that uses the official key names (timm)."""

import argparse
import functools
import json
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoModel

from dino_hf.hub.convert import backbone_from_official, convert_checkpoint

timm_vision_transformer = pytest.importorskip("timm.models.vision_transformer")
REPO_ROOT = Path(__file__).resolve().parents[2]
HIDDEN, HEADS, PATCH, IMAGE = 128, 2, 8, 32  # 64-dim heads, like every official DINO ViT


def official_vit(seed: int) -> nn.Module:
    """A timm VisionTransformer with DINO's settings and random (non-trivial) weights."""
    torch.manual_seed(seed)
    model = timm_vision_transformer.VisionTransformer(
        img_size=IMAGE, patch_size=PATCH, embed_dim=HIDDEN, depth=2, num_heads=HEADS, mlp_ratio=4,
        qkv_bias=True, norm_layer=functools.partial(nn.LayerNorm, eps=1e-6), num_classes=0,
    )
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.normal_(0.0, 0.1)
    return model.eval()


def official_head(in_dim: int, out_dim: int, hidden: int = 48, bottleneck: int = 16) -> nn.Module:
    """The official DINOHead, written independently of dino_hf (nn.utils weight_norm, Sequential MLP)."""

    class Head(nn.Module):
        def __init__(self):
            super().__init__()
            self.mlp = nn.Sequential(
                nn.Linear(in_dim, hidden), nn.GELU(), nn.Linear(hidden, hidden), nn.GELU(), nn.Linear(hidden, bottleneck)
            )
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                self.last_layer = nn.utils.weight_norm(nn.Linear(bottleneck, out_dim, bias=False))
            self.last_layer.weight_g.data.fill_(1)

        def forward(self, x):
            return self.last_layer(F.normalize(self.mlp(x), dim=-1, p=2))

    return Head()


def cls_embedding(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.forward_features(images)[:, 0]


def test_bare_backbone_matches_timm(tmp_path):
    reference = official_vit(seed=0)
    checkpoint = tmp_path / "dino_vit_pretrain.pth"
    torch.save(reference.state_dict(), checkpoint)
    convert_checkpoint(checkpoint, tmp_path / "out")
    backbone = AutoModel.from_pretrained(tmp_path / "out").eval()  # the identity pooler: nothing missing
    assert backbone.config.num_attention_heads == HEADS
    assert backbone.config.image_size == IMAGE and backbone.config.layer_norm_eps == 1e-6
    images = torch.randn(3, 3, IMAGE, IMAGE)
    with torch.no_grad():
        ours = backbone(pixel_values=images).last_hidden_state[:, 0]
    expected = cls_embedding(reference, images)
    assert torch.allclose(ours, expected, atol=1e-5, rtol=1e-4)
    # sanity: the comparison can fail — another random model gives other features
    assert not torch.allclose(cls_embedding(official_vit(seed=1), images), expected, atol=1e-3)


def test_prefixed_keys_and_explicit_head_count():
    reference = official_vit(seed=2)
    state = {f"module.backbone.{key}": value for key, value in reference.state_dict().items()}
    backbone = backbone_from_official(state, num_attention_heads=4)
    assert backbone.config.num_attention_heads == 4


def test_full_training_checkpoint(tmp_path):
    student, teacher = official_vit(seed=3), official_vit(seed=4)
    student_head, teacher_head = official_head(HIDDEN, 32), official_head(HIDDEN, 32)
    checkpoint = {
        "student": {
            **{f"module.backbone.{k}": v for k, v in student.state_dict().items()},
            **{f"module.head.{k}": v for k, v in student_head.state_dict().items()},
        },
        "teacher": {
            **{f"backbone.{k}": v for k, v in teacher.state_dict().items()},
            **{f"head.{k}": v for k, v in teacher_head.state_dict().items()},
        },
        "dino_loss": {"center": torch.randn(1, 32)},
        "epoch": 3,
        "args": argparse.Namespace(arch="vit_small", out_dim=32),
    }
    path = tmp_path / "checkpoint.pth"
    torch.save(checkpoint, path)
    convert_checkpoint(path, tmp_path / "out", save_training_model=True)

    images = torch.randn(2, 3, IMAGE, IMAGE)
    backbone = AutoModel.from_pretrained(tmp_path / "out").eval()  # the identity pooler: nothing missing
    with torch.no_grad():
        exported = backbone(pixel_values=images).last_hidden_state[:, 0]
    assert torch.allclose(exported, cls_embedding(teacher, images), atol=1e-5, rtol=1e-4)

    from dino_hf import DinoForPreTraining

    model = DinoForPreTraining.from_pretrained(tmp_path / "out" / "training_model").eval()
    assert model.config.num_prototypes == 32 and model.config.head_hidden_size == 48
    assert torch.equal(model.loss_fn.center, checkpoint["dino_loss"]["center"])
    with torch.no_grad():
        for network, reference, head in ((model.student, student, student_head), (model.teacher, teacher, teacher_head)):
            expected_logits = head(cls_embedding(reference, images))
            assert torch.allclose(network.head(network.embed(images)), expected_logits, atol=1e-5, rtol=1e-4)
    # the official run's epoch travels with the import: a run started from it continues the schedules
    progress = json.loads((tmp_path / "out" / "training_model" / "pretraining_progress.json").read_text())
    assert progress == {"epoch": 3.0, "source": "checkpoint.pth"}


@pytest.mark.usefixtures("fresh_accelerate_state")
def test_training_from_an_imported_checkpoint_continues_at_its_epoch(tmp_path):
    """A DinoForPreTraining folder with pretraining_progress.json (epoch 2) starts at step 2 x steps per epoch."""
    from image_datasets import write_parquet_dataset
    from tiny_models import read_rows, tiny_args, tiny_dino_config

    from dino_hf import DinoForPreTraining
    from dino_hf.train.loop import train

    dataset = write_parquet_dataset(tmp_path / "data", num_images=32, image_size=40, num_shards=2)
    folder = tmp_path / "imported"
    DinoForPreTraining(tiny_dino_config()).save_pretrained(folder)
    (folder / "pretraining_progress.json").write_text(json.dumps({"epoch": 2, "source": "checkpoint.pth"}))
    # 32 images / batch 8 = 4 steps per epoch; 5 epochs = 20 steps, of which the first 8 were done
    result = train(tiny_args(dataset, tmp_path / "run", tmp_path / "unused.json", model_name_or_path=str(folder),
                             max_steps=None, num_train_epochs=5, warmup_steps=None, freeze_last_layer_steps=None,
                             logging_steps=4, checkpointing_steps=100, mixed_precision="no"))
    rows = [row for row in read_rows(tmp_path / "run") if "loss" in row]
    assert result.step == 20 and [row["step"] for row in rows] == [12, 16, 20]


def test_shapes_that_match_no_vit_raise_one_sentence(tmp_path):
    state = official_vit(seed=5).state_dict()
    state["pos_embed"] = torch.zeros(1, 7, HIDDEN)  # 6 patches: not a square grid
    with pytest.raises(ValueError, match="pos_embed"):
        backbone_from_official(state)
    with pytest.raises(ValueError, match="missing"):
        backbone_from_official({"fc.weight": torch.zeros(2, 2)})


@pytest.mark.slow  # seven script processes (17 s); convert_checkpoint's errors are unit-tested in the default run
def test_script_reports_bad_input_with_exit_status_2(tmp_path):
    bogus = tmp_path / "bogus.pth"
    torch.save({"fc.weight": torch.zeros(2, 2)}, bogus)
    for checkpoint in (bogus, tmp_path / "missing.pth"):
        result = subprocess.run(
            [sys.executable, str(REPO_ROOT / "scripts" / "convert_dino_checkpoint.py"),
             "--checkpoint", str(checkpoint), "--output_dir", str(tmp_path / "out")],
            capture_output=True, text=True, timeout=120,
        )
        assert result.returncode == 2
        assert "Traceback" not in result.stderr
        assert result.stderr.strip().startswith("convert_dino_checkpoint.py: error:")
        assert len(result.stderr.strip().splitlines()) == 1

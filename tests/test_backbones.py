"""Tests of dino_hf.backbones on the tiny ViT of a DinoForPreTraining: the class-token embedding,
stochastic depth through hooks, and the export as a stock transformers folder."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
import torch
from tiny_models import tiny_dino_config
from transformers import ViTModel

from dino_hf import DinoForPreTraining


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
@pytest.mark.parametrize("size", [32, 16])  # configured size and interpolated position embeddings
def test_class_token_only_last_block_matches_the_full_backbone(attention, size):
    """embed() computes only the CLS row of the last block: same values and gradients as ViTModel."""
    torch.manual_seed(0)
    model = DinoForPreTraining(tiny_dino_config(drop_path_rate=0.0)).to(torch.float64)
    network = model.student
    network.backbone.set_attn_implementation(attention)
    images = torch.randn(5, 3, size, size, dtype=torch.float64)
    ours = network.embed(images)
    full = network.backbone(pixel_values=images, interpolate_pos_encoding=True).last_hidden_state[:, 0]
    torch.testing.assert_close(ours, full, rtol=1e-10, atol=1e-10)
    weights = torch.randn_like(ours)
    parameters = [p for p in network.backbone.parameters() if p.requires_grad]
    ours_gradients = torch.autograd.grad((ours * weights).sum(), parameters, allow_unused=True)
    full_gradients = torch.autograd.grad((full * weights).sum(), parameters, allow_unused=True)
    for ours_gradient, full_gradient in zip(ours_gradients, full_gradients, strict=True):
        if full_gradient is None:
            assert ours_gradient is None
        else:
            torch.testing.assert_close(ours_gradient, full_gradient, rtol=1e-9, atol=1e-10)


def test_stochastic_depth_on_the_student_only(model):
    images = torch.randn(4, 3, 32, 32)
    model.train()
    assert not torch.allclose(model.embed(images, "student"), model.embed(images, "student"))
    assert torch.equal(model.embed(images, "teacher"), model.embed(images, "teacher"))
    model.eval()
    assert torch.equal(model.embed(images, "student"), model.embed(images, "student"))
    # the exported student has the plain ViT weights: stochastic depth lives in hooks, not weights
    assert set(model.student.backbone.state_dict()) == set(model.teacher.backbone.state_dict())


def test_exported_backbone_loads_with_plain_transformers(model, tmp_path):
    """In a process that never imports dino_hf: AutoModel, AutoImageProcessor and the pipeline."""
    with torch.no_grad():
        for parameter in model.teacher.parameters():
            parameter.add_(0.01 * torch.randn_like(parameter))  # teacher != student
    backbone_dir = model.save_backbone(tmp_path / "backbone")
    processor_config = json.loads((backbone_dir / "preprocessor_config.json").read_text())
    assert processor_config["image_mean"] == [0.485, 0.456, 0.406]
    assert processor_config["size"] == {"height": 32, "width": 32}

    pixel_values = torch.randn(2, 3, 32, 32)
    torch.save(pixel_values, tmp_path / "pixels.pt")
    model.eval()
    with torch.no_grad():
        expected = model.embed(pixel_values, "teacher")
    script = textwrap.dedent(
        f"""
        import sys
        import numpy as np
        import torch
        from PIL import Image
        from transformers import AutoImageProcessor, AutoModel, pipeline
        backbone = AutoModel.from_pretrained({str(backbone_dir)!r}, add_pooling_layer=False).eval()
        assert type(backbone).__name__ == "ViTModel"
        pixels = torch.load({str(tmp_path / "pixels.pt")!r}, weights_only=True)
        with torch.no_grad():
            cls = backbone(pixel_values=pixels).last_hidden_state[:, 0]
        torch.save(cls, {str(tmp_path / "cls.pt")!r})
        processor = AutoImageProcessor.from_pretrained({str(backbone_dir)!r})
        picture = Image.fromarray(np.random.default_rng(0).integers(0, 255, (50, 70, 3), dtype=np.uint8))
        assert processor(picture, return_tensors="pt")["pixel_values"].shape == (1, 3, 32, 32)
        extractor = pipeline("image-feature-extraction", model={str(backbone_dir)!r})
        features = np.asarray(extractor(picture))
        assert features.shape[-1] == 32, features.shape
        assert "dino_hf" not in sys.modules
        print("ok")
        """
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    assert torch.allclose(torch.load(tmp_path / "cls.pt", weights_only=True), expected, atol=1e-5)


def test_exported_backbone_has_no_pooler_weights(model, tmp_path):
    model.save_backbone(tmp_path)
    loaded = ViTModel.from_pretrained(tmp_path, add_pooling_layer=False)
    assert loaded.config.layer_norm_eps == 1e-6
    assert loaded.pooler is None

"""Tests of dino_hf.eval.visualization and scripts/visualize_attention.py: attention maps, their overlays and
thresholds, and the training curves."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image
from tiny_models import tiny_backbone_config, tiny_vit

from dino_hf.eval.visualization import attention_maps, plot_training_curves, save_attention_maps, threshold_attention

# ------------------------------------------------------------------------------------- attention


def test_attention_maps_shape_from_eager_model():
    model = tiny_vit("eager")
    maps = attention_maps(model, torch.randn(3, 3, 32, 32))
    assert maps.shape == (3, 2, 4, 4)
    assert (maps >= 0).all() and (maps.sum(dim=(2, 3)) <= 1 + 1e-5).all()
    # interpolated position embeddings at a larger, non-square resolution
    assert attention_maps(model, torch.randn(1, 3, 48, 64)).shape == (1, 2, 6, 8)
    # the maps are the CLS row of the last layer's attention (patches only)
    with torch.no_grad():
        last = model(torch.zeros(1, 3, 32, 32), output_attentions=True).attentions[-1]
    torch.testing.assert_close(attention_maps(model, torch.zeros(1, 3, 32, 32)), last[:, :, 0, 1:].reshape(1, 2, 4, 4))


@pytest.mark.parametrize("model_type", ["dinov2_with_registers", "dinov3_vit"])
def test_attention_maps_leave_the_registers_out(model_type):
    """CLS attention over the patches only: the 2 register tokens between CLS and the patches are skipped."""
    from transformers import AutoModel

    torch.manual_seed(0)
    model = AutoModel.from_config(tiny_backbone_config(model_type), attn_implementation="eager").eval()
    pixels = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        last = model(pixel_values=pixels, output_attentions=True).attentions[-1]
    assert last.shape[-1] == 1 + 2 + 16
    torch.testing.assert_close(attention_maps(model, pixels), last[:, :, 0, 3:].reshape(1, 2, 4, 4))


def test_attention_maps_switch_an_sdpa_model_temporarily():
    model = tiny_vit("sdpa")
    assert attention_maps(model, torch.randn(1, 3, 32, 32)).shape == (1, 2, 4, 4)
    assert model.config._attn_implementation == "sdpa"


def test_threshold_attention_keeps_sixty_percent_of_the_mass():
    maps = torch.tensor([[0.1, 0.5], [0.3, 0.1]])
    assert threshold_attention(maps, 0.6).tolist() == [[False, True], [True, False]]
    assert threshold_attention(maps, 0.5).tolist() == [[False, True], [False, False]]
    assert threshold_attention(maps * 7, 0.6).tolist() == [
        [False, True],
        [True, False],
    ]  # unnormalised
    batch = torch.rand(2, 3, 4, 5)
    masks = threshold_attention(batch, 0.6)
    assert masks.shape == batch.shape and masks.dtype == torch.bool
    kept = (batch * masks).sum(dim=(-2, -1)) / batch.sum(dim=(-2, -1))
    assert (kept >= 0.6 - 1e-6).all()


def test_save_attention_maps_writes_pngs(tmp_path):
    image = Image.new("RGB", (32, 32), (120, 40, 200))
    attentions = attention_maps(tiny_vit("eager"), torch.randn(1, 3, 32, 32))[0]
    paths = save_attention_maps(image, attentions, tmp_path, prefix="x-")
    names = sorted(path.name for path in paths)
    assert names == sorted(
        [
            "x-head0.png",
            "x-head0-mask.png",
            "x-head1.png",
            "x-head1-mask.png",
            "x-mean.png",
            "x-mean-mask.png",
            "x-grid.png",
        ]
    )
    # 32 px is enlarged 7x (nearest) for display: shorter side >= 224
    assert Image.open(tmp_path / "x-head0.png").size == (224, 224)
    with Image.open(tmp_path / "x-grid.png") as grid:  # image, 2 heads, mean; titles, row labels, colour bar
        assert grid.width > 224 * 4 and grid.height > 448
    paths = save_attention_maps(image, attentions, tmp_path / "raw", min_display_size=1)
    assert Image.open(paths[0]).size == (32, 32)


def test_visualize_attention_script(tmp_path, tiny_backbone, capsys, import_script):
    visualize_attention = import_script("visualize_attention")
    image_path = tmp_path / "picture.png"
    Image.new("RGB", (50, 40), (10, 200, 30)).save(image_path)
    output_dir = tmp_path / "out"
    argv = ["--model", str(tiny_backbone), "--image", str(image_path), "--output_dir", str(output_dir)]
    assert visualize_attention.main([*argv, "--image_size", "40"]) == 0
    assert len(list((output_dir / "picture").glob("*.png"))) == 7
    # shorter side 40 -> 50x40, cropped to multiples of the patch (8) -> 48x40, enlarged 6x for display
    with Image.open(output_dir / "picture" / "head1-mask.png") as mask:
        assert mask.size == (48 * 6, 40 * 6)
    assert (output_dir / "picture" / "mean.png").exists()
    for bad_argv, needle in [
        (["--model", str(tiny_backbone), "--image", str(tmp_path / "none.png")], "none.png"),
        (["--model", str(tmp_path / "nowhere"), "--image", str(image_path)], "--model"),
    ]:
        assert visualize_attention.main(bad_argv, prog="visualize_attention.py") == 2
        error = capsys.readouterr().err.strip().splitlines()[-1]
        assert error.startswith("visualize_attention.py: error: ") and needle in error, error


# ------------------------------------------------------------------------------------------ plots


def test_plot_training_curves(tmp_path):
    pytest.importorskip("matplotlib")
    metrics = tmp_path / "metrics.jsonl"
    rows = [
        {
            "step": step,
            "loss": 8.0 - step / 10,
            "learning_rate": 1e-4 * (step + 1),
            "teacher_entropy": 4.0,
            "teacher_mean_entropy": 3.0,
        }
        for step in range(20)
    ]
    rows += [{"step": 10, "knn_top1_k20": 0.4}, {"step": 19, "knn_top1_k20": 0.55}]
    metrics.write_text("\n".join(json.dumps(row) for row in rows) + "\n{truncated")
    output = tmp_path / "curves" / "training_curves.png"
    plot_training_curves(metrics, output)
    with Image.open(output) as picture:
        assert picture.format == "PNG" and picture.size[0] > 500
    # only a loss column: the other panels say "no data" but the file is written
    (tmp_path / "loss_only.jsonl").write_text(json.dumps({"step": 0, "loss": 1.0}) + "\n")
    plot_training_curves(tmp_path / "loss_only.jsonl", tmp_path / "loss_only.png")
    assert (tmp_path / "loss_only.png").exists()

"""Pictures of a backbone and of a run: attention maps, their overlays and grids, training curves.

- :func:`attention_maps`: the last layer's CLS -> patch self-attention per head (extra tokens such as
  registers between CLS and the patches skipped);
- :func:`threshold_attention`: the DINO-paper masks (the smallest set of patches holding 60 % of the
  attention mass, official ``visualize_attention.py --threshold 0.6``);
- overlays, grids and :func:`save_attention_maps` for PNG files and trackers;
- :func:`plot_training_curves`: loss, KL, entropies, gradient norm, accuracy and learning rate of a
  ``metrics.jsonl``.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont
from torch import Tensor, nn

from dino_hf.base.run_folder import read_metrics
from dino_hf.models.backbones import backbone_forward, config_patch_size

logger = logging.getLogger(__name__)

__all__ = [
    "attention_grid",
    "attention_maps",
    "attention_overlay",
    "mask_overlay",
    "plot_training_curves",
    "save_attention_maps",
    "threshold_attention",
]


@torch.inference_mode()
def attention_maps(backbone: nn.Module, pixel_values: Tensor) -> Tensor:
    """The last layer's CLS self-attention over the patches, per head.

    Needs attention weights: a model loaded with ``attn_implementation="eager"`` returns them; for any
    other implementation (``sdpa`` in training) the backbone is switched to ``eager`` for this call and
    switched back.

    Args:
        backbone: ViT-style model (``output_attentions=True`` support; extra tokens such as registers
            between CLS and the patches are skipped).
        pixel_values: (B, 3, H, W), H and W multiples of the patch size.
    Returns:
        (B, heads, H / patch, W / patch) float32 attention weights of the CLS query (each head's map
        sums to 1 minus the weight on non-patch tokens).
    """
    patch_height, patch_width = config_patch_size(backbone.config)
    grid_height, grid_width = (
        pixel_values.shape[-2] // patch_height,
        pixel_values.shape[-1] // patch_width,
    )
    num_patches = grid_height * grid_width
    was_training = backbone.training
    previous = getattr(backbone.config, "_attn_implementation", "eager")
    backbone.eval()
    try:
        if previous != "eager":
            backbone.set_attn_implementation("eager")
        output = backbone_forward(backbone, pixel_values, output_attentions=True)
    finally:
        if previous != "eager":
            backbone.set_attn_implementation(previous)
        backbone.train(was_training)
    attentions = getattr(output, "attentions", None)
    if not attentions:
        raise ValueError("The backbone returned no attention weights; load it with attn_implementation='eager'.")
    last = attentions[-1]  # (B, heads, tokens, tokens)
    cls_attention = last[:, :, 0, -num_patches:].float()  # (B, heads, num_patches)
    return cls_attention.reshape(last.shape[0], last.shape[1], grid_height, grid_width)


def threshold_attention(attentions: Tensor, mass: float = 0.6) -> Tensor:
    """DINO-paper masks: per map, the smallest set of the most attended patches whose weights hold
    ``mass`` of the map's total (official ``visualize_attention.py`` with ``--threshold 0.6``).

    Args:
        attentions: (..., h, w) non-negative maps.
    Returns:
        (..., h, w) boolean masks.
    """
    shape = attentions.shape
    flat = attentions.reshape(-1, shape[-2] * shape[-1]).float()
    values, indices = flat.sort(dim=1)  # ascending
    values = values / values.sum(dim=1, keepdim=True).clamp_min(torch.finfo(values.dtype).tiny)
    keep_sorted = values.cumsum(dim=1) > (1 - mass)
    mask = torch.zeros_like(keep_sorted).scatter_(1, indices, keep_sorted)
    return mask.reshape(shape)


def _colorize(values: np.ndarray) -> np.ndarray:
    """(h, w) values in [0, 1] -> (h, w, 3) uint8 heat map (matplotlib ``inferno`` when available)."""
    try:
        from matplotlib import colormaps

        return (colormaps["inferno"](values)[..., :3] * 255).astype(np.uint8)
    except ImportError:  # plain black -> red -> yellow ramp
        red = np.clip(values * 2, 0, 1)
        green = np.clip(values * 2 - 1, 0, 1)
        return (np.stack([red, green, values * 0.2], axis=-1) * 255).astype(np.uint8)


def _upsample(values: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Nearest-neighbour upsampling of a (h, w) map to ``size`` = (width, height), as the official code."""
    image = Image.fromarray(values.astype(np.float32), mode="F").resize(size, Image.Resampling.NEAREST)
    return np.asarray(image)


def attention_overlay(image: Image.Image, attention: Tensor | np.ndarray, alpha: float = 0.6) -> Image.Image:
    """``attention`` (h, w) as a heat map blended over ``image`` (RGB, any size)."""
    values = np.asarray(attention, dtype=np.float32)
    values = (values - values.min()) / max(float(values.max() - values.min()), 1e-12)
    heat = Image.fromarray(_colorize(_upsample(values, image.size)))
    return Image.blend(image.convert("RGB"), heat, alpha)


def mask_overlay(image: Image.Image, mask: Tensor | np.ndarray, dim: float = 0.25) -> Image.Image:
    """``image`` with the patches outside ``mask`` (h, w) darkened to ``dim`` of their brightness."""
    keep = _upsample(np.asarray(mask, dtype=np.float32), image.size)[..., None]
    array = np.asarray(image.convert("RGB"), dtype=np.float32)
    return Image.fromarray((array * (dim + (1 - dim) * keep)).astype(np.uint8))


def _display_image(image: Image.Image, min_display_size: int) -> Image.Image:
    """``image`` in RGB, enlarged by an integer factor (nearest) until its shorter side reaches
    ``min_display_size``, so that 32 px training images give readable figures."""
    image = image.convert("RGB")
    factor = math.ceil(min_display_size / min(image.size))
    if factor > 1:
        image = image.resize((image.width * factor, image.height * factor), Image.Resampling.NEAREST)
    return image


def _font(size: int) -> ImageFont.ImageFont:
    """Pillow's bundled font at ``size`` px (no system font needed)."""
    return ImageFont.load_default(size=size)


def _colour_bar(width: int, height: int, font: ImageFont.ImageFont) -> Image.Image:
    """A horizontal legend of the heat-map colours: "low" ... "high" attention (each map is scaled to
    its own range), ``width`` x ``height`` px on white."""
    bar = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(bar)
    low, high = "low attention", "high attention (each map scaled to its own range)"
    margin = 8
    low_width = int(draw.textlength(low, font=font))
    high_width = int(draw.textlength(high, font=font))
    ramp_width = max(16, width - low_width - high_width - 4 * margin)
    ramp_height = max(4, height // 2)
    ramp = _colorize(np.tile(np.linspace(0.0, 1.0, ramp_width, dtype=np.float32), (ramp_height, 1)))
    left = margin + low_width + margin
    top = (height - ramp_height) // 2
    bar.paste(Image.fromarray(ramp), (left, top))
    text_top = (height - font.size) // 2 if hasattr(font, "size") else top
    draw.text((margin, text_top), low, fill="black", font=font)
    draw.text((left + ramp_width + margin, text_top), high, fill="black", font=font)
    return bar


def attention_grid(
    image: Image.Image, attentions: Tensor, mass: float = 0.6, min_display_size: int = 224
) -> Image.Image:
    """One titled picture of an image's attention.

    Columns: the image, each head's map and the mean map over heads (titled "image", "head 0"...,
    "mean of heads"); rows: the maps as heat maps over the image, then the thresholded maps (the
    patches holding ``mass`` of the attention, the rest darkened), each row labelled; below, a colour
    bar of the heat-map scale.

    Args:
        image: the input image (any size; enlarged for display up to ``min_display_size``).
        attentions: (heads, h, w) maps of this image.
    """
    image = _display_image(image, min_display_size)
    attentions = attentions.detach().float().cpu()
    maps = [*attentions, attentions.mean(dim=0)]
    tops = [image] + [attention_overlay(image, attention) for attention in maps]
    bottoms = [image] + [mask_overlay(image, threshold_attention(attention, mass)) for attention in maps]
    titles = ["image", *(f"head {index}" for index in range(len(attentions))), "mean of heads"]
    row_labels = ["attention", f"top {mass:.0%} of mass"]
    width, height = image.size
    font = _font(max(12, min(20, width // 12)))
    title_height = font.size + 10
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    label_width = max(int(probe.textlength(label, font=font)) for label in row_labels) + 16
    bar_height = font.size + 14
    grid_width = label_width + width * len(tops)
    grid = Image.new("RGB", (grid_width, title_height + 2 * height + bar_height), "white")
    draw = ImageDraw.Draw(grid)
    for column, (top, bottom, title) in enumerate(zip(tops, bottoms, titles, strict=True)):
        left = label_width + column * width
        grid.paste(top, (left, title_height))
        grid.paste(bottom, (left, title_height + height))
        text_width = draw.textlength(title, font=font)
        draw.text((left + (width - text_width) / 2, 4), title, fill="black", font=font)
    for row, label in enumerate(row_labels):
        draw.text((8, title_height + row * height + (height - font.size) / 2), label, fill="black", font=font)
    grid.paste(_colour_bar(grid_width, bar_height, font), (0, title_height + 2 * height))
    return grid


def save_attention_maps(
    image: Image.Image,
    attentions: Tensor,
    output_dir: str | Path,
    prefix: str = "",
    mass: float = 0.6,
    min_display_size: int = 224,
) -> list[Path]:
    """Save PNG overlays of one image's attention maps.

    Writes ``{prefix}head{i}.png`` (heat map over the image), ``{prefix}head{i}-mask.png`` (thresholded
    map keeping ``mass`` of the attention), ``{prefix}mean.png``, ``{prefix}mean-mask.png`` and
    ``{prefix}grid.png`` (everything side by side, see :func:`attention_grid`) in ``output_dir``.

    Args:
        image: the input image as fed to the model (RGB); small images are enlarged by an integer
            factor until their shorter side reaches ``min_display_size``.
        attentions: (heads, h, w).
    Returns:
        the written paths.
    """
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    image = _display_image(image, min_display_size)
    attentions = attentions.detach().float().cpu()
    pictures: dict[str, Image.Image] = {}
    for name, attention in [*((f"head{i}", a) for i, a in enumerate(attentions)), ("mean", attentions.mean(0))]:
        pictures[name] = attention_overlay(image, attention)
        pictures[f"{name}-mask"] = mask_overlay(image, threshold_attention(attention, mass))
    pictures["grid"] = attention_grid(image, attentions, mass, min_display_size)
    paths = []
    for name, picture in pictures.items():
        path = output_dir / f"{prefix}{name}.png"
        picture.save(path)
        paths.append(path)
    return paths


# --------------------------------------------------------------------------------------------------
# Training curves
# --------------------------------------------------------------------------------------------------
def _series(rows: list[dict[str, Any]], key: str) -> tuple[list[float], list[float]]:
    steps, values = [], []
    for row in rows:
        value = row.get(key)
        if "step" in row and isinstance(value, (int, float)) and math.isfinite(value):
            steps.append(row["step"])
            values.append(float(value))
    return steps, values


def plot_training_curves(metrics_jsonl_path: str | Path, output_png: str | Path, num_prototypes: int | None = None,
                         title: str | None = None) -> None:
    """Plot what reading a run needs against steps into one PNG (six panels).

    Loss; teacher-student KL (what the student can still learn); the teacher's per-sample and
    batch-mean entropies and the student's; the gradient norm (window mean and maximum, log scale);
    every ``knn_*`` / ``linear_probe_*`` accuracy; the learning rate. With ``num_prototypes`` a dashed
    line marks ln(K), where a uniformly collapsed run sits. Panels with no data say so. Needs
    matplotlib (a warning is logged and nothing is written without it).
    """
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        logger.warning("matplotlib is not installed; %s was not written.", output_png)
        return
    rows = read_metrics(metrics_jsonl_path)
    keys = sorted({key for row in rows for key in row})
    accuracy_keys = [key for key in keys if key.startswith(("knn_", "linear_probe_"))]
    log_k = math.log(num_prototypes) if num_prototypes else None
    panels = [  # title, series, log scale, draw ln(K)
        ("loss (nats)", ["loss"], False, True),
        ("teacher-student KL (nats)", ["teacher_student_kl"], False, False),
        ("entropies (nats)", ["teacher_entropy", "teacher_mean_entropy", "student_entropy"], False, True),
        ("gradient norm before clipping", ["grad_norm", "grad_norm_max"], True, False),
        ("evaluation accuracy", accuracy_keys, False, False),
        ("learning rate", ["learning_rate"], True, False),
    ]
    figure = Figure(figsize=(12, 10), layout="constrained")
    FigureCanvasAgg(figure)
    if title:
        figure.suptitle(title)
    axes = figure.subplots(3, 2, sharex=True).ravel()
    for axis, (panel_title, series_keys, log_scale, mark_log_k) in zip(axes, panels, strict=True):
        drawn = False
        for key in series_keys:
            steps, values = _series(rows, key)
            if not values:
                continue
            marker = "o" if len(values) < 50 else None
            axis.plot(steps, values, label=key, marker=marker, markersize=3)
            drawn = True
        axis.set_title(panel_title)
        axis.grid(alpha=0.3)
        if drawn:
            if mark_log_k and log_k is not None:
                axis.axhline(log_k, color="gray", linestyle="--", linewidth=1, label=f"ln K = {log_k:.2f}")
            if len(series_keys) > 1 or (mark_log_k and log_k is not None):
                axis.legend(fontsize=8)
            if log_scale and all(v > 0 for key in series_keys for v in _series(rows, key)[1]):
                axis.set_yscale("log")
        else:
            axis.text(0.5, 0.5, "no data", ha="center", va="center", transform=axis.transAxes, color="gray")
    for axis in axes[-2:]:
        axis.set_xlabel("step")
    output_png = Path(output_png)
    output_png.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(output_png, dpi=80)

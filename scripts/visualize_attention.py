#!/usr/bin/env python
"""Save the last layer's CLS self-attention maps of a ViT backbone over an image, as in the DINO paper.

For each image: one heat-map overlay per head and for the mean over heads, the thresholded maps
(the most attended patches holding --threshold of the attention mass, 0.6 in the paper) and a grid
with everything side by side:

    python scripts/visualize_attention.py --model outputs/demo/backbone --image cat.jpg
    python scripts/visualize_attention.py --model facebook/dino-vits8 --image cat.jpg --image_size 480

Files: OUTPUT_DIR/{image stem}/head{i}.png, head{i}-mask.png, mean.png, mean-mask.png, grid.png.
Errors in the inputs (a wrong path, an unreadable image) print one sentence and exit with status 2.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

PROG = "visualize_attention.py"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--model", required=True, help="Backbone folder (save_backbone) or Hub model id.")
    parser.add_argument("--revision", default=None, help="Hub revision of --model.")
    parser.add_argument("--image", required=True, nargs="+", help="Image file(s).")
    parser.add_argument("--output_dir", default="attention", help="Where the PNG files go.")
    parser.add_argument(
        "--image_size",
        type=int,
        default=None,
        help="Shorter side the image is resized to (then cropped to a multiple of the patch "
        "size); default the backbone's training resolution. Larger sizes (e.g. 480, as in the "
        "paper) give finer maps: the position embeddings are interpolated.",
    )
    parser.add_argument(
        "--threshold",
        type=float,
        default=0.6,
        help="Attention mass the thresholded maps keep (0.6 in the DINO paper).",
    )
    args = parser.parse_args(argv)
    if args.image_size is not None and args.image_size < 1:
        fail(f"--image_size must be a positive integer, got {args.image_size}.")
    if not 0 < args.threshold <= 1:
        fail(f"--threshold must be in (0, 1], got {args.threshold}.")
    return args


def fail(message: str) -> None:
    """Print one sentence and exit with status 2 (bad input)."""
    print(f"{PROG}: error: {message}", file=sys.stderr)
    sys.exit(2)


def main(argv: list[str] | None = None) -> list[Path]:
    args = parse_args(argv)

    import numpy as np
    import torch
    from PIL import Image, UnidentifiedImageError

    from dino_hf.augmentation import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
    from dino_hf.backbones import load_backbone
    from dino_hf.visualization import attention_maps, save_attention_maps

    images = []
    for path in args.image:
        try:
            with Image.open(path) as image:
                images.append((Path(path), image.convert("RGB")))
        except (OSError, UnidentifiedImageError) as error:
            reason = "no such file" if isinstance(error, FileNotFoundError) else "not a readable image"
            fail(f"--image {path!r}: {reason}.")
    try:
        backbone = load_backbone(args.model, attn_implementation="eager", revision=args.revision)
    except (OSError, ValueError, KeyError) as error:
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        fail(f"--model {args.model!r} is not a loadable backbone folder or Hub id ({first_line}).")
    if not hasattr(backbone.config, "patch_size"):
        fail(f"--model {args.model!r} is not a ViT-style backbone (its config has no patch_size).")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    backbone.to(device)

    mean, std = _normalisation(args.model, args.revision, IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD)
    patch = backbone.config.patch_size
    patch = patch[0] if isinstance(patch, (list, tuple)) else patch
    image_size = args.image_size or _image_size(backbone.config)
    output_dir = Path(args.output_dir)
    written: list[Path] = []
    stems: dict[str, int] = {}
    for path, image in images:
        image = _resize_to_patches(image, image_size, patch)
        pixels = torch.from_numpy(np.asarray(image, dtype=np.float32)).permute(2, 0, 1) / 255.0
        pixels = (pixels - torch.tensor(mean)[:, None, None]) / torch.tensor(std)[:, None, None]
        attentions = attention_maps(backbone, pixels[None].to(device))[0].cpu()  # (heads, h, w)
        stem = path.stem
        stems[stem] = stems.get(stem, 0) + 1
        folder = output_dir / (stem if stems[stem] == 1 else f"{stem}-{stems[stem]}")
        written += save_attention_maps(image, attentions, folder, mass=args.threshold)
        print(f"{path}: {attentions.shape[0]} heads, {attentions.shape[1]}x{attentions.shape[2]} patches -> {folder}/")
    return written


def _image_size(config) -> int:
    size = getattr(config, "image_size", 224)
    return int(size[0] if isinstance(size, (list, tuple)) else size)


def _normalisation(model, revision, default_mean, default_std):
    """Mean / std of the model's image processor, ImageNet's when it has none."""
    from transformers import AutoImageProcessor

    try:
        processor = AutoImageProcessor.from_pretrained(model, revision=revision)
        return list(processor.image_mean), list(processor.image_std)
    except (OSError, ValueError, KeyError, AttributeError, TypeError):
        return list(default_mean), list(default_std)


def _resize_to_patches(image, shorter_side: int, patch: int):
    """Resize so the shorter side is ``shorter_side`` (aspect kept), then centre-crop both sides
    down to a multiple of ``patch``."""
    from PIL import Image

    width, height = image.size
    scale = shorter_side / min(width, height)
    width, height = max(patch, round(width * scale)), max(patch, round(height * scale))
    image = image.resize((width, height), Image.Resampling.BICUBIC)
    crop_width, crop_height = width - width % patch, height - height % patch
    left, top = (width - crop_width) // 2, (height - crop_height) // 2
    return image.crop((left, top, left + crop_width, top + crop_height))


if __name__ == "__main__":
    main()

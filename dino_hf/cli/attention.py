"""``dino-hf-attention``: the last layer's CLS self-attention maps of a transformer backbone (ViT, DeiT,
DINOv2, DINOv3 ViT; registers skipped) over images, as in the DINO paper. A ConvNet (ConvNeXt, ResNet)
has no self-attention: it is refused in one sentence, with status 2.

For each image: one heat-map overlay per head and for the mean over heads, the thresholded maps
(the most attended patches holding --threshold of the attention mass, 0.6 in the paper) and a titled
grid with everything side by side and a colour bar:

    dino-hf-attention --model_name_or_path outputs/demo --image cat.jpg
    dino-hf-attention --model_name_or_path facebook/dino-vits8 --image cat.jpg --image_size 480

``--model_name_or_path`` takes a backbone folder or Hub id, a run's ``--output_dir`` or a
``DinoForPreTraining`` folder (``--which student`` for the student). Files: OUTPUT_DIR/{image stem}/
head{i}.png, head{i}-mask.png, mean.png, mean-mask.png, grid.png. Errors in the inputs (a wrong path,
an unreadable image) print one sentence and exit with status 2.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from dino_hf.cli.arguments import add_model_arguments, load_model_backbone
from dino_hf.cli.console import CommandParser, run_main

PROG = "dino-hf-attention"


def build_parser(prog: str = PROG) -> CommandParser:
    """The ``dino-hf-attention`` flags; ``--model`` is the old spelling of ``--model_name_or_path``."""
    parser = CommandParser(prog=prog, description=__doc__.split("\n\n")[0])
    add_model_arguments(parser, use="draw")
    parser.add_argument("--image", required=True, nargs="+", help="Image file(s).")
    parser.add_argument("--output_dir", default="attention", help="Where the PNG files go.")
    parser.add_argument("--image_size", type=int, default=None,
                        help="Shorter side the image is resized to (then cropped to a multiple of the patch size); "
                        "default the backbone's training resolution. Larger sizes (e.g. 480, as in the paper) give "
                        "finer maps: the position embeddings are interpolated.")
    parser.add_argument("--threshold", type=float, default=0.6,
                        help="Attention mass the thresholded maps keep (0.6 in the DINO paper).")
    return parser


def draw_attention(args: argparse.Namespace) -> list[Path]:
    """Write the attention pictures of every ``--image``; returns the written paths.

    Raises:
        ValueError: bad input, one sentence naming the flag.
    """
    if args.image_size is not None and args.image_size < 1:
        raise ValueError(f"--image_size must be a positive integer, got {args.image_size}")
    if not 0 < args.threshold <= 1:
        raise ValueError(f"--threshold must be in (0, 1], got {args.threshold}")

    import numpy as np
    import torch
    from PIL import Image, UnidentifiedImageError

    from dino_hf.data.augmentation import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
    from dino_hf.eval.loading import load_image_processor
    from dino_hf.eval.visualization import attention_maps, save_attention_maps
    from dino_hf.models.backbones import config_image_size, config_patch_size

    images = []
    for path in args.image:
        try:
            with Image.open(path) as image:
                images.append((Path(path), image.convert("RGB")))
        except (OSError, UnidentifiedImageError) as error:
            reason = "no such file" if isinstance(error, FileNotFoundError) else "not a readable image"
            raise ValueError(f"--image {path!r}: {reason}") from None
    backbone = load_model_backbone(args, attention=True)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    backbone.to(device)

    processor = load_image_processor(args.model_name_or_path, backbone.config, revision=args.model_revision)
    mean = list(getattr(processor, "image_mean", None) or IMAGENET_DEFAULT_MEAN)
    std = list(getattr(processor, "image_std", None) or IMAGENET_DEFAULT_STD)
    patch = config_patch_size(backbone.config)[0]
    image_size = args.image_size or config_image_size(backbone.config)
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


def main(argv: list[str] | None = None, prog: str = PROG) -> int:
    """Run ``dino-hf-attention`` on ``argv``; returns the exit status (2: bad input, one sentence on stderr)."""
    return run_main(prog, argv, build_parser, draw_attention)


if __name__ == "__main__":
    sys.exit(main())

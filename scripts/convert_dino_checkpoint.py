#!/usr/bin/env python
"""Convert an official facebookresearch/dino checkpoint into a transformers ViT backbone folder.

    python scripts/convert_dino_checkpoint.py --checkpoint dino_deitsmall16_pretrain.pth --output_dir vits16
    python scripts/convert_dino_checkpoint.py --checkpoint checkpoint.pth --output_dir run \\
        --save_training_model   # also the full student/teacher DinoForPreTraining, to continue training

The folder loads with ``transformers.AutoModel.from_pretrained(output_dir, add_pooling_layer=False)``.
"""

from __future__ import annotations

import argparse
import sys


def parse_arguments(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="Official DINO .pth file (bare backbone or checkpoint.pth).")
    parser.add_argument("--output_dir", required=True, help="Folder for the exported ViTModel backbone.")
    parser.add_argument(
        "--checkpoint_key",
        default="teacher",
        help="Network to export from a full training checkpoint: 'teacher' (what the official "
        "evaluation uses) or 'student'.",
    )
    parser.add_argument(
        "--num_attention_heads",
        type=int,
        default=None,
        help="Heads of the backbone; not visible in the weights. Default hidden_size // 64, which holds "
        "for every official DINO ViT.",
    )
    parser.add_argument(
        "--save_training_model",
        action="store_true",
        help="Also write the full DinoForPreTraining (student, teacher, center) to OUTPUT_DIR/training_model.",
    )
    parser.add_argument("--debug", action="store_true", help="Show the full traceback on errors.")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    arguments = parse_arguments(argv)
    from dino_hf.convert import convert_checkpoint

    try:
        output_dir = convert_checkpoint(
            arguments.checkpoint,
            arguments.output_dir,
            checkpoint_key=arguments.checkpoint_key,
            num_attention_heads=arguments.num_attention_heads,
            save_training_model=arguments.save_training_model,
        )
    except ValueError as error:
        if arguments.debug:
            raise
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"Backbone written to {output_dir} (load with AutoModel.from_pretrained(..., add_pooling_layer=False)).")
    return 0


if __name__ == "__main__":
    sys.exit(main())

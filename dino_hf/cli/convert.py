"""``dino-hf-convert``: an official facebookresearch/dino checkpoint as a transformers ViT backbone folder.

    dino-hf-convert --checkpoint dino_deitsmall16_pretrain.pth --output_dir vits16
    dino-hf-convert --checkpoint checkpoint.pth --output_dir run \\
        --save_training_model   # also the full student/teacher DinoForPreTraining, to continue training

The folder loads with plain ``transformers.AutoModel.from_pretrained(output_dir)`` (an identity pooler:
``pooler_output`` is the CLS token, the DINO embedding).
"""

from __future__ import annotations

import argparse
import sys

from dino_hf.cli.console import CommandParser, run_main

PROG = "dino-hf-convert"


def build_parser(prog: str = PROG) -> CommandParser:
    """The ``dino-hf-convert`` flags; ``--which`` is the old spelling of ``--checkpoint_key``."""
    parser = CommandParser(prog=prog, description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", required=True, help="Official DINO .pth file (bare backbone or checkpoint.pth).")
    parser.add_argument("--output_dir", required=True, help="Folder for the exported ViTModel backbone.")
    parser.add_argument("--checkpoint_key", "--which", dest="checkpoint_key", default="teacher",
                        help="Network to export from a full training checkpoint: 'teacher' (what the official "
                        "evaluation uses) or 'student'.")
    parser.add_argument("--num_attention_heads", type=int, default=None,
                        help="Heads of the backbone; not visible in the weights. Default hidden_size // 64, which "
                        "holds for every official DINO ViT.")
    parser.add_argument("--save_training_model", action="store_true",
                        help="Also write the full DinoForPreTraining (student, teacher, center) to "
                        "OUTPUT_DIR/training_model.")
    return parser


def convert(args: argparse.Namespace) -> int:
    """Convert the checkpoint ``args`` name and say where the backbone went; returns the exit status."""
    from dino_hf.hub.convert import convert_checkpoint

    output_dir = convert_checkpoint(
        args.checkpoint,
        args.output_dir,
        checkpoint_key=args.checkpoint_key,
        num_attention_heads=args.num_attention_heads,
        save_training_model=args.save_training_model,
    )
    print(f"Backbone written to {output_dir} (load with AutoModel.from_pretrained(...)).")
    return 0


def main(argv: list[str] | None = None, prog: str = PROG) -> int:
    """Run ``dino-hf-convert`` on ``argv``; returns the exit status (2: bad input, one sentence on stderr)."""
    return run_main(prog, argv, build_parser, convert)


if __name__ == "__main__":
    sys.exit(main())

"""``dino-hf-convert``: an official facebookresearch/dino checkpoint as a transformers ViT backbone folder.

    dino-hf-convert --checkpoint dino_deitsmall16_pretrain.pth --output_dir vits16
    dino-hf-convert --checkpoint checkpoint.pth --output_dir run \\
        --save_training_model   # also the full student/teacher DinoForPreTraining, to continue training

The folder loads with ``transformers.AutoModel.from_pretrained(output_dir, add_pooling_layer=False)``.
"""

from __future__ import annotations

import sys

from .console import CommandParser, configure_output, is_main_process, run_command, wants_debug

PROG = "dino-hf-convert"


def build_parser(prog: str = PROG) -> CommandParser:
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


def main(argv: list[str] | None = None, prog: str = PROG) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    arguments = build_parser(prog).parse_args(argv)
    configure_output(is_main_process())

    def body() -> int:
        from ..convert import convert_checkpoint

        output_dir = convert_checkpoint(
            arguments.checkpoint,
            arguments.output_dir,
            checkpoint_key=arguments.checkpoint_key,
            num_attention_heads=arguments.num_attention_heads,
            save_training_model=arguments.save_training_model,
        )
        print(f"Backbone written to {output_dir} (load with AutoModel.from_pretrained(..., add_pooling_layer=False)).")
        return 0

    return run_command(prog, body, wants_debug(argv))


if __name__ == "__main__":
    sys.exit(main())

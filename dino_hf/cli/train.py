"""``dino-hf-train``: self-supervised DINO pre-training of a ViT backbone on the Hugging Face stack.

    dino-hf-train --config fashion_mnist_cpu --dataset_name data/fashion_mnist --output_dir outputs/demo
    accelerate launch -m dino_hf.cli.train --config vit_small_patch16_100ep \\
        --dataset_name /data/imagenet/train --output_dir outputs/vits16
    torchrun --nproc_per_node 8 -m dino_hf.cli.train --config ... --resume_from_checkpoint latest

``--config`` takes a YAML/JSON file or the name of a shipped recipe; flags given on the command line
override it; ``--help`` explains each. Bad input exits with status 2 and one sentence on stderr
(``--debug`` shows the traceback); too many non-finite steps in a row exit with status 1; a run
stopped by SIGTERM/SIGINT saves a checkpoint and exits with 128 + the signal number.
"""

from __future__ import annotations

import sys

from .console import report_error, run_command, wants_debug

PROG = "dino-hf-train"


def main(argv: list[str] | None = None, prog: str = PROG) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = wants_debug(argv)

    def body() -> int:
        from ..training import NonFiniteLossError, train
        from ..training_args import parse_training_args

        args = parse_training_args(argv, prog=prog)
        try:
            result = train(args)
        except NonFiniteLossError as error:
            if debug:
                raise
            report_error(prog, str(error))
            return 1
        except KeyboardInterrupt:  # a second signal during the checkpoint a first one triggered
            if debug:
                raise
            report_error(prog, "interrupted (a second signal stops at once, without a checkpoint)")
            return 130
        return result.exit_status

    return run_command(prog, body, debug)


if __name__ == "__main__":
    sys.exit(main())

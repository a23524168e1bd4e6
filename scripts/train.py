#!/usr/bin/env python
"""Self-supervised DINO pre-training of a ViT backbone on the Hugging Face stack.

    python scripts/train.py --config scripts/configs/fashion_mnist_cpu.yaml
    accelerate launch scripts/train.py --config scripts/configs/vit_small_patch16_100ep.yaml \\
        --dataset_name /data/imagenet/train --output_dir outputs/vits16
    torchrun --nproc_per_node 8 scripts/train.py --config ... --resume_from_checkpoint latest

Flags given on the command line override the values of ``--config``; ``--help`` explains each.
Bad input exits with status 2 and one sentence on stderr (``--debug`` shows the traceback); a
run stopped by SIGTERM/SIGINT saves a checkpoint and exits with 128 + the signal number.
"""

from __future__ import annotations

import os
import sys

PROG = "train.py"


def _report(message: str) -> None:
    """One line on stderr, from the first process only when several are launched."""
    if os.environ.get("RANK", "0") == "0":
        sys.stderr.write(f"{PROG}: error: {message}\n")


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = any(arg == "--debug" or arg.startswith("--debug=") for arg in argv)
    try:
        from dino_hf.training import NonFiniteLossError, train
        from dino_hf.training_args import parse_training_args

        args = parse_training_args(argv, prog=PROG)
        result = train(args)
    except ValueError as error:
        if debug:
            raise
        _report(str(error))
        return 2
    except NonFiniteLossError as error:
        if debug:
            raise
        _report(str(error))
        return 1
    except KeyboardInterrupt:
        if debug:
            raise
        _report("interrupted (a second signal stops at once, without a checkpoint).")
        return 130
    return result.exit_status


if __name__ == "__main__":
    sys.exit(main())

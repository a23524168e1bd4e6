#!/usr/bin/env python
"""Self-supervised DINO pre-training of a ViT backbone on the Hugging Face stack.

    python scripts/train.py --config scripts/configs/fashion_mnist_cpu.yaml
    accelerate launch scripts/train.py --config scripts/configs/vit_small_patch16_100ep.yaml \\
        --dataset_name /data/imagenet/train --output_dir outputs/vits16
    torchrun --nproc_per_node 8 scripts/train.py --config ... --resume_from_checkpoint latest

Flags given on the command line override the values of ``--config``; ``--help`` explains each.

Exit statuses: 0 finished; 2 bad input or an expected failure (another run holds --output_dir, a
full disk, no permission, a damaged or incompatible checkpoint...), with one sentence on stderr
that names the path and the remedy (``--debug`` shows the traceback); 1 too many non-finite steps
in a row; 128 + the signal number (143 for SIGTERM, 130 for SIGINT) when a signal stopped the run
after saving a checkpoint at the current step.
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
    except ValueError as error:  # bad input, and dino_hf.errors.RunError (expected failures)
        if debug:
            raise
        _report(str(error))
        return 2
    except OSError as error:  # one the library did not expect: still one sentence, naming the file
        if debug:
            raise
        from dino_hf.errors import describe_os_error

        _report(describe_os_error(error, error.filename or "a file", "training", "rerun with --debug for details"))
        return 2
    except NonFiniteLossError as error:
        if debug:
            raise
        _report(str(error))
        return 1
    except KeyboardInterrupt:
        if debug:
            raise
        # only outside the training loop (setting up, exporting): inside it SIGINT saves a checkpoint
        _report("interrupted before training started or while exporting; rerun with --resume_from_checkpoint "
                "latest to continue from the newest checkpoint.")
        return 130
    return result.exit_status


if __name__ == "__main__":
    sys.exit(main())

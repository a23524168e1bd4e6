#!/usr/bin/env python
"""Self-supervised DINO pre-training: ``dino-hf-train`` (:mod:`dino_hf.cli.train`) from a source checkout.

    python scripts/train.py --config scripts/configs/fashion_mnist_cpu.yaml
    accelerate launch scripts/train.py --config vit_small_patch16_100ep --dataset_name ... --output_dir ...

Exit statuses: 0 finished; 2 bad input or an expected failure (another run holds --output_dir, a
full disk, no permission, a damaged or incompatible checkpoint...), with one sentence on stderr
that names the path and the remedy (``--debug`` shows the traceback); 1 too many non-finite steps
in a row; 128 + the signal number (143 for SIGTERM, 130 for SIGINT) when a signal stopped the run
after saving a checkpoint at the current step.
"""

import sys

from dino_hf.cli.train import main

if __name__ == "__main__":
    sys.exit(main(prog="train.py"))

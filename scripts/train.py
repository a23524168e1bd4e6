#!/usr/bin/env python
"""Self-supervised DINO pre-training: ``dino-hf-train`` (:mod:`dino_hf.cli.train`) from a source checkout.

    python scripts/train.py --config scripts/configs/fashion_mnist_cpu.yaml
    accelerate launch scripts/train.py --config vit_small_patch16_100ep --dataset_name ... --output_dir ...
"""

import sys

from dino_hf.cli.train import main

if __name__ == "__main__":
    sys.exit(main(prog="train.py"))

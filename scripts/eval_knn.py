#!/usr/bin/env python
"""Weighted k-NN / linear-probe evaluation: ``dino-hf-eval`` (:mod:`dino_hf.cli.evaluate`) from a source checkout.

    python scripts/eval_knn.py --model_name_or_path outputs/demo --dataset_name data/fashion_mnist
"""

import sys

from dino_hf.cli.evaluate import main

if __name__ == "__main__":
    sys.exit(main(prog="eval_knn.py"))

#!/usr/bin/env python
"""Embed a whole image dataset: ``dino-hf-embed`` (:mod:`dino_hf.cli.embed`) from a source checkout.

    python scripts/embed.py --model_name_or_path outputs/demo --dataset_name data/fashion_mnist --output_dir emb
"""

import sys

from dino_hf.cli.embed import main

if __name__ == "__main__":
    sys.exit(main(prog="embed.py"))

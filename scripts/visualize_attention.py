#!/usr/bin/env python
"""Attention maps of a backbone: ``dino-hf-attention`` (:mod:`dino_hf.cli.attention`) from a source checkout.

    python scripts/visualize_attention.py --model_name_or_path outputs/demo --image cat.jpg
"""

import sys

from dino_hf.cli.attention import main

if __name__ == "__main__":
    sys.exit(main(prog="visualize_attention.py"))

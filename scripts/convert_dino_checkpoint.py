#!/usr/bin/env python
"""Import an official DINO checkpoint: ``dino-hf-convert`` (:mod:`dino_hf.cli.convert`) from a source checkout.

    python scripts/convert_dino_checkpoint.py --checkpoint dino_deitsmall16_pretrain.pth --output_dir vits16
"""

import sys

from dino_hf.cli.convert import main

if __name__ == "__main__":
    sys.exit(main(prog="convert_dino_checkpoint.py"))

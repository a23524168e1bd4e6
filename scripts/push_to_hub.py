#!/usr/bin/env python
"""Push a run to the Hub: ``dino-hf-push`` (:mod:`dino_hf.cli.push`) from a source checkout.

    python scripts/push_to_hub.py --output_dir outputs/demo --hub_model_id USER/NAME
"""

import sys

from dino_hf.cli.push import main

if __name__ == "__main__":
    sys.exit(main(prog="push_to_hub.py"))

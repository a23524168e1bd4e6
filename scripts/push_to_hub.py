#!/usr/bin/env python
"""Push a dino_hf training output to the Hub: the exported teacher backbone, a model card, records.

    python scripts/push_to_hub.py --model_dir outputs/fashion_mnist --repo_id USER/NAME [--private]
        [--revision BRANCH] [--commit_message MSG] [--token TOKEN] [--include_training_model]

The pushed repository loads with plain transformers:
``AutoModel.from_pretrained("USER/NAME", add_pooling_layer=False)``; the embedding is the CLS token
of ``last_hidden_state``. Authentication: ``hf auth login`` or ``HF_TOKEN`` (preferred over
``--token``, which other users of the machine can see in the process list). ``HF_ENDPOINT``
selects another Hub endpoint.

Exit status: 0 pushed (the commit URL is printed), 2 nothing pushed (one sentence on stderr).
"""

from __future__ import annotations

import argparse
import sys

from dino_hf.hub import HubPushError, push_training_output
from dino_hf.model_card import DEFAULT_LICENSE, render_model_card
from dino_hf.run_output import TRAINING_MODEL_SUBFOLDER, read_training_output, scrub_secrets


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Push a dino_hf training output to the Hub as a transformers ViT model."
    )
    parser.add_argument(
        "--model_dir",
        required=True,
        help="The --output_dir of a dino_hf training run (holds backbone/), or an exported backbone folder.",
    )
    parser.add_argument(
        "--repo_id",
        required=True,
        help="Target repository, USER/NAME or ORG/NAME (a bare NAME goes under your account). "
        "Created if it does not exist.",
    )
    parser.add_argument(
        "--private",
        action="store_true",
        help="Create the repository as private (no effect on an existing repository).",
    )
    parser.add_argument(
        "--revision",
        default=None,
        help="Branch to commit to (default main); created from main if missing.",
    )
    parser.add_argument(
        "--commit_message",
        default=None,
        help="Commit message (default: 'Upload DINO backbone (step N) with dino_hf').",
    )
    parser.add_argument(
        "--token",
        default=None,
        help="Hub token with write access. Default: HF_TOKEN, else the `hf auth login` token.",
    )
    parser.add_argument(
        "--include_training_model",
        action="store_true",
        help=f"Also push the full DinoForPreTraining (student, teacher, head, center) into "
        f"{TRAINING_MODEL_SUBFOLDER}/ so that pre-training can continue from the Hub.",
    )
    parser.add_argument(
        "--license",
        default=None,
        help=f"License id for the card metadata (default: {DEFAULT_LICENSE}). Check the terms of your training data.",
    )
    parser.add_argument(
        "--dry_run",
        action="store_true",
        help="Print the files that would be pushed and the model card; push nothing (no token needed).",
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        if args.dry_run:
            run = read_training_output(args.model_dir, include_training_model=args.include_training_model)
            for path_in_repo, local_path in sorted({"README.md": "(model card)", **run.files}.items()):
                print(f"{path_in_repo}  <-  {local_path}")
            print()
            print(
                render_model_card(
                    args.model_dir,
                    args.repo_id,
                    license=args.license,
                    include_training_model=args.include_training_model,
                )
            )
            return 0
        url = push_training_output(
            args.model_dir,
            args.repo_id,
            private=args.private,
            revision=args.revision,
            commit_message=args.commit_message,
            token=args.token,
            include_training_model=args.include_training_model,
            license=args.license,
        )
    except (HubPushError, FileNotFoundError, ValueError) as error:
        print(scrub_secrets(str(error), args.token), file=sys.stderr)
        return 2
    print(url)
    return 0


if __name__ == "__main__":
    sys.exit(main())

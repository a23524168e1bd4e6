"""``dino-hf-push``: a dino_hf run to the Hub: the exported backbone, a model card, the run's records.

    dino-hf-push --output_dir outputs/demo --hub_model_id USER/NAME [--hub_private_repo]
        [--which student] [--revision BRANCH] [--commit_message MSG] [--include_training_model]

``--output_dir`` is a training run's output folder, a ``DinoForPreTraining`` folder (its teacher,
or ``--which student``, is exported on the fly) or an exported backbone folder, of any family. The
pushed repository loads with plain transformers, ``AutoModel.from_pretrained("USER/NAME")``; its model
card says how to get the embedding of its family (a ViT's CLS token, a ConvNet's pooled output) and
``--dry_run`` saves that card into the folder (``README.md``, and ``backbone/README.md`` of a run)
without pushing. Authentication: ``hf auth login`` or
``HF_TOKEN`` (preferred over ``--token``, which other users of the machine can see in the process
list). ``HF_ENDPOINT`` selects another Hub endpoint.

Exit status: 0 pushed (the commit URL is printed), 2 nothing pushed (one sentence on stderr).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

from dino_hf.cli.arguments import add_which_argument
from dino_hf.cli.console import CommandParser, run_main

PROG = "dino-hf-push"


def build_parser(prog: str = PROG) -> CommandParser:
    """The ``dino-hf-push`` flags; old spellings (``--model_dir``, ``--repo_id``, ``--private``) are aliases."""
    from dino_hf.base.run_folder import TRAINING_MODEL_SUBFOLDER
    from dino_hf.hub.model_card import DEFAULT_LICENSE

    parser = CommandParser(prog=prog, description=__doc__.split("\n\n")[0])
    parser.add_argument("--output_dir", "--model_dir", dest="output_dir", required=True,
                        help="The --output_dir of a dino_hf training run, a DinoForPreTraining folder, or an "
                        "exported backbone folder.")
    parser.add_argument("--hub_model_id", "--repo_id", dest="hub_model_id", required=True,
                        help="Target repository, USER/NAME or ORG/NAME (a bare NAME goes under your account). "
                        "Created if it does not exist.")
    parser.add_argument("--hub_private_repo", "--private", dest="hub_private_repo", action="store_true",
                        help="Create the repository as private (no effect on an existing repository).")
    add_which_argument(parser, "Network to push as the backbone (the teacher is what DINO evaluates and exports).")
    parser.add_argument("--revision", default=None, help="Branch to commit to (default main); created from main if missing.")
    parser.add_argument("--commit_message", default=None,
                        help="Commit message (default: 'Upload DINO backbone (step N) with dino_hf').")
    parser.add_argument("--token", default=None,
                        help="Hub token with write access. Default: HF_TOKEN, else the `hf auth login` token.")
    parser.add_argument("--include_training_model", action="store_true",
                        help=f"Also push the full DinoForPreTraining (student, teacher, head, center) into "
                        f"{TRAINING_MODEL_SUBFOLDER}/ so that pre-training can continue from the Hub.")
    parser.add_argument("--license", default=None,
                        help=f"License id for the card metadata (default: {DEFAULT_LICENSE}). Check the terms of "
                        "your training data.")
    parser.add_argument("--dry_run", action="store_true",
                        help="Print the files that would be pushed and the model card, and save the card as the "
                        "folder's README.md (and backbone/README.md); push nothing (no token needed).")
    return parser


def _exported_backbone(args: argparse.Namespace, scratch: Path) -> Path | None:
    """The backbone folder to push when it is not the run's ``backbone/``: the ``--which`` network of a
    DinoForPreTraining folder (or a run's student), exported into ``scratch``; else None."""
    from dino_hf.eval.loading import resolve_backbone_source
    from dino_hf.hub.model_card import bare_backbone_dir
    from dino_hf.models.modeling_dino import DinoForPreTraining

    folder = Path(args.output_dir)
    if not folder.is_dir():
        return None  # read_training_output says what is wrong
    try:
        source, is_dino = resolve_backbone_source(folder, args.which)
    except ValueError:
        if args.which == "student":
            raise
        return None
    if not is_dino:
        return bare_backbone_dir(folder)  # a backbone folder on its own (any family), else the run's backbone/
    # The model's own export keeps the processor the backbone came with (a DINOv2's resize and mean/std).
    return DinoForPreTraining.from_pretrained(source).save_backbone(scratch / "backbone", which=args.which)


def push(args: argparse.Namespace) -> int:
    """Push (or with ``--dry_run`` show) what ``args`` describe; returns the exit status."""
    from dino_hf.base.run_folder import read_training_output
    from dino_hf.hub.model_card import write_run_cards
    from dino_hf.hub.push import push_training_output

    with tempfile.TemporaryDirectory(prefix="dino_hf_push_") as scratch:
        backbone_dir = _exported_backbone(args, Path(scratch))
        if args.dry_run:
            run = read_training_output(args.output_dir, include_training_model=args.include_training_model,
                                       backbone_dir=backbone_dir)
            for path_in_repo, local_path in sorted({"README.md": "(model card)", **run.files}.items()):
                print(f"{path_in_repo}  <-  {local_path}")
            print()
            saved = write_run_cards(args.output_dir, args.hub_model_id, license=args.license, backbone_dir=backbone_dir,
                                    include_training_model=args.include_training_model)
            print(saved[-1].read_text(encoding="utf-8"))
            print(f"Model card saved to {', '.join(str(path) for path in saved if Path(scratch) not in path.parents)}.")
            return 0
        url = push_training_output(args.output_dir, args.hub_model_id, private=args.hub_private_repo,
                                   revision=args.revision, commit_message=args.commit_message, token=args.token,
                                   include_training_model=args.include_training_model, license=args.license,
                                   backbone_dir=backbone_dir)
    print(url)
    return 0


def main(argv: list[str] | None = None, prog: str = PROG) -> int:
    """Run ``dino-hf-push`` on ``argv``; returns the exit status (2: nothing pushed, one sentence on stderr)."""
    # a refused push is the Hub's sentence alone (no "PROG: error:"): e.g. exactly the login hint
    return run_main(prog, argv, build_parser, push, prefix_hub_errors=False)


if __name__ == "__main__":
    sys.exit(main())

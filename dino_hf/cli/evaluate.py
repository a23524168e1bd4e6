"""``dino-hf-eval``: weighted k-NN (and optionally linear-probe) accuracy of a frozen backbone.

Works on an exported backbone folder or Hub id of any family dino_hf trains (ViT, DeiT, DINOv2, DINOv3,
ConvNeXt, ResNet), a training run's ``--output_dir`` or a ``DinoForPreTraining`` folder (the teacher by
default, ``--which student``), with the official DINO protocol: the family's DINO embedding (a ViT's CLS
token, a ConvNet's pooled output), in float32 unless ``--mixed_precision`` says otherwise, L2-normalised;
the k nearest training images (cosine similarity) vote for their class with weight exp(sim / T), T the
official temperature (:data:`dino_hf.base.official_recipe.OFFICIAL_KNN_TEMPERATURE`) unless
``--temperature`` says otherwise. On the same data, splits and subset (``--max_*_samples``, ``--seed``)
it gives the figure the run's in-training monitor recorded (the model card prints the command).

    dino-hf-eval --model_name_or_path outputs/demo --dataset_name data/fashion_mnist
    dino-hf-eval --model_name_or_path facebook/dino-vits16 --dataset_name frgfm/imagenette \\
        --dataset_config_name 160px --eval_split validation --k 10 20 100

Several processes: ``accelerate launch -m dino_hf.cli.evaluate ...`` shards the feature extraction.
Prints one line per metric and writes them as JSON with ``--output_file``. Errors in the inputs (a
wrong path, split or column) print one sentence and exit with status 2.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from dino_hf.base.official_recipe import OFFICIAL_KNN_TEMPERATURE
from dino_hf.cli.arguments import add_eval_reading_arguments, add_model_arguments, load_model_backbone
from dino_hf.cli.console import CommandParser, first_line, run_main

PROG = "dino-hf-eval"


def build_parser(prog: str = PROG) -> CommandParser:
    """The ``dino-hf-eval`` flags; old spellings (``--model``, ``--test_split``, ``--num_workers``...) are aliases."""
    parser = CommandParser(prog=prog, description=__doc__.split("\n\n")[0])
    add_model_arguments(parser, use="evaluate (the teacher is the official choice)")
    parser.add_argument("--dataset_name", required=True,
                        help="Local folder (imagefolder or parquet), *.parquet, *.tar shards, or a Hub dataset id.")
    parser.add_argument("--dataset_config_name", default=None, help="Hub dataset configuration.")
    parser.add_argument("--train_split", default="train", help="Split whose features are the k-NN memory.")
    parser.add_argument("--eval_split", "--test_split", dest="eval_split", default="test",
                        help="Split that is classified and scored.")
    parser.add_argument("--image_column", default=None,
                        help="Column holding the images; unset finds 'image', 'img' or the first Image column.")
    parser.add_argument("--label_column", default="label", help="Column holding the class labels.")
    parser.add_argument("--k", type=int, nargs="+", default=[10, 20, 100, 200],
                        help="Numbers of neighbours (the official DINO evaluation reports 10, 20, 100, 200; "
                        "20 is the headline figure). All share one nearest-neighbour search.")
    parser.add_argument("--temperature", type=float, default=OFFICIAL_KNN_TEMPERATURE,
                        help=f"Vote temperature T: weights exp(sim / T). {OFFICIAL_KNN_TEMPERATURE} is the official value.")
    parser.add_argument("--image_size", type=int, default=None,
                        help="Evaluation resolution; default the model's image processor (or config) size.")
    add_eval_reading_arguments(parser, "Images per forward pass and process.")
    parser.add_argument("--dataloader_num_workers", "--num_workers", dest="dataloader_num_workers", type=int,
                        default=0, help="DataLoader workers decoding images.")
    parser.add_argument("--max_train_samples", type=int, default=None,
                        help="Seeded random subset of the train split (quick checks).")
    parser.add_argument("--max_eval_samples", "--max_test_samples", dest="max_eval_samples", type=int, default=None,
                        help="Seeded random subset of the evaluation split.")
    parser.add_argument("--linear_probe", action="store_true",
                        help="Also fit a logistic-regression probe on the frozen features (L-BFGS).")
    parser.add_argument("--mixed_precision", choices=["no", "bf16", "fp16"], default="no",
                        help="Autocast for the forward passes (fp16 needs a GPU).")
    parser.add_argument("--seed", type=int, default=0, help="Seed of the --max_*_samples subsets.")
    parser.add_argument("--output_file", default=None, help="Write the results here as JSON.")
    return parser


def _check(args: argparse.Namespace) -> None:
    for name in ("per_device_eval_batch_size", "max_train_samples", "max_eval_samples", "image_size"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise ValueError(f"--{name} must be a positive integer, got {value}")
    if min(args.k) < 1:
        raise ValueError(f"--k values must be positive integers, got {args.k}")
    if args.dataloader_num_workers < 0:
        raise ValueError(f"--dataloader_num_workers must be 0 or more, got {args.dataloader_num_workers}")


def evaluate(args: argparse.Namespace) -> dict[str, Any]:
    """Run the evaluation the parsed ``args`` describe; returns the summary (also printed / written).

    Raises:
        ValueError: bad input, one sentence naming the flag.
    """
    _check(args)
    import torch
    from accelerate import Accelerator

    from dino_hf.base.run_folder import portable_paths
    from dino_hf.data.streaming import detect_image_column, load_image_dataset
    from dino_hf.eval.evaluation import (
        LabelEncoder,
        check_columns,
        extract_features,
        knn_accuracy,
        limit_examples,
        linear_probe_accuracy,
        make_eval_dataloader,
    )
    from dino_hf.eval.loading import load_image_processor

    if args.mixed_precision == "fp16" and not torch.cuda.is_available():
        raise ValueError("--mixed_precision fp16 needs a CUDA device; use bf16 or no on the CPU")

    datasets, image_column = {}, args.image_column
    for name, split, max_samples in (("train", args.train_split, args.max_train_samples),
                                     ("test", args.eval_split, args.max_eval_samples)):
        try:
            dataset = load_image_dataset(args.dataset_name, args.dataset_config_name, split=split,
                                         streaming=args.streaming)
        except (ValueError, FileNotFoundError, KeyError) as error:
            message = first_line(error)
            if "--dataset_name" not in message:  # e.g. an unknown split
                flag = "--train_split" if name == "train" else "--eval_split"
                message = f"cannot load split {split!r} ({flag}) of --dataset_name {args.dataset_name!r}: {message}"
            raise ValueError(message) from None
        image_column = detect_image_column(dataset, image_column, args.dataset_name)
        check_columns(dataset, [image_column, args.label_column], ["--image_column", "--label_column"])
        datasets[name] = limit_examples(dataset, max_samples, args.seed)

    # after the data checks: a wrong column fails before the model loads
    backbone = load_model_backbone(args)
    accelerator = Accelerator(mixed_precision=args.mixed_precision)  # after the input checks
    backbone.to(accelerator.device)
    processor = load_image_processor(args.model_name_or_path, backbone.config, args.image_size, revision=args.model_revision)

    label_encoder = LabelEncoder()
    loaders = {
        name: make_eval_dataloader(dataset, processor, image_column=image_column, label_column=args.label_column,
                                   batch_size=args.per_device_eval_batch_size, num_workers=args.dataloader_num_workers,
                                   label_encoder=label_encoder)
        for name, dataset in datasets.items()
    }
    train_features, train_labels = extract_features(backbone, loaders["train"], accelerator,
                                                    description=f"features ({args.train_split})")
    test_features, test_labels = extract_features(backbone, loaders["test"], accelerator,
                                                  description=f"features ({args.eval_split})")

    accuracies = knn_accuracy(train_features, train_labels, test_features, test_labels, args.k, args.temperature)
    results: dict[str, Any] = {f"knn_top1_k{k}": accuracy for k, accuracy in accuracies.items()}
    if args.linear_probe:
        results["linear_probe_top1"] = linear_probe_accuracy(train_features, train_labels, test_features, test_labels)
    summary = {
        **results,
        "model": str(args.model_name_or_path),
        "which": args.which,
        "dataset_name": str(args.dataset_name),
        "dataset_config_name": args.dataset_config_name,
        "train_split": args.train_split,
        "eval_split": args.eval_split,
        "num_train_samples": int(train_labels.shape[0]),
        "num_test_samples": int(test_labels.shape[0]),
        "num_classes": int(max(train_labels.max(), test_labels.max()).item()) + 1,
        "feature_dim": int(train_features.shape[1]),
        "image_size": _processor_size(processor),
        "temperature": args.temperature,
    }
    if accelerator.is_main_process:
        print(f"{args.model_name_or_path} ({args.which}) on {args.dataset_name} ({summary['num_train_samples']} "
              f"train / {summary['num_test_samples']} test images, {summary['num_classes']} classes)")
        for key, value in results.items():
            print(f"{key}: {value:.4f}")
        if args.output_file:
            output = Path(args.output_file)
            output.parent.mkdir(parents=True, exist_ok=True)
            output.write_text(json.dumps(portable_paths(summary), indent=2) + "\n")
    return summary


def _processor_size(processor: Any) -> dict | None:
    size = getattr(processor, "crop_size", None) if getattr(processor, "do_center_crop", False) else None
    size = size or getattr(processor, "size", None)
    if size is None:
        return None
    items = size.items() if hasattr(size, "items") else vars(size).items()
    return {key: value for key, value in items if value is not None}


def main(argv: list[str] | None = None, prog: str = PROG) -> int:
    """Run ``dino-hf-eval`` on ``argv``; returns the exit status (2: bad input, one sentence on stderr)."""
    return run_main(prog, argv, build_parser, evaluate)


if __name__ == "__main__":
    sys.exit(main())

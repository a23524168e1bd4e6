#!/usr/bin/env python
"""Weighted k-NN (and optionally linear-probe) accuracy of a frozen ViT backbone on a labelled dataset.

Works on a folder written by ``DinoForPreTraining.save_backbone`` and on any Hub ViT backbone id, with
the official DINO protocol: CLS features of ``last_hidden_state``, L2-normalised; the k nearest
training images (cosine similarity) vote for their class with weight exp(sim / 0.07).

    python scripts/eval_knn.py --model outputs/demo/backbone --dataset_name data/fashion_mnist
    python scripts/eval_knn.py --model facebook/dino-vits16 --dataset_name frgfm/imagenette \\
        --dataset_config_name 160px --test_split validation --label_column label --k 10 20 100

Several processes: ``accelerate launch scripts/eval_knn.py ...`` shards the feature extraction.
Prints one line per metric and writes them as JSON with ``--output_file``. Errors in the inputs
(a wrong path, split or column) print one sentence and exit with status 2.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

PROG = "eval_knn.py"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument(
        "--model",
        required=True,
        help="Backbone folder (save_backbone / save_pretrained) or Hub model id.",
    )
    parser.add_argument("--revision", default=None, help="Hub revision of --model.")
    parser.add_argument(
        "--dataset_name",
        required=True,
        help="Local folder (imagefolder or parquet), *.parquet, *.tar shards, or a Hub dataset id.",
    )
    parser.add_argument("--dataset_config_name", default=None, help="Hub dataset configuration.")
    parser.add_argument("--train_split", default="train", help="Split whose features are the k-NN memory.")
    parser.add_argument("--test_split", default="test", help="Split that is classified and scored.")
    parser.add_argument("--image_column", default="image", help="Column holding the images.")
    parser.add_argument("--label_column", default="label", help="Column holding the class labels.")
    parser.add_argument(
        "--k",
        type=int,
        nargs="+",
        default=[10, 20, 100, 200],
        help="Numbers of neighbours (the official DINO evaluation reports 10, 20, 100, 200; "
        "20 is the headline figure). All share one nearest-neighbour search.",
    )
    parser.add_argument(
        "--temperature",
        type=float,
        default=0.07,
        help="Vote temperature T: weights exp(sim / T). 0.07 is the official value.",
    )
    parser.add_argument(
        "--image_size",
        type=int,
        default=None,
        help="Evaluation resolution; default the model's image processor (or config) size.",
    )
    parser.add_argument("--batch_size", type=int, default=64, help="Images per forward pass and process.")
    parser.add_argument("--num_workers", type=int, default=0, help="DataLoader workers decoding images.")
    parser.add_argument(
        "--max_train_samples",
        type=int,
        default=None,
        help="Seeded random subset of the train split (quick checks).",
    )
    parser.add_argument("--max_test_samples", type=int, default=None, help="Seeded random subset of the test split.")
    parser.add_argument(
        "--streaming",
        action="store_true",
        help="Stream the dataset instead of downloading / converting it first (large Hub sets).",
    )
    parser.add_argument(
        "--linear_probe",
        action="store_true",
        help="Also fit a logistic-regression probe on the frozen features (L-BFGS).",
    )
    parser.add_argument(
        "--mixed_precision",
        choices=["no", "bf16", "fp16"],
        default="no",
        help="Autocast for the forward passes (fp16 needs a GPU).",
    )
    parser.add_argument("--seed", type=int, default=0, help="Seed of the --max_*_samples subsets.")
    parser.add_argument("--output_file", default=None, help="Write the results here as JSON.")
    args = parser.parse_args(argv)
    for name in ("batch_size", "max_train_samples", "max_test_samples", "image_size"):
        value = getattr(args, name)
        if value is not None and value < 1:
            fail(f"--{name} must be a positive integer, got {value}.")
    if min(args.k) < 1:
        fail(f"--k values must be positive integers, got {args.k}.")
    return args


def fail(message: str) -> None:
    """Print one sentence and exit with status 2 (bad input)."""
    message = message.strip()
    print(f"{PROG}: error: {message}{'' if message.endswith('.') else '.'}", file=sys.stderr)
    sys.exit(2)


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0].rstrip(".") if text else type(error).__name__


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)

    import torch
    from accelerate import Accelerator

    from dino_hf.backbones import load_backbone, load_image_processor
    from dino_hf.data import load_image_dataset
    from dino_hf.evaluation import (
        LabelEncoder,
        check_columns,
        extract_features,
        knn_accuracy,
        limit_examples,
        linear_probe_accuracy,
        make_eval_dataloader,
    )

    if args.mixed_precision == "fp16" and not torch.cuda.is_available():
        fail("--mixed_precision fp16 needs a CUDA device; use bf16 or no on the CPU.")

    datasets = {}
    for name, split, max_samples in (
        ("train", args.train_split, args.max_train_samples),
        ("test", args.test_split, args.max_test_samples),
    ):
        try:
            dataset = load_image_dataset(
                args.dataset_name, args.dataset_config_name, split=split, streaming=args.streaming
            )
        except (ValueError, FileNotFoundError, KeyError) as error:
            message = _first_line(error)
            if "--dataset_name" not in message:  # e.g. an unknown split
                flag = "--train_split" if name == "train" else "--test_split"
                message = f"cannot load split {split!r} ({flag}) of --dataset_name {args.dataset_name!r}: {message}"
            fail(message)
        try:  # before loading the model: a wrong column fails fast
            check_columns(dataset, [args.image_column, args.label_column], ["--image_column", "--label_column"])
        except ValueError as error:
            fail(_first_line(error))
        datasets[name] = limit_examples(dataset, max_samples, args.seed)

    try:
        backbone = load_backbone(args.model, revision=args.revision)
    except (OSError, ValueError, KeyError) as error:
        fail(f"--model {args.model!r} is not a loadable backbone folder or Hub id ({_first_line(error)})")
    if not hasattr(backbone.config, "hidden_size"):
        fail(f"--model {args.model!r} is not a ViT-style backbone (its config has no hidden_size).")
    accelerator = Accelerator(mixed_precision=args.mixed_precision)  # after the input checks
    backbone.to(accelerator.device)
    processor = load_image_processor(args.model, backbone.config, args.image_size, revision=args.revision)

    label_encoder = LabelEncoder()
    loaders = {
        name: make_eval_dataloader(
            dataset,
            processor,
            image_column=args.image_column,
            label_column=args.label_column,
            batch_size=args.batch_size,
            num_workers=args.num_workers,
            label_encoder=label_encoder,
        )
        for name, dataset in datasets.items()
    }

    try:
        train_features, train_labels = extract_features(backbone, loaders["train"], accelerator)
        test_features, test_labels = extract_features(backbone, loaders["test"], accelerator)
    except ValueError as error:  # e.g. a column missing in a stream, an empty split
        fail(_first_line(error))

    accuracies = knn_accuracy(train_features, train_labels, test_features, test_labels, args.k, args.temperature)
    results: dict = {f"knn_top1_k{k}": accuracy for k, accuracy in accuracies.items()}
    if args.linear_probe:
        results["linear_probe_top1"] = linear_probe_accuracy(train_features, train_labels, test_features, test_labels)
    summary = {
        **results,
        "model": str(args.model),
        "dataset_name": str(args.dataset_name),
        "dataset_config_name": args.dataset_config_name,
        "train_split": args.train_split,
        "test_split": args.test_split,
        "num_train_samples": int(train_labels.shape[0]),
        "num_test_samples": int(test_labels.shape[0]),
        "num_classes": int(max(train_labels.max(), test_labels.max()).item()) + 1,
        "feature_dim": int(train_features.shape[1]),
        "image_size": _processor_size(processor),
        "temperature": args.temperature,
    }
    if accelerator.is_main_process:
        print(
            f"{args.model} on {args.dataset_name} ({summary['num_train_samples']} train / "
            f"{summary['num_test_samples']} test images, {summary['num_classes']} classes)"
        )
        for key, value in results.items():
            print(f"{key}: {value:.4f}")
        if args.output_file:
            output = Path(args.output_file)
            output.parent.mkdir(parents=True, exist_ok=True)
            output.write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def _processor_size(processor) -> dict | None:
    size = getattr(processor, "crop_size", None) if getattr(processor, "do_center_crop", False) else None
    size = size or getattr(processor, "size", None)
    if size is None:
        return None
    items = size.items() if hasattr(size, "items") else vars(size).items()
    return {key: value for key, value in items if value is not None}


if __name__ == "__main__":
    main()

#!/usr/bin/env python
"""Summarise a demo run: 20-NN accuracy of the trained backbone next to two baselines.

Loads ``OUTPUT_DIR/backbone`` exactly as a user would, with plain ``transformers.AutoModel`` (the
DINO embedding is a ViT's CLS token of ``last_hidden_state``, a ConvNet's pooled output), and
scores it with the official DINO k-NN protocol (L2-normalised CLS features, cosine similarity,
the k nearest training images vote with weight exp(sim / 0.07)) on the full Fashion-MNIST test
set, with up to 60,000 training images as the memory bank. Next to it:

- raw pixels: the same k-NN on the flattened pixel intensities in [0, 1] (no network at all);
- random weights: the same architecture (the backbone's own config) freshly initialised with
  ``--seed``, i.e. what training starts from.

Both baselines are deterministic, so they are computed once and cached in
``DATA_DIR/knn_baselines.json`` (keyed by the protocol, the data files, and for the random weights
the architecture, seed and torch version).

    python scripts/demo_summary.py --output_dir outputs/demo --data_dir data/fashion_mnist

Prints a short table and where the run wrote its files, and writes the figures to
``OUTPUT_DIR/demo_summary.json``. About a minute on 2 CPU cores for the demo backbone (half that
once the baselines are cached).
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import sys
import time
from collections.abc import Iterator
from pathlib import Path

PROG = "demo_summary.py"
BASELINE_CACHE_NAME = "knn_baselines.json"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog=PROG, description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    parser.add_argument("--output_dir", required=True, help="Training output folder holding backbone/.")
    parser.add_argument(
        "--data_dir",
        default="data/fashion_mnist",
        help="Fashion-MNIST as written by scripts/prepare_fashion_mnist.py (parquet shards under data/).",
    )
    parser.add_argument("--train_split", default="train", help="Split used as the k-NN memory bank.")
    parser.add_argument("--test_split", default="test", help="Split that is classified (all of it).")
    parser.add_argument("--k", type=int, default=20, help="Neighbours (20 is the official headline figure).")
    parser.add_argument("--temperature", type=float, default=0.07, help="Vote temperature (official 0.07).")
    parser.add_argument(
        "--max_train_samples",
        type=int,
        default=60_000,
        help="Training images in the memory bank (the first N; Fashion-MNIST's train split is not class-sorted).",
    )
    parser.add_argument("--batch_size", type=int, default=500, help="Images per forward pass.")
    parser.add_argument("--seed", type=int, default=0, help="Seed of the random-weight baseline.")
    parser.add_argument(
        "--no_random_baseline", action="store_true", help="Skip the random-weight baseline (halves the time)."
    )
    args = parser.parse_args(argv)
    for name in ("k", "max_train_samples", "batch_size"):
        if getattr(args, name) < 1:
            fail(f"--{name} must be a positive integer, got {getattr(args, name)}.")
    return args


def fail(message: str) -> None:
    """Print one sentence and exit with status 2 (bad input)."""
    print(f"{PROG}: error: {message}", file=sys.stderr)
    sys.exit(2)


# --------------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------------
def split_files(data_dir: Path, split: str) -> list[Path]:
    """The parquet shards of ``split`` (``data/{split}-*.parquet``, or ``{split}*.parquet`` anywhere)."""
    files = sorted((data_dir / "data").glob(f"{split}-*.parquet")) or sorted(data_dir.rglob(f"{split}*.parquet"))
    if not files:
        fail(
            f"--data_dir {data_dir} holds no {split}*.parquet files; write them with "
            f"`python scripts/prepare_fashion_mnist.py --output_dir {data_dir}`."
        )
    return files


def load_split(data_dir: Path, split: str, max_samples: int | None = None):
    """Decode a split into ``(images (N, 3, H, W) uint8, labels (N,) int64)`` (first ``max_samples`` rows)."""
    import numpy as np
    import pyarrow.parquet as pq
    import torch
    from PIL import Image

    images, labels = [], []
    for path in split_files(data_dir, split):
        table = pq.read_table(path, columns=["image", "label"])
        for cell, label in zip(table.column("image").to_pylist(), table.column("label").to_pylist(), strict=True):
            if max_samples is not None and len(images) >= max_samples:
                break
            image = Image.open(io.BytesIO(cell["bytes"])) if isinstance(cell, dict) else cell
            images.append(np.asarray(image.convert("L")))
            labels.append(int(label))
    pixels = torch.from_numpy(np.stack(images)).unsqueeze(1).expand(-1, 3, -1, -1)
    return pixels, torch.tensor(labels, dtype=torch.long)


def data_fingerprint(data_dir: Path, splits: tuple[str, ...]) -> str:
    """Names, sizes and modification times of the shards: a changed dataset invalidates the cache."""
    digest = hashlib.sha256()
    for split in splits:
        for path in split_files(data_dir, split):
            stat = path.stat()
            digest.update(f"{path.name}:{stat.st_size}:{int(stat.st_mtime)};".encode())
    return digest.hexdigest()[:16]


# --------------------------------------------------------------------------------------------------
# Scores
# --------------------------------------------------------------------------------------------------
def _cache_path(data_dir: Path) -> Path:
    return data_dir / BASELINE_CACHE_NAME


def cached_accuracy(data_dir: Path, key: str, compute) -> tuple[float, bool]:
    """``compute()`` once per ``key``, kept in ``DATA_DIR/knn_baselines.json``. Returns (accuracy, from_cache)."""
    cache_path = _cache_path(data_dir)
    cache: dict = {}
    if cache_path.is_file():
        try:
            cache = json.loads(cache_path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            cache = {}
    if key in cache:
        return float(cache[key]), True
    accuracy = compute()
    cache[key] = accuracy
    try:
        cache_path.write_text(json.dumps(cache, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    except OSError:
        pass  # a read-only data folder only costs the recomputation next time
    return accuracy, False


def _protocol_key(args: argparse.Namespace, data, data_dir: Path) -> str:
    (_, train_labels), (_, test_labels) = data
    return (
        f"k{args.k}_T{args.temperature}_train:{args.train_split}:{len(train_labels)}_"
        f"test:{args.test_split}:{len(test_labels)}_data:{data_fingerprint(data_dir, (args.train_split, args.test_split))}"
    )


def raw_pixel_accuracy(args: argparse.Namespace, data) -> float:
    """k-NN accuracy on the flattened pixel intensities in [0, 1] (cosine, as for features)."""
    import torch.nn.functional as F

    from dino_hf.eval.evaluation import knn_accuracy

    (train_images, train_labels), (test_images, test_labels) = data

    def flat(images):
        return F.normalize(images[:, 0].flatten(1).float() / 255.0, dim=-1)

    return knn_accuracy(
        flat(train_images), train_labels, flat(test_images), test_labels, k=(args.k,), temperature=args.temperature
    )[args.k]


def random_weight_accuracy(args: argparse.Namespace, config, processor, data) -> float:
    """k-NN accuracy of the same architecture freshly initialised (seed ``--seed``)."""
    import torch

    from dino_hf.models.backbones import family_of

    torch.manual_seed(args.seed)
    # The family's training constructor (a ViT without its pooler, a ResNet or ConvNeXt as is): the
    # untrained network DINO started from, embedded the way the trained one is.
    random_backbone = family_of(config).build(config).eval()
    return backbone_accuracy(args, random_backbone, processor, data)


def backbone_accuracy(args: argparse.Namespace, backbone, processor, data) -> float:
    """k-NN accuracy of a backbone's L2-normalised CLS features (``dino_hf.eval.evaluation``)."""
    from dino_hf.eval.evaluation import extract_features, knn_accuracy

    def batches(images, labels) -> Iterator[tuple]:
        for start in range(0, len(labels), args.batch_size):
            stop = start + args.batch_size
            # The image processor accepts a uint8 (B, 3, H, W) batch: resize + rescale + normalise at once.
            pixel_values = processor(images=images[start:stop], return_tensors="pt")["pixel_values"]
            yield pixel_values, labels[start:stop]

    (train_images, train_labels), (test_images, test_labels) = data
    train_features, train_feature_labels = extract_features(backbone, batches(train_images, train_labels))
    test_features, test_feature_labels = extract_features(backbone, batches(test_images, test_labels))
    return knn_accuracy(
        train_features,
        train_feature_labels,
        test_features,
        test_feature_labels,
        k=(args.k,),
        temperature=args.temperature,
    )[args.k]


# --------------------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------------------
def describe_architecture(config) -> str:
    """One line on the backbone: a ViT's depth, width and patch, a ConvNet's stage widths."""
    from dino_hf.models.backbones import family_of

    family = family_of(config).name_of(config.model_type)
    if hasattr(config, "patch_size") and hasattr(config, "num_hidden_layers"):
        return (
            f"{family}: {config.num_hidden_layers} layers, width {config.hidden_size}, patch {config.patch_size}, "
            f"{config.image_size} px"
        )
    return f"{family}: stage widths {list(config.hidden_sizes)}, depths {list(config.depths)}"


def describe_outputs(output_dir: Path) -> list[tuple[str, str]]:
    """(path, what it is) for the files a training run leaves behind, those that exist."""
    entries = [
        ("backbone/", "exported teacher backbone: AutoModel.from_pretrained(...)"),
        ("model.safetensors", "full DinoForPreTraining (student, teacher, head, center) to continue training"),
        ("metrics.jsonl", "per-step loss, learning rate, teacher entropy, images/s, k-NN evaluations"),
        ("training_curves.png", "loss, k-NN accuracy, teacher entropy and learning rate against steps"),
        ("attention/", "last-layer CLS attention maps of a few fixed images"),
        ("eval_results.json", "final in-training k-NN evaluation"),
        ("training_args.json", "the resolved training arguments"),
        ("checkpoints/", "resumable checkpoints (--resume_from_checkpoint latest)"),
        ("demo_summary.json", "the figures printed above"),
    ]
    return [(str(output_dir / name), what) for name, what in entries if (output_dir / name.rstrip("/")).exists()]


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    output_dir, data_dir = Path(args.output_dir), Path(args.data_dir)
    backbone_dir = output_dir / "backbone"
    if not (backbone_dir / "config.json").is_file():
        fail(
            f"--output_dir {output_dir} holds no backbone/config.json: run scripts/train.py with that --output_dir first."
        )

    import torch
    from transformers import AutoImageProcessor, AutoModel

    started = time.perf_counter()
    backbone = AutoModel.from_pretrained(backbone_dir).eval()
    processor = AutoImageProcessor.from_pretrained(backbone_dir)
    data = (
        load_split(data_dir, args.train_split, args.max_train_samples),
        load_split(data_dir, args.test_split),
    )
    num_train, num_test = len(data[0][1]), len(data[1][1])

    results: dict = {"k": args.k, "temperature": args.temperature, "num_train": num_train, "num_test": num_test}
    results["trained_backbone"] = backbone_accuracy(args, backbone, processor, data)
    protocol = _protocol_key(args, data, data_dir)
    results["raw_pixels"], pixels_cached = cached_accuracy(
        data_dir, f"raw_pixels_{protocol}", lambda: raw_pixel_accuracy(args, data)
    )
    random_cached = False
    if not args.no_random_baseline:
        # Deterministic for a given architecture, preprocessing, seed and torch version: cached as well.
        architecture = hashlib.sha256(
            (
                backbone.config.to_json_string(use_diff=False)
                + json.dumps(processor.to_dict(), sort_keys=True, default=str)
            ).encode()
        ).hexdigest()[:16]
        results["random_weights"], random_cached = cached_accuracy(
            data_dir,
            f"random_weights_{architecture}_seed{args.seed}_torch{torch.__version__}_{protocol}",
            lambda: random_weight_accuracy(args, backbone.config, processor, data),
        )
    results["seconds"] = round(time.perf_counter() - started, 1)
    (output_dir / "demo_summary.json").write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")

    config = backbone.config
    print()
    print(
        f"Weighted {args.k}-NN accuracy on the {num_test:,} Fashion-MNIST test images "
        f"(memory bank: {num_train:,} training images; cosine, T={args.temperature}):"
    )
    rows = [
        ("DINO backbone (trained)", results["trained_backbone"]),
        ("raw pixels" + (" (cached)" if pixels_cached else ""), results["raw_pixels"]),
    ]
    if "random_weights" in results:
        rows.append(("same network, random weights" + (" (cached)" if random_cached else ""), results["random_weights"]))
    for name, accuracy in rows:
        print(f"  {name:<36} {accuracy:.4f}")
    print(f"  ({describe_architecture(config)})")
    print(verdict(results["trained_backbone"], results["raw_pixels"], _machine(output_dir)))
    print()
    print("Written:")
    for path, what in describe_outputs(output_dir):
        print(f"  {path:<40} {what}")
    print()
    print(
        "Use it:  from transformers import AutoModel; "
        f"AutoModel.from_pretrained('{backbone_dir}')"
    )
    return results


def _machine(output_dir: Path) -> str:
    """The CPU (or GPU) and precision the run recorded in its training_args.json."""
    recorded = json.loads((output_dir / "training_args.json").read_text()) if (output_dir / "training_args.json").is_file() else {}
    device = recorded.get("machine_cpu") or recorded.get("hardware") or "this machine"
    precision = recorded.get("resolved_mixed_precision", "?")
    return f"{device}, {'fp32' if precision == 'no' else precision} precision"


def verdict(trained: float, raw_pixels: float, machine: str) -> str:
    """One line: whether the trained backbone beat raw pixels here, and by how much either way."""
    gap = trained - raw_pixels
    if gap >= 0:
        return f"DINO beats raw pixels by {gap:+.4f} on {machine}."
    return (f"DINO is {-gap:.4f} short of raw pixels on {machine} within this budget: this CPU trains too "
            "few steps in the demo's minutes (benchmarks/RESULTS.md has the figures of each CPU kind).")


if __name__ == "__main__":
    main()

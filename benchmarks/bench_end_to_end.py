#!/usr/bin/env python
"""End-to-end throughput of ``scripts/train.py`` itself on parquet Fashion-MNIST.

Runs the real entry point (streaming ``datasets`` loader, multi-crop augmentation in loader workers,
Accelerate step, EMA, logging, checkpointing off) for a fixed number of optimiser steps and reports
source images per second and the fraction of step time spent waiting for data, as the training loop
itself logs them in ``metrics.jsonl`` (medians over logging intervals, the first one — start-up,
worker spawn, first shard open — left out).

    .venv/bin/python scripts/prepare_fashion_mnist.py --output_dir data/fashion_mnist
    .venv/bin/python benchmarks/bench_end_to_end.py --data_dir data/fashion_mnist --max_steps 60

Any extra arguments after ``--`` go to ``scripts/train.py`` (e.g. ``-- --mixed_precision no``, or
``-- --augmentation_device cuda`` to run the multi-crop on the GPU with decode-only loader workers).

``--synthetic_images N`` trains on N generated photo-like JPEGs (``--synthetic_image_size`` px, smooth
colour fields plus noise, ~ImageNet decode cost) in 16 parquet shards instead of ``--data_dir``: the
GPU check uses it where Fashion-MNIST is not installed.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the helper modules in benchmarks/
from recording import record_result, write_metrics_json
from synthetic_images import make_jpegs, write_parquet

REPO_ROOT = Path(__file__).resolve().parents[1]


def parse_args(argv: list[str] | None = None) -> tuple[argparse.Namespace, list[str]]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data_dir", default="data/fashion_mnist", help="Output of scripts/prepare_fashion_mnist.py.")
    parser.add_argument("--config", default=str(REPO_ROOT / "scripts" / "configs" / "fashion_mnist_cpu.yaml"))
    parser.add_argument("--max_steps", type=int, default=60, help="Optimiser steps to run (a few minutes on 2 cores).")
    parser.add_argument("--logging_steps", type=int, default=10)
    parser.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS of the training process.")
    parser.add_argument("--results_file", type=Path, default=None, help="Results table (default benchmarks/RESULTS.md).")
    parser.add_argument("--json_output", type=Path, default=None, help="Also write the metrics to this JSON file.")
    parser.add_argument("--synthetic_images", type=int, default=0, help="Train on this many generated JPEGs instead.")
    parser.add_argument("--synthetic_image_size", type=int, default=320, help="Side of the generated JPEGs.")
    parser.add_argument(
        "--synthetic_dir",
        type=Path,
        default=None,
        help="Keep the generated JPEGs here and reuse them when present (default: a temporary folder).",
    )
    parser.add_argument("--no_record", action="store_true", help="Print the JSON line only.")
    arguments, extra = parser.parse_known_args(argv)
    if extra and extra[0] == "--":
        extra = extra[1:]
    return arguments, extra


def run_training(arguments: argparse.Namespace, extra: list[str], output_dir: Path) -> float:
    """Run scripts/train.py; return its wall-clock seconds."""
    command = [
        sys.executable, str(REPO_ROOT / "scripts" / "train.py"), "--config", arguments.config,
        "--dataset_name", str(arguments.data_dir), "--output_dir", str(output_dir),
        "--max_steps", str(arguments.max_steps), "--logging_steps", str(arguments.logging_steps),
        "--checkpointing_steps", str(10**9), "--eval_dataset_name", "", "--report_to", "none", *extra,
    ]
    environment = {**os.environ, "OMP_NUM_THREADS": str(arguments.threads)}
    started = time.perf_counter()
    result = subprocess.run(command, env=environment, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        sys.exit(f"bench_end_to_end: scripts/train.py failed (exit {result.returncode}):\n{result.stderr[-3000:]}")
    return time.perf_counter() - started


def main(argv: list[str] | None = None) -> None:
    arguments, extra = parse_args(argv)
    if arguments.synthetic_images <= 0 and not Path(arguments.data_dir).exists():
        sys.exit(f"bench_end_to_end: {arguments.data_dir} does not exist; run scripts/prepare_fashion_mnist.py first.")
    with tempfile.TemporaryDirectory() as temporary:
        output_dir = Path(temporary) / "run"
        if arguments.synthetic_images > 0:
            folder = arguments.synthetic_dir or Path(temporary) / "synthetic"
            if not any(folder.glob("*.parquet")):
                size = arguments.synthetic_image_size
                write_parquet(make_jpegs(arguments.synthetic_images, size, size), folder, num_shards=16)
            arguments.data_dir = folder
        wall_seconds = run_training(arguments, extra, output_dir)
        rows = [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    rows = [row for row in rows if "images_per_second" in row][1:]  # first interval: start-up
    if not rows:
        sys.exit("bench_end_to_end: too few logging intervals; raise --max_steps or lower --logging_steps.")
    metrics = {
        "max_steps": arguments.max_steps,
        "images_per_second_median": statistics.median(row["images_per_second"] for row in rows),
        "data_wait_fraction_median": statistics.median(row["data_wait_fraction"] for row in rows),
        "wall_seconds": wall_seconds,
        "threads": arguments.threads,
        "load_average_1min": os.getloadavg()[0],
        "train_arguments": " ".join(extra),
    }
    write_metrics_json(metrics, arguments.json_output)
    command = "python benchmarks/bench_end_to_end.py " + " ".join(argv if argv is not None else sys.argv[1:])
    if arguments.no_record:
        print(json.dumps(metrics))
        return
    record_result(
        "bench_end_to_end",
        command.strip(),
        metrics,
        notes=f"scripts/train.py with {Path(arguments.config).name}, source images/s and data-wait fraction "
        "from metrics.jsonl (medians over logging intervals after the first)",
        results_path=arguments.results_file,
    )


if __name__ == "__main__":
    main()

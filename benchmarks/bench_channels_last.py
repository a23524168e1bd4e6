#!/usr/bin/env python
"""Training step of the demo recipe with a ResNet's crops in channels-last order against NCHW, in one run.

``BackboneFamily.channels_last`` (``dino_hf.models.backbones``) feeds a ResNet its crops in channels-last
memory order (NHWC), so that oneDNN's convolutions, batch norms and max pooling skip a layout conversion
at every layer. This benchmark trains the real recipe (``DinoTrainer``: the parquet stream, the batched
multi-crop, the optimiser step, the EMA) for ``--steps`` steps per arm, times the steps after
``--skip_steps`` (wall clock, the crops' augmentation included), and alternates the arms ``--repeats``
times so that a machine that slows down slows both. The reference arm is the same run with the family's
setting turned off for its duration (NCHW crops, as before the change).

    python scripts/prepare_fashion_mnist.py --output_dir data/fashion_mnist
    python benchmarks/bench_channels_last.py --data_dir data/fashion_mnist --mixed_precision no --record
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import time
from collections.abc import Iterator
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the helper modules in benchmarks/
from recording import publish

BENCHMARK = "bench_channels_last"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data_dir", default="data/fashion_mnist", help="Output of scripts/prepare_fashion_mnist.py.")
    parser.add_argument("--recipe", default="fashion_mnist_resnet_cpu", help="A shipped recipe with a ResNet backbone.")
    parser.add_argument("--mixed_precision", default="no", choices=("no", "bf16", "auto"))
    parser.add_argument("--per_device_train_batch_size", type=int, default=None, help="Default: the recipe's.")
    parser.add_argument("--steps", type=int, default=120, help="Optimiser steps per arm and repeat.")
    parser.add_argument("--skip_steps", type=int, default=40, help="First steps of each arm left out of the timing.")
    parser.add_argument("--repeats", type=int, default=3, help="Alternations of the two arms (medians are reported).")
    parser.add_argument("--output_dir", default="outputs/bench_channels_last", help="Scratch run folder.")
    parser.add_argument("--record", action="store_true", help="Append a row to benchmarks/RESULTS.md.")
    return parser.parse_args(argv)


@contextlib.contextmanager
def resnet_channels_last(enabled: bool) -> Iterator[None]:
    """The ResNet family's ``channels_last`` set to ``enabled`` for the block (the registry entry is frozen)."""
    from dino_hf.models.backbones import family_of

    family = family_of("resnet")
    saved = family.channels_last
    object.__setattr__(family, "channels_last", enabled)
    try:
        yield
    finally:
        object.__setattr__(family, "channels_last", saved)


def seconds_per_step(args: argparse.Namespace, channels_last: bool) -> tuple[float, dict]:
    """Mean step time of one run (the steps after ``skip_steps``) and the run's ``training_args.json``."""
    from transformers import TrainerCallback

    from dino_hf import DinoTrainer, DinoTrainingArguments

    class StepTimer(TrainerCallback):
        started: float | None = None
        seconds: float | None = None

        def on_step_end(self, _args, state, control, **kwargs):  # noqa: ANN001, ANN003, ANN201
            if state.global_step == args.skip_steps:
                self.started = time.perf_counter()
            elif state.global_step == args.steps:
                self.seconds = (time.perf_counter() - self.started) / (args.steps - args.skip_steps)
                control.should_training_stop = True

    training_args = DinoTrainingArguments.from_recipe(
        args.recipe, output_dir=args.output_dir, overwrite_output_dir=True, dataset_name=args.data_dir,
        eval_dataset_name=None, max_train_minutes=None, max_steps=10 * args.steps, logging_steps=10 * args.steps,
        checkpointing_steps=10 * args.steps, mixed_precision=args.mixed_precision, report_to=[],
        **({} if args.per_device_train_batch_size is None else
           {"per_device_train_batch_size": args.per_device_train_batch_size}),
    )
    timer = StepTimer()
    with resnet_channels_last(channels_last):
        DinoTrainer(args=training_args, callbacks=[timer]).train()
    return timer.seconds, json.loads((Path(args.output_dir) / "training_args.json").read_text())


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if not 0 < args.skip_steps < args.steps:
        raise SystemExit("--skip_steps must be between 0 and --steps.")
    times: dict[bool, list[float]] = {False: [], True: []}
    recorded: dict = {}
    for _ in range(args.repeats):
        for channels_last in (False, True):
            seconds, recorded = seconds_per_step(args, channels_last)
            times[channels_last].append(seconds)
            print(f"{'channels_last' if channels_last else 'nchw'}: {seconds:.4f} s per step", flush=True)
    reference, ours = statistics.median(times[False]), statistics.median(times[True])
    metrics = {
        "recipe": args.recipe,
        "precision": recorded.get("resolved_mixed_precision"),
        "batch_size": recorded.get("per_device_train_batch_size"),
        "steps_timed": args.steps - args.skip_steps,
        "repeats": args.repeats,
        "nchw_seconds_per_step": round(reference, 4),
        "channels_last_seconds_per_step": round(ours, 4),
        "nchw_runs": " ".join(f"{value:.4f}" for value in times[False]),
        "channels_last_runs": " ".join(f"{value:.4f}" for value in times[True]),
        "speedup_channels_last_vs_nchw": round(reference / ours, 3),
    }
    notes = ("Whole optimiser steps of the recipe through DinoTrainer (parquet stream, batched multi-crop in the "
             "training process, AdamW, EMA), wall clock, arms alternated; reference = the ResNet's crops in NCHW "
             "order (the family's channels_last off), ours = channels-last crops; weights in their default order "
             "in both.")
    publish(BENCHMARK, "benchmarks/bench_channels_last.py", argv, metrics, notes, args.record)
    return metrics


if __name__ == "__main__":
    main()

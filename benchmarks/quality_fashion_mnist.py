"""Quality on real images: DINO on Fashion-MNIST for a fixed CPU wall-clock budget, against two baselines.

Trains the demo recipe (``scripts/configs/fashion_mnist_cpu.yaml``) from scratch through the real entry
point, ``scripts/train.py``, for ``--budget_minutes`` of wall-clock time (default 30), then scores the
exported teacher backbone (``output_dir/backbone``, loaded with ``transformers.AutoModel``) on the full
10,000-image test set with the official DINO protocol — weighted 20-NN on L2-normalised CLS features
(cosine similarity, votes exp(sim / 0.07), all 60,000 training images as the memory bank) — and a
linear probe (logistic regression on the frozen features), next to two baselines measured in the
same run:

- raw pixels: the same 20-NN / linear probe on the flattened pixel intensities in [0, 1];
- random weights: the same ViT architecture freshly initialised (what training starts from).

The target (issue 5) is a trained backbone that beats raw pixels on 20-NN within 30 minutes on 2 CPU
cores.

A fixed wall-clock budget with a step-indexed recipe: ``scripts/train.py --max_train_minutes`` calibrates
the step and evaluation time at its start and plans the step count so that the training loop, its
in-training evaluations included, ends within the budget with every schedule complete. On a shared
machine the real duration differs somewhat; the recorded ``train_minutes`` is what it took.

Learning curve: the run evaluates the teacher once at the end of its calibration and then every
``eval_steps`` steps, chosen from a first estimate of the step time so that there are about
``--num_evaluations`` points (20-NN on ``--eval_max_samples`` training / test images, the in-training
``KnnMonitor``); each evaluation row of ``metrics.jsonl`` is time-stamped as it appears. The curve goes
to ``OUTPUT_DIR/learning_curve.json`` and into the notes of the ``benchmarks/RESULTS.md`` row.

    .venv/bin/python benchmarks/quality_fashion_mnist.py                       # 30 minutes (make bench-quality)
    .venv/bin/python benchmarks/quality_fashion_mnist.py --budget_minutes 2 --no_record   # smoke run

Precision, loader workers and compute threads are ``scripts/train.py``'s own choices for this machine
(``--mixed_precision auto``, ``--dataloader_num_workers auto``, ``--torch_num_threads auto``); pass
``--train_args`` to force others.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))  # the helper modules in benchmarks/
sys.path.insert(0, str(REPO_ROOT / "scripts"))  # scripts/demo_summary.py (data loading)
from recording import publish  # noqa: E402

BENCHMARK = "quality_fashion_mnist"
DEFAULT_CONFIG = REPO_ROOT / "scripts" / "configs" / "fashion_mnist_cpu.yaml"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    parser.add_argument(
        "--budget_minutes",
        type=float,
        default=30.0,
        help="Wall-clock budget of the training run, in-training evaluations included.",
    )
    parser.add_argument("--config", default=str(DEFAULT_CONFIG), help="Training recipe (scripts/train.py --config).")
    parser.add_argument(
        "--data_dir",
        default=str(REPO_ROOT / "data" / "fashion_mnist"),
        help="Fashion-MNIST parquet (written by scripts/prepare_fashion_mnist.py when missing).",
    )
    parser.add_argument(
        "--output_dir",
        default=str(REPO_ROOT / "outputs" / BENCHMARK),
        help="Work folder: calibration/ and run/ training outputs, learning_curve.json.",
    )
    parser.add_argument(
        "--num_evaluations",
        type=int,
        default=6,
        help="In-training k-NN evaluations (points of the learning curve), the final one included.",
    )
    parser.add_argument(
        "--eval_max_samples",
        type=int,
        default=10_000,
        help="Training and test images of each in-training evaluation (the final scores use all).",
    )
    parser.add_argument(
        "--expected_steps_per_second",
        type=float,
        default=8.0,
        help="First estimate of the step rate, only used to space the --num_evaluations evaluations.",
    )
    parser.add_argument(
        "--train_args",
        default="",
        help="Extra scripts/train.py flags appended to the recipe, e.g. '--base_learning_rate 3e-3'.",
    )
    parser.add_argument("--k", type=int, default=20, help="Neighbours of the headline k-NN figure.")
    parser.add_argument("--seed", type=int, default=0, help="Seed of the random-weight baseline.")
    parser.add_argument("--no_record", action="store_true", help="Print the results without appending to RESULTS.md.")
    args = parser.parse_args(argv)
    if args.budget_minutes <= 0 or args.num_evaluations < 1 or args.expected_steps_per_second <= 0:
        parser.error("--budget_minutes and --expected_steps_per_second must be > 0 and --num_evaluations >= 1.")
    return args


# --------------------------------------------------------------------------------------------------
# Training through scripts/train.py
# --------------------------------------------------------------------------------------------------
def train_command(args: argparse.Namespace, output_dir: Path, eval_steps: int) -> list[str]:
    command = [
        sys.executable,
        str(REPO_ROOT / "scripts" / "train.py"),
        "--config",
        args.config,
        "--dataset_name",
        args.data_dir,
        "--output_dir",
        str(output_dir),
        "--overwrite_output_dir",
        "--max_train_minutes",
        str(args.budget_minutes),
        "--eval_dataset_name",
        args.data_dir,
        "--eval_split",
        "test",
        "--eval_train_split",
        "train",
        "--eval_max_samples",
        str(args.eval_max_samples),
        "--eval_steps",
        str(eval_steps),
        "--checkpointing_steps",
        str(10**9),
        "--report_to",
        "none",
    ]
    return command + shlex.split(args.train_args)


def run_training(command: list[str], output_dir: Path, timeout_s: float) -> tuple[list[dict], float]:
    """Run scripts/train.py, time-stamping each new ``metrics.jsonl`` row as it appears.

    Returns the rows (each with ``seen_seconds``: seconds since the process started) and the wall time.
    """
    environment = dict(os.environ, OMP_WAIT_POLICY="PASSIVE", TOKENIZERS_PARALLELISM="false")
    metrics_path = output_dir / "metrics.jsonl"
    log_path = output_dir.parent / f"{output_dir.name}.log"
    output_dir.parent.mkdir(parents=True, exist_ok=True)
    print("$ " + shlex.join(command), flush=True)
    rows: list[dict] = []
    offset = 0
    started = time.monotonic()
    with log_path.open("w", encoding="utf-8") as log:
        process = subprocess.Popen(command, cwd=REPO_ROOT, env=environment, stdout=log, stderr=subprocess.STDOUT)

        def poll() -> None:
            nonlocal offset
            if not metrics_path.is_file():
                return
            with metrics_path.open(encoding="utf-8") as metrics:
                metrics.seek(offset)
                text = metrics.read()
            complete = text[: text.rfind("\n") + 1]
            offset += len(complete.encode("utf-8"))
            now = time.monotonic() - started
            for line in complete.splitlines():
                if line.strip():
                    row = json.loads(line)
                    row["seen_seconds"] = round(now, 1)
                    rows.append(row)
                    if any(key.startswith("knn_top1") for key in row):
                        print(
                            f"  step {row['step']}: {json.dumps({k: v for k, v in row.items() if k != 'step'})}",
                            flush=True,
                        )

        try:
            while process.poll() is None:
                time.sleep(1.0)
                poll()
                if time.monotonic() - started > timeout_s:
                    process.terminate()  # SIGTERM: train.py checkpoints and exits
                    process.wait(timeout=120)
                    raise RuntimeError(f"scripts/train.py ran past {timeout_s / 60:.0f} minutes; see {log_path}.")
        except BaseException:
            if process.poll() is None:
                process.kill()
            raise
        poll()
    wall = time.monotonic() - started
    if process.returncode != 0:
        tail = log_path.read_text(encoding="utf-8", errors="replace")[-3000:]
        raise RuntimeError(f"scripts/train.py exited with status {process.returncode}:\n{tail}")
    return rows, wall


# --------------------------------------------------------------------------------------------------
# Final scores
# --------------------------------------------------------------------------------------------------
def feature_scores(backbone, processor, data, k: int) -> dict[str, float]:
    """20-NN and linear-probe accuracy of a backbone's L2-normalised CLS features."""
    from dino_hf.eval.evaluation import extract_features, knn_accuracy, linear_probe_accuracy

    def batches(images, labels, batch_size: int = 500):
        for start in range(0, len(labels), batch_size):
            pixel_values = processor(images=images[start : start + batch_size], return_tensors="pt")["pixel_values"]
            yield pixel_values, labels[start : start + batch_size]

    (train_images, train_labels), (test_images, test_labels) = data
    train_features, train_labels = extract_features(backbone, batches(train_images, train_labels))
    test_features, test_labels = extract_features(backbone, batches(test_images, test_labels))
    return {
        "knn": knn_accuracy(train_features, train_labels, test_features, test_labels, k=(k,))[k],
        "linear": linear_probe_accuracy(train_features, train_labels, test_features, test_labels),
    }


def pixel_scores(data, k: int) -> dict[str, float]:
    import torch.nn.functional as F

    from dino_hf.eval.evaluation import knn_accuracy, linear_probe_accuracy

    (train_images, train_labels), (test_images, test_labels) = data

    def flat(images):
        return images[:, 0].flatten(1).float() / 255.0

    train_pixels, test_pixels = flat(train_images), flat(test_images)
    return {
        "knn": knn_accuracy(
            F.normalize(train_pixels, dim=-1), train_labels, F.normalize(test_pixels, dim=-1), test_labels, k=(k,)
        )[k],
        "linear": linear_probe_accuracy(train_pixels, train_labels, test_pixels, test_labels),
    }


def learning_curve(rows: list[dict], k: int) -> list[dict]:
    """``[{"step", "minutes", "knn"}]`` from the time-stamped evaluation rows (minutes since the start;
    ``elapsed_seconds`` of the training loop when the row carries it)."""
    key = f"knn_top1_k{k}"
    curve = []
    for row in rows:
        if key in row:
            seconds = row.get("elapsed_seconds", row["seen_seconds"])
            curve.append({"step": row["step"], "minutes": round(seconds / 60, 2), "knn": round(row[key], 4)})
    return curve


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    import torch
    from demo_summary import load_split
    from transformers import AutoImageProcessor, AutoModel

    work_dir = Path(args.output_dir)
    data_dir = Path(args.data_dir)
    if not Path(args.config).is_file():
        raise SystemExit(f"{BENCHMARK}: --config {args.config} does not exist.")
    if not any((data_dir / "data").glob("train-*.parquet")):
        subprocess.run(
            [sys.executable, str(REPO_ROOT / "scripts" / "prepare_fashion_mnist.py"), "--output_dir", str(data_dir)],
            check=True,
        )

    budget = args.budget_minutes * 60
    eval_steps = max(int(budget * args.expected_steps_per_second / args.num_evaluations), 1)
    run_dir = work_dir / "run"
    rows, wall = run_training(train_command(args, run_dir, eval_steps), run_dir, timeout_s=2 * budget + 15 * 60)
    train_rows = [row for row in rows if "loss" in row]
    recorded = json.loads((run_dir / "training_args.json").read_text())
    batch_size, max_steps = recorded["per_device_train_batch_size"], recorded["planned_total_steps"]

    print("final scores on the full test set...", flush=True)
    torch.set_num_threads(max(os.cpu_count() or 1, 1))
    data = (load_split(data_dir, "train"), load_split(data_dir, "test"))
    backbone = AutoModel.from_pretrained(run_dir / "backbone").eval()
    processor = AutoImageProcessor.from_pretrained(run_dir / "backbone")
    trained = feature_scores(backbone, processor, data, args.k)
    pixels = pixel_scores(data, args.k)
    torch.manual_seed(args.seed)
    random_backbone = AutoModel.from_config(backbone.config, add_pooling_layer=False).eval()
    random = feature_scores(random_backbone, processor, data, args.k)

    curve = learning_curve(rows, args.k)
    curve.append({"step": max_steps, "minutes": round(wall / 60, 2), "knn": round(trained["knn"], 4), "full": True})
    (work_dir / "learning_curve.json").write_text(json.dumps(curve, indent=2) + "\n", encoding="utf-8")
    config = backbone.config
    metrics = {
        "budget_minutes": args.budget_minutes,
        "train_minutes": round(wall / 60, 2),
        "steps": max_steps,
        "batch_size": batch_size,
        "epochs": round(max_steps * batch_size / len(data[0][1]), 2),
        "images_per_second": round(max_steps * batch_size / wall, 1),
        f"knn{args.k}_dino": trained["knn"],
        f"knn{args.k}_raw_pixels": pixels["knn"],
        f"knn{args.k}_random_weights": random["knn"],
        "linear_dino": trained["linear"],
        "linear_raw_pixels": pixels["linear"],
        "linear_random_weights": random["linear"],
        "beats_raw_pixels_knn": trained["knn"] > pixels["knn"],
        "final_loss": round(train_rows[-1]["loss"], 4) if train_rows else None,
    }
    curve_text = ", ".join(
        f"{point['minutes']:g} min/step {point['step']}: {point['knn']:.3f}{'' if point.get('full') else '*'}"
        for point in curve
    )
    notes = (
        f"ViT {config.num_hidden_layers}x{config.hidden_size}, patch {config.patch_size}, {config.image_size} px; "
        f"recipe {Path(args.config).name}{' + ' + args.train_args if args.train_args else ''}; "
        f"train.py --max_train_minutes {args.budget_minutes:g}: {max_steps} steps planned from its calibration "
        f"({recorded.get('calibrated_seconds_per_step', float('nan')):.3f} s/step), precision "
        f"{recorded.get('resolved_mixed_precision')}, {recorded.get('resolved_dataloader_num_workers')} loader "
        f"worker(s), {recorded.get('resolved_torch_num_threads')} compute thread(s). "
        f"20-NN/linear on all 60k train / 10k test; "
        f"raw pixels = flattened [0,1] intensities; random weights = same ViT, fresh init. "
        f"Learning curve (teacher {args.k}-NN; * = in-training on {args.eval_max_samples} train/"
        f"{args.eval_max_samples} test images, minutes incl. evaluations): {curve_text}"
    )
    publish(BENCHMARK, "benchmarks/quality_fashion_mnist.py", argv, metrics, notes, record=not args.no_record)
    return metrics


if __name__ == "__main__":
    main()

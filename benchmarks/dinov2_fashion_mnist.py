"""DINOv2's objective against DINO v1 on Fashion-MNIST, same CPU wall-clock budget, one invocation.

Trains two recipes from scratch through the real entry point, ``scripts/train.py``, one after the other,
each for ``--budget_minutes`` (default 9, the demo's budget: ``--max_train_minutes`` plans the steps
from a calibration so that every schedule completes in time):

- DINO v1: the demo recipe, ``scripts/configs/fashion_mnist_cpu.yaml``;
- DINOv2: ``scripts/configs/fashion_mnist_dinov2_cpu.yaml`` (the same ViT, crops and schedules, plus
  the iBOT masked-patch loss with its own head and KoLeo),

then scores each exported teacher backbone (``output_dir/backbone``, loaded with plain
``transformers.AutoModel``) on the full 10,000-image test set with the official DINO protocol (weighted
20-NN on L2-normalised CLS features, all 60,000 training images as the memory bank) and a linear probe,
next to raw pixels and the same ViT with random weights, and records one row in ``benchmarks/RESULTS.md`` (with the CPU model).

The machine may be shared: both runs share the invocation, so they see comparable load, but each
one's step count is what its calibration measured. Run it on a quiet machine for a fair comparison:

    .venv/bin/python benchmarks/dinov2_fashion_mnist.py                                  # 2 x 8 minutes
    .venv/bin/python benchmarks/dinov2_fashion_mnist.py --budget_minutes 1 --no_record   # smoke run
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))  # the helper modules in benchmarks/
sys.path.insert(0, str(REPO_ROOT / "scripts"))  # scripts/demo_summary.py (data loading)
from quality_fashion_mnist import feature_scores, pixel_scores, run_training  # noqa: E402
from recording import record_result  # noqa: E402

BENCHMARK = "dinov2_fashion_mnist"
RECIPES = {
    "dino": REPO_ROOT / "scripts" / "configs" / "fashion_mnist_cpu.yaml",
    "dinov2": REPO_ROOT / "scripts" / "configs" / "fashion_mnist_dinov2_cpu.yaml",
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    parser.add_argument("--budget_minutes", type=float, default=8.0,
                        help="Wall-clock budget of each training run (scripts/train.py --max_train_minutes).")
    parser.add_argument("--data_dir", default=str(REPO_ROOT / "data" / "fashion_mnist"),
                        help="Fashion-MNIST parquet (written by scripts/prepare_fashion_mnist.py when missing).")
    parser.add_argument("--output_dir", default=str(REPO_ROOT / "outputs" / BENCHMARK),
                        help="Work folder: one training output per recipe.")
    parser.add_argument("--train_args", default="", help="Extra scripts/train.py flags given to both runs.")
    parser.add_argument("--k", type=int, default=20, help="Neighbours of the headline k-NN figure.")
    parser.add_argument("--no_record", action="store_true", help="Print the results without appending to RESULTS.md.")
    args = parser.parse_args(argv)
    if args.budget_minutes <= 0:
        parser.error("--budget_minutes must be > 0.")
    return args


def train_command(args: argparse.Namespace, config: Path, output_dir: Path) -> list[str]:
    """scripts/train.py for one recipe: the budget, no in-training evaluation, no checkpoints."""
    command = [
        sys.executable, str(REPO_ROOT / "scripts" / "train.py"), "--config", str(config),
        "--dataset_name", args.data_dir, "--output_dir", str(output_dir), "--overwrite_output_dir",
        "--max_train_minutes", str(args.budget_minutes), "--eval_dataset_name", "",
        "--checkpointing_steps", str(10**9), "--report_to", "none",
    ]
    return command + shlex.split(args.train_args)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    import torch
    from demo_summary import load_split
    from transformers import AutoImageProcessor, AutoModel

    work_dir, data_dir = Path(args.output_dir), Path(args.data_dir)
    if not any((data_dir / "data").glob("train-*.parquet")):
        subprocess.run([sys.executable, str(REPO_ROOT / "scripts" / "prepare_fashion_mnist.py"), "--output_dir",
                        str(data_dir)], check=True)
    budget = args.budget_minutes * 60
    runs = {}
    for name, config in RECIPES.items():
        output_dir = work_dir / name
        rows, wall = run_training(train_command(args, config, output_dir), output_dir, timeout_s=2 * budget + 15 * 60)
        recorded = json.loads((output_dir / "training_args.json").read_text())
        runs[name] = {"rows": [row for row in rows if "loss" in row], "wall": wall, "recorded": recorded}

    print("final scores on the full test set...", flush=True)
    torch.set_num_threads(max(os.cpu_count() or 1, 1))
    data = (load_split(data_dir, "train"), load_split(data_dir, "test"))
    metrics: dict = {"budget_minutes": args.budget_minutes}
    for name, run in runs.items():
        folder = work_dir / name / "backbone"
        backbone = AutoModel.from_pretrained(folder).eval()
        scores = feature_scores(backbone, AutoImageProcessor.from_pretrained(folder), data, args.k)
        last = run["rows"][-1] if run["rows"] else {}
        metrics.update({
            f"knn{args.k}_{name}": scores["knn"],
            f"linear_{name}": scores["linear"],
            f"steps_{name}": run["recorded"]["planned_total_steps"],
            f"seconds_per_step_{name}": run["recorded"].get("calibrated_seconds_per_step"),
            f"train_minutes_{name}": round(run["wall"] / 60, 2),
            f"final_loss_{name}": round(last["loss"], 4) if "loss" in last else None,
        })
        for term in ("dino_loss", "ibot_loss", "koleo_loss"):
            if term in last and last[term] is not None:
                metrics[f"final_{term}_{name}"] = round(last[term], 4)
    pixels = pixel_scores(data, args.k)
    metrics[f"knn{args.k}_raw_pixels"] = pixels["knn"]
    metrics["linear_raw_pixels"] = pixels["linear"]
    torch.manual_seed(0)  # the architecture both recipes train, freshly initialised
    random_backbone = AutoModel.from_config(backbone.config, add_pooling_layer=False).eval()
    random = feature_scores(random_backbone, AutoImageProcessor.from_pretrained(folder), data, args.k)
    metrics[f"knn{args.k}_random_weights"] = random["knn"]
    metrics["linear_random_weights"] = random["linear"]
    metrics["dinov2_minus_dino_knn"] = round(metrics[f"knn{args.k}_dinov2"] - metrics[f"knn{args.k}_dino"], 4)

    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    recorded = runs["dinov2"]["recorded"]
    notes = (
        f"Both recipes in one invocation, one after the other (DINO first), each scripts/train.py "
        f"--max_train_minutes {args.budget_minutes:g} (steps planned from its own calibration); precision "
        f"{recorded.get('resolved_mixed_precision')}, {recorded.get('resolved_dataloader_num_workers')} loader worker(s), "
        f"{recorded.get('resolved_torch_num_threads')} compute thread(s); 1-minute load average at the end {load:.1f} "
        f"on {os.cpu_count()} cores. DINO = {RECIPES['dino'].name}, DINOv2 = {RECIPES['dinov2'].name}"
        f"{' + ' + args.train_args if args.train_args else ''}. 20-NN/linear of the exported teacher on all 60k train / "
        "10k test images; raw pixels = flattened [0,1] intensities; random weights = the same ViT, fresh init."
    )
    command = "python benchmarks/dinov2_fashion_mnist.py " + " ".join(argv if argv is not None else sys.argv[1:])
    if args.no_record:
        print(json.dumps({"benchmark": BENCHMARK, **metrics, "notes": notes}))
    else:
        record_result(BENCHMARK, command.strip(), metrics, notes)
    return metrics


if __name__ == "__main__":
    main()

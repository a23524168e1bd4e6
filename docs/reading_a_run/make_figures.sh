#!/usr/bin/env bash
# The runs behind README "Reading a run": the demo recipe for 600 steps on Fashion-MNIST (2 CPU cores,
# a few minutes each), healthy and with one setting broken per failure, then their curves.
#   bash docs/reading_a_run/make_figures.sh        (needs data/fashion_mnist: make demo prepares it)
set -euo pipefail
cd "$(dirname "$0")/../.."
PYTHON=${PYTHON:-.venv/bin/python}
OUT=${OUT:-outputs/reading_a_run}
COMMON=(--config fashion_mnist_cpu --dataset_name data/fashion_mnist --eval_dataset_name data/fashion_mnist
        --max_steps 600 --warmup_steps 60 --logging_steps 10 --eval_steps 200 --eval_max_samples 2000
        --checkpointing_steps 100000 --collapse_warning_steps 200 --dataloader_num_workers 1 --overwrite_output_dir)
declare -A RUNS=(
  [healthy]=""
  [uniform_collapse]="--teacher_temperature 0.1 --warmup_teacher_temperature 0.1"
  [one_hot_collapse]="--center_momentum 1.0"
  [explosion]="--base_learning_rate 0.5 --max_grad_norm 0 --warmup_steps 0 --max_consecutive_nonfinite_steps 100"
  [no_learning]="--base_learning_rate 1e-6"
)
mkdir -p "$OUT"
for name in healthy uniform_collapse one_hot_collapse explosion no_learning; do
  # shellcheck disable=SC2086
  $PYTHON scripts/train.py "${COMMON[@]}" --output_dir "$OUT/$name" ${RUNS[$name]} > "$OUT.$name.log" 2>&1 || true
  # shellcheck disable=SC2086
  $PYTHON - "$OUT/$name" "$name" ${RUNS[$name]} <<'PY'
import json, sys
from pathlib import Path
from dino_hf.visualization import plot_training_curves
run, name = Path(sys.argv[1]), sys.argv[2]
K = json.loads((run / "training_args.json").read_text()).get("config_overrides", "")
K = int(K.split("num_prototypes=")[1].split(",")[0])
plot_training_curves(run / "metrics.jsonl", Path("docs/reading_a_run") / f"{name}.png", num_prototypes=K,
                     title=" ".join([name.replace("_", " ") + (":" if sys.argv[3:] else ""), *sys.argv[3:]]))
from PIL import Image  # a palette PNG: a third of the size, for the repository
png = Path("docs/reading_a_run") / f"{name}.png"
Image.open(png).convert("RGB").quantize(64).save(png, optimize=True)
PY
done

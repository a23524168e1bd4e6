#!/usr/bin/env bash
# One prepared GPU check (issue 7): GPU-marked tests, the batched-augmentation benchmark, the
# DINO step benchmark for ViT-S/16 (2x224 + 10x96 crops, batch 64, bf16) with and without
# on-device augmentation and --torch_compile, and scripts/train.py end to end on generated JPEGs
# with the multi-crop in the loader workers versus on the GPU (--augmentation_device cuda; target
# 2,000 source images/s with a data-wait fraction under 5%). Every step has its own time limit;
# the limits add up to 8 minutes. Results go under $OUT (a new temporary folder when unset):
#   $OUT/summary.json              exit status and seconds of every step, the GPU's name
#   $OUT/<step>.log                each step's output
#   $OUT/<step>.json               each benchmark's metrics
#   $OUT/RESULTS.md                the benchmark rows (copy them into benchmarks/RESULTS.md)
#
# Usage:
#   benchmarks/gpu_check.sh          # GPU path (falls back to the CPU path without CUDA)
#   benchmarks/gpu_check.sh --cpu    # CPU path: tiny preset, a few seconds per step
# Environment: PYTHON (default .venv/bin/python, else python), OUT, RESULTS_FILE (default $OUT/RESULTS.md).
set -u -o pipefail

cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-.venv/bin/python}
if [ ! -x "$PYTHON" ]; then PYTHON=python; fi
OUT=${OUT:-$(mktemp -d -t dino_gpu_check.XXXXXX)}
mkdir -p "$OUT"
RESULTS_FILE=${RESULTS_FILE:-$OUT/RESULTS.md}

mode=gpu
if [ "${1:-}" = "--cpu" ]; then
    mode=cpu
elif ! "$PYTHON" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
    echo "gpu_check: no CUDA device visible, running the CPU path" >&2
    mode=cpu
fi

declare -a summary=()
failures=0

# run_step NAME LIMIT_SECONDS COMMAND...: run with a time limit, log to $OUT/NAME.log, remember the status.
run_step() {
    local name=$1 limit=$2
    shift 2
    local start end status
    start=$(date +%s%N)
    echo "== $name (limit ${limit}s): $*" | tee "$OUT/$name.log"
    timeout --kill-after=10 "$limit" "$@" >>"$OUT/$name.log" 2>&1
    status=$?
    end=$(date +%s%N)
    tail -n 1 "$OUT/$name.log"
    if [ "$status" -ne 0 ]; then failures=$((failures + 1)); fi
    local milliseconds=$(((end - start) / 1000000))
    summary+=("\"$name\": {\"exit_status\": $status, \"seconds\": $((milliseconds / 1000)).$(printf %03d $((milliseconds % 1000)))}")
}

if [ "$mode" = gpu ]; then
    nvidia-smi >"$OUT/nvidia-smi.txt" 2>&1 || true
    vit_s=(--preset vit_small_patch16 --batch_size 64 --num_local_crops 10 --global_crop_size 224
           --local_crop_size 96 --mixed_precision bf16 --device cuda --results_file "$RESULTS_FILE")
    run_step pytest_gpu 60 "$PYTHON" -m pytest -m gpu -q -p no:cacheprovider tests
    run_step bench_batched_augmentation 60 "$PYTHON" benchmarks/bench_batched_augmentation.py \
        --device cuda --batch_size 64 --num_local_crops 10 --image_size 256 --repeats 5 \
        --results_file "$RESULTS_FILE" --json_output "$OUT/bench_batched_augmentation.json"
    # reference vs ours vs ours + on-device augmentation vs ours + activation checkpointing, with memory
    run_step bench_train_step_vit_s_bf16 90 "$PYTHON" benchmarks/bench_train_step.py "${vit_s[@]}" \
        --device_augmentation --gradient_checkpointing --repeats 5 --steps_per_repeat 3 \
        --json_output "$OUT/bench_train_step_vit_s_bf16.json"
    # + torch.compile of both backbones (compile time reported), with on-device augmentation
    run_step bench_train_step_vit_s_bf16_compile 130 "$PYTHON" benchmarks/bench_train_step.py "${vit_s[@]}" \
        --torch_compile --device_augmentation --skip_memory --repeats 5 --steps_per_repeat 3 \
        --json_output "$OUT/bench_train_step_vit_s_bf16_compile.json"
    # scripts/train.py end to end, ViT-S/16 recipe, 3,072 generated 320 px JPEGs (written once, by the
    # first of the two steps, into its time), all CPU cores but two as loader workers
    workers=$(($(nproc) > 2 ? $(nproc) - 2 : 1))
    end_to_end=(--config scripts/configs/vit_small_patch16_100ep.yaml --synthetic_images 3072
                --synthetic_dir "$OUT/synthetic_jpegs" --max_steps 40 --logging_steps 10 --threads 2
                --results_file "$RESULTS_FILE" --)
    train_flags=(--per_device_train_batch_size 64 --num_local_crops 10 --mixed_precision bf16
                 --dataloader_num_workers "$workers")
    run_step bench_end_to_end_vit_s_loader 80 "$PYTHON" benchmarks/bench_end_to_end.py \
        --json_output "$OUT/bench_end_to_end_vit_s_loader.json" "${end_to_end[@]}" "${train_flags[@]}" \
        --augmentation_device loader
    run_step bench_end_to_end_vit_s_cuda_augmentation 60 "$PYTHON" benchmarks/bench_end_to_end.py \
        --json_output "$OUT/bench_end_to_end_vit_s_cuda_augmentation.json" "${end_to_end[@]}" "${train_flags[@]}" \
        --augmentation_device cuda
else
    tiny=(--preset vit_tiny_patch16 --config_overrides num_hidden_layers=2,head_hidden_size=64 --global_crop_size 32 --local_crop_size 16 --num_local_crops 2
          --device cpu --threads 1 --results_file "$RESULTS_FILE")
    echo "== pytest_gpu: skipped (CPU path)" | tee "$OUT/pytest_gpu.log"
    run_step bench_batched_augmentation 120 "$PYTHON" benchmarks/bench_batched_augmentation.py \
        --device cpu --threads 1 --batch_size 4 --image_size 40 --global_crop_size 32 --local_crop_size 16 \
        --num_local_crops 2 --repeats 1 --results_file "$RESULTS_FILE" \
        --json_output "$OUT/bench_batched_augmentation.json"
    run_step bench_train_step_tiny 180 "$PYTHON" benchmarks/bench_train_step.py "${tiny[@]}" \
        --num_prototypes 64 --batch_size 2 --augmentation_image_size 40 --device_augmentation --skip_memory \
        --repeats 1 --steps_per_repeat 1 --json_output "$OUT/bench_train_step_tiny.json"
    run_step bench_end_to_end_tiny_cpu_augmentation 180 "$PYTHON" benchmarks/bench_end_to_end.py \
        --config scripts/configs/fashion_mnist_cpu.yaml --synthetic_images 64 --synthetic_image_size 40 \
        --max_steps 6 --logging_steps 2 --results_file "$RESULTS_FILE" \
        --json_output "$OUT/bench_end_to_end_tiny_cpu_augmentation.json" -- \
        --per_device_train_batch_size 8 --dataloader_num_workers 0 --global_crop_size 28 --local_crop_size 14 \
        --augmentation_device cpu --mixed_precision no --config_overrides \
        backbone_config.patch_size=14,backbone_config.hidden_size=32,backbone_config.num_hidden_layers=1,backbone_config.num_attention_heads=2,backbone_config.intermediate_size=64,num_prototypes=32,head_hidden_size=32,head_bottleneck_size=16
fi

device_name=cpu
if [ "$mode" = gpu ]; then
    device_name=$("$PYTHON" -c "import torch; print(torch.cuda.get_device_name(0))" 2>/dev/null || echo unknown)
fi
{
    echo "{"
    echo "  \"mode\": \"$mode\", \"device\": \"$device_name\", \"failures\": $failures,"
    echo "  \"steps\": {"
    for index in "${!summary[@]}"; do
        separator=","
        if [ "$index" -eq $((${#summary[@]} - 1)) ]; then separator=""; fi
        echo "    ${summary[$index]}$separator"
    done
    echo "  }"
    echo "}"
} >"$OUT/summary.json"
echo "gpu_check ($mode): $failures failed step(s); results in $OUT"
exit $((failures > 0))

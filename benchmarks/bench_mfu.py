"""Model FLOPs utilisation (MFU) of one full DINO optimiser step, against this machine's GEMM peak.

The step is the library's own (`dino_hf.train.step.DinoTrainStep`, built as the training loop builds
it: `builders.build_model` from ``--model_config``, `prepare_model_and_optimizer` with its fused
AdamW over the model's parameter groups, an `Accelerator`): teacher forward on the global crops,
student forward on all crops, DINO loss, backward, per-parameter gradient clipping (3.0), AdamW,
teacher EMA and center update. The crops are pre-made random tensors, so only the step is measured.

- **FLOPs** of one step are counted with ``torch.utils.flop_counter.FlopCounterMode`` (matrix
  products, convolutions and attention, forward and backward; elementwise work is not counted, as
  usual for MFU), in a step of their own, not timed. The CPU kernel of SDPA
  (``_scaled_dot_product_flash_attention_for_cpu`` and its backward) has no formula in torch, so
  it is given the one torch uses for the GPU kernels.
- **Time**: the median of ``--steps`` timed steps, after ``--warmup_steps`` untimed ones.
- **Peak**: the median of a few ``--peak_size`` square GEMMs in the step's dtype (fp32, or bf16 /
  fp16 under mixed precision) with the same thread count, measured in the same run.
- **MFU** = step FLOPs / step seconds / peak FLOP/s.
- ``--profile``: one more step under ``torch.profiler``; every op's self CPU time (device time on a
  GPU) is put in one category: the attention kernel (QK^T, softmax, AV or SDPA, forward and
  backward), the prototype head's last layer, layer norms, other matrix products (the linear layers
  and the patch embedding), the DINO loss, gradient clipping, AdamW, the EMA teacher update, and
  the rest. Forward ops are placed by the module that ran them (hooks on the modules), backward
  ops by the forward op that recorded their autograd node, so where MFU is short the table says
  which ops hold it back.

The human-readable table comes first; the LAST line of stdout is one JSON object (``mfu``,
``step_flops``, ``achieved_flops_per_s``, ``peak_flops_per_s``, the CPU, torch version, threads,
dtype...). ``--record`` also appends a row to ``benchmarks/RESULTS.md`` (``--results_file``).

    .venv/bin/python benchmarks/bench_mfu.py --model_config vit_small_patch16 --per_device_train_batch_size 16 \\
        --mixed_precision no --steps 3 --profile --record
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource

os.environ.setdefault("KINETO_LOG_LEVEL", "5")  # before torch: no kineto "gpuGetDeviceCount failed" on a CPU
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the helper modules in benchmarks/
from recording import describe_versions, record_result

from dino_hf.models.configuration_dino import DinoConfig
from dino_hf.models.modeling_dino import WeightNormalizedLinear
from dino_hf.train.hardware import choose_mixed_precision, describe_cpu
from dino_hf.train.schedules import ScheduleValues
from dino_hf.train.step import DinoTrainStep

BENCHMARK = "bench_mfu"
#: The schedule values of the measured steps: the official ones past the warm-ups (the last layer
#: is trained, so its update is part of the step).
STEP_VALUES = ScheduleValues(learning_rate=5e-4 * 16 / 256, weight_decay=0.04, teacher_momentum=0.996,
                             teacher_temperature=0.04, freeze_last_layer=False)
#: Profile categories, in the order they are printed.
CATEGORIES = {
    "attention": "attention kernel: QK^T, softmax, AV (SDPA or eager), its reshapes, forward and backward",
    "last_layer": "the prototype head's last layer (weight-normalised, K outputs), forward and backward",
    "layer_norm": "layer norms, forward and backward",
    "other_matmuls": "other matrix products (with their bias adds and sums): q/k/v/out projections, MLPs, head MLP, "
                     "patch embedding",
    "dino_loss": "DINO loss and center update (softmax / log-softmax over K, cross-entropy)",
    "clipping": "gradient norms and per-parameter clipping",
    "optimizer": "AdamW step and zero_grad",
    "ema": "EMA teacher update",
    "other": "the rest: GELU, residual adds, copies, gradient accumulation, normalise...",
}


# --------------------------------------------------------------------------------------------------
# Set-up: the training loop's own model, optimiser and step
# --------------------------------------------------------------------------------------------------
def training_arguments(args: argparse.Namespace, output_dir: str):
    """The `DinoTrainingArguments` that make `build_model` / `prepare_model_and_optimizer` build what a
    run with these flags trains (the dataset is never read)."""
    from dino_hf.train.arguments import DinoTrainingArguments

    values: dict[str, Any] = dict(
        dataset_name="unused", output_dir=output_dir, model_config=args.model_config,
        per_device_train_batch_size=args.per_device_train_batch_size, mixed_precision=args.mixed_precision,
        global_crop_size=args.global_crop_size, local_crop_size=args.local_crop_size,
        num_local_crops=args.num_local_crops, max_steps=1,
    )  # fmt: skip
    if args.config_overrides:
        values["config_overrides"] = args.config_overrides
    if args.num_prototypes is not None:
        values["num_prototypes"] = args.num_prototypes
    return DinoTrainingArguments(**values)


def build_step(args: argparse.Namespace) -> tuple[DinoTrainStep, Any]:
    """The prepared model, optimiser and `DinoTrainStep` of a run with these flags, and the accelerator."""
    from accelerate import Accelerator

    from dino_hf.train.builders import build_model, prepare_model_and_optimizer

    accelerator = Accelerator(cpu=args.device == "cpu", mixed_precision=args.mixed_precision)
    with tempfile.TemporaryDirectory() as output_dir:
        training = training_arguments(args, output_dir)
        torch.manual_seed(0)
        model = build_model(training)
        model, optimizer = prepare_model_and_optimizer(training, accelerator, model)
    step = DinoTrainStep(accelerator, model, optimizer, 1, training.max_grad_norm, training.clip_mode)
    return step, accelerator


def make_batch(args: argparse.Namespace, device: torch.device) -> dict[str, torch.Tensor | None]:
    """Random crop-major crops: ``(G, B, 3, S, S)`` global and ``(L, B, 3, s, s)`` local ones."""
    generator = torch.Generator().manual_seed(1)
    batch = args.per_device_train_batch_size
    global_crops = torch.randn(args.num_global_crops, batch, 3, args.global_crop_size, args.global_crop_size,
                               generator=generator)
    local_crops = None
    if args.num_local_crops > 0:
        local_crops = torch.randn(args.num_local_crops, batch, 3, args.local_crop_size, args.local_crop_size,
                                  generator=generator).to(device)
    return {"global_crops": global_crops.to(device), "local_crops": local_crops, "masks": None}


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# --------------------------------------------------------------------------------------------------
# FLOPs, time, peak
# --------------------------------------------------------------------------------------------------
def _cpu_sdpa_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    return sdpa_flop_count(query_shape, key_shape, value_shape)


def _cpu_sdpa_backward_flops(grad_out_shape, query_shape, key_shape, value_shape, *args, out_shape=None,
                             **kwargs) -> int:
    return sdpa_backward_flop_count(grad_out_shape, query_shape, key_shape, value_shape)


#: FLOP formulas torch lacks: its CPU SDPA kernel counts as its GPU ones do.
CUSTOM_FLOP_FORMULAS = {
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _cpu_sdpa_flops,
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward: _cpu_sdpa_backward_flops,
}


def count_step_flops(run_step: Callable[[], None]) -> tuple[int, dict[str, int], int]:
    """FLOPs of one step: total, by op, and those of the heads' last layers (student and teacher)."""
    counter = FlopCounterMode(display=False, custom_mapping=CUSTOM_FLOP_FORMULAS)
    with counter:
        run_step()
    counts = counter.get_flop_counts()
    by_op = {str(op).removeprefix("aten."): int(count) for op, count in counts.get("Global", {}).items()}
    last_layer = sum(sum(module_counts.values()) for module, module_counts in counts.items()
                     if module.endswith(".last_layer"))
    return int(counter.get_total_flops()), by_op, int(last_layer)


def time_steps(run_step: Callable[[], None], steps: int, device: torch.device) -> dict[str, list[float]]:
    """Per step of ``steps``: wall seconds, and the process's system seconds and minor page faults
    (``getrusage``: a step that spends its time in the kernel, e.g. faulting in freshly mapped
    activations, shows there rather than in any op)."""
    measured: dict[str, list[float]] = {"seconds": [], "system_seconds": [], "page_faults": []}
    for _ in range(steps):
        _synchronize(device)
        before, start = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
        run_step()
        _synchronize(device)
        measured["seconds"].append(time.perf_counter() - start)
        after = resource.getrusage(resource.RUSAGE_SELF)
        measured["system_seconds"].append(after.ru_stime - before.ru_stime)
        measured["page_faults"].append(float(after.ru_minflt - before.ru_minflt))
    return measured


def measure_peak_flops(dtype: torch.dtype, size: int, repeats: int, device: torch.device) -> float:
    """Dense GEMM FLOP/s: median of ``repeats`` ``size x size`` products in ``dtype`` (after one untimed)."""
    generator = torch.Generator().manual_seed(3)
    left = torch.randn(size, size, generator=generator).to(device=device, dtype=dtype)
    right = torch.randn(size, size, generator=generator).to(device=device, dtype=dtype)
    output = torch.empty(size, size, device=device, dtype=dtype)
    torch.mm(left, right, out=output)
    seconds = []
    for _ in range(repeats):
        _synchronize(device)
        start = time.perf_counter()
        torch.mm(left, right, out=output)
        _synchronize(device)
        seconds.append(time.perf_counter() - start)
    return 2.0 * size**3 / statistics.median(seconds)


# --------------------------------------------------------------------------------------------------
# Profile: self time per category
# --------------------------------------------------------------------------------------------------
SCOPE_PREFIX = "dino_hf_bench::"


def _scope_of_module(module: nn.Module) -> str | None:
    if isinstance(module, WeightNormalizedLinear):
        return "last_layer"
    if isinstance(module, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)):
        return "other_matmuls"
    if isinstance(module, nn.LayerNorm):
        return "layer_norm"
    name = type(module).__name__
    if name.endswith("Attention"):
        return "attention"
    if name.endswith("Loss"):
        return "dino_loss"
    return None


@contextlib.contextmanager
def profiling_scopes(step: DinoTrainStep) -> Iterator[None]:
    """``record_function`` ranges around the modules' forwards and the step's phases (clipping, AdamW,
    EMA, center update), removed afterwards."""
    handles = []
    open_ranges: dict[int, list[Any]] = defaultdict(list)

    def enter(scope: str) -> Callable[..., None]:
        def hook(module: nn.Module, *_: Any) -> None:
            ranges = torch.autograd.profiler.record_function(SCOPE_PREFIX + scope)
            ranges.__enter__()
            open_ranges[id(module)].append(ranges)
        return hook

    def leave(module: nn.Module, *_: Any) -> None:
        if open_ranges[id(module)]:
            open_ranges[id(module)].pop().__exit__(None, None, None)

    for module in step.unwrapped.modules():
        scope = _scope_of_module(module)
        if scope is not None:
            handles.append(module.register_forward_pre_hook(enter(scope)))
            handles.append(module.register_forward_hook(leave))

    def labelled(scope: str, function: Callable[..., Any]) -> Callable[..., Any]:
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            with torch.autograd.profiler.record_function(SCOPE_PREFIX + scope):
                return function(*args, **kwargs)
        return wrapper

    patched = [(step, "_prepare_gradients", "clipping"), (step, "_optimizer_step", "optimizer"),
               (step, "_update_centers", "dino_loss"), (step.unwrapped, "update_teacher", "ema")]
    for owner, name, scope in patched:
        setattr(owner, name, labelled(scope, getattr(owner, name)))
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()
        for owner, name, _ in patched:
            delattr(owner, name)  # the instance attribute: the class's method shows again


def _category_from_name(name: str) -> str:
    """An op's category from its own name, where no module or phase scope says it."""
    lowered = name.lower()
    if "scaled_dot_product" in lowered or "scaleddotproduct" in lowered:
        return "attention"
    # Eager attention outside any attention module (the ViT fast path computes it in functions): its
    # batched products and softmax; the linear layers use mm/addmm and the loss's softmax has a scope.
    if "bmm" in lowered or "softmax" in lowered:
        return "attention"
    if "layer_norm" in lowered or "layernorm" in lowered:
        return "layer_norm"
    if "_foreach_lerp" in lowered:
        return "ema"
    if "adamw" in lowered:
        return "optimizer"
    matmuls = ("aten::mm", "aten::addmm", "aten::matmul", "aten::linear", "convolution", "mmbackward",
               "addmmbackward")
    if any(lowered.startswith(prefix) or prefix in lowered for prefix in matmuls):
        return "other_matmuls"
    return "other"


def categorise_events(events: list[Any], time_attribute: str) -> dict[str, dict[str, float]]:
    """Self time (µs) per category and op name.

    A forward op takes the category of the innermost scope around it (:func:`profiling_scopes`); a
    backward op that of the forward op which recorded its autograd node (the same ``sequence_nr``
    and thread: how torch itself gives backward ops their forward stack); anything else, its name's.
    """
    backward_prefix = "autograd::engine::evaluate_function:"

    def ancestors(event: Any) -> Iterator[Any]:
        while event is not None:
            yield event
            event = event.cpu_parent

    def backward_node(event: Any) -> Any:
        return next((parent for parent in ancestors(event) if parent.name.startswith(backward_prefix)), None)

    def scope(event: Any) -> str | None:
        return next((parent.name[len(SCOPE_PREFIX):] for parent in ancestors(event)
                     if parent.name.startswith(SCOPE_PREFIX)), None)

    forward_scopes: dict[tuple[int, int], str | None] = {}
    for event in events:
        if event.sequence_nr >= 0 and backward_node(event) is None:
            forward_scopes.setdefault((event.sequence_nr, event.thread), scope(event))
    table: dict[str, dict[str, float]] = {name: defaultdict(float) for name in CATEGORIES}
    for event in events:
        self_time = float(getattr(event, time_attribute, 0.0) or 0.0)
        if self_time <= 0 or event.name.startswith(SCOPE_PREFIX):
            continue
        node = backward_node(event)
        if node is None:
            category = scope(event)
        else:
            category = forward_scopes.get((node.sequence_nr, node.fwd_thread))
            category = category or scope(event)  # a phase (clipping...) that runs a backward: none here
        if category is None or (category == "attention" and _category_from_name(event.name) == "layer_norm"):
            category = _category_from_name(event.name if node is None else f"{node.name} {event.name}")
        table[category][event.name] += self_time
    return table


def profile_step(
    step: DinoTrainStep, run_step: Callable[[], None], device: torch.device
) -> tuple[dict[str, dict[str, float]], float]:
    """One step under ``torch.profiler``: self time (µs) per category and op (:func:`categorise_events`),
    and the step's wall seconds."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profiling_scopes(step), profile(activities=activities) as profiler:
        start = time.perf_counter()
        run_step()
        _synchronize(device)
        wall = time.perf_counter() - start
    time_attribute = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    return categorise_events(list(profiler.events()), time_attribute), wall


def format_profile(table: dict[str, dict[str, float]], top_ops: int = 3) -> list[str]:
    """Lines of the category table, largest first, each with its heaviest ops."""
    total = sum(sum(ops.values()) for ops in table.values()) or 1.0
    lines = [f"{'category':<15} {'self ms':>10} {'share':>7}  top ops (self ms)"]
    for name in sorted(table, key=lambda key: -sum(table[key].values())):
        ops = table[name]
        spent = sum(ops.values())
        if spent <= 0:
            continue
        ranked = sorted(ops.items(), key=lambda item: -item[1])[:top_ops]
        heaviest = ", ".join(f"{op} {micros / 1e3:.1f}" for op, micros in ranked)
        lines.append(f"{name:<15} {spent / 1e3:>10.1f} {spent / total:>7.1%}  {heaviest}")
    lines.append("categories: " + "; ".join(f"{name} = {text}" for name, text in CATEGORIES.items()))
    return lines


# --------------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------------
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model_config", default="vit_small_patch16", choices=DinoConfig.preset_names(),
                        help="DinoConfig preset (its K unless --num_prototypes).")
    parser.add_argument("--num_prototypes", type=int, default=None,
                        help="K; default: the preset's (65536 for the ViTs).")
    parser.add_argument("--config_overrides", default="",
                        help="As the training flag, e.g. 'backbone_config.num_hidden_layers=2,head_hidden_size=64'.")
    parser.add_argument("--per_device_train_batch_size", type=int, default=16, help="Source images per step.")
    parser.add_argument("--mixed_precision", choices=("auto", "no", "bf16", "fp16"), default="auto",
                        help="As the training flag (auto: bf16 only where this CPU runs it faster than fp32).")
    parser.add_argument("--num_global_crops", type=int, default=2)
    parser.add_argument("--global_crop_size", type=int, default=224)
    parser.add_argument("--num_local_crops", type=int, default=10)
    parser.add_argument("--local_crop_size", type=int, default=96)
    parser.add_argument("--steps", type=int, default=3, help="Timed steps (median reported).")
    parser.add_argument("--warmup_steps", type=int, default=1, help="Untimed steps before the counted and timed ones.")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's).")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--peak_size", type=int, default=4096, help="Side of the square GEMM that measures the peak.")
    parser.add_argument("--peak_repeats", type=int, default=3, help="Timed GEMMs of the peak (median).")
    parser.add_argument("--profile", action="store_true", help="Also profile one step and print its time by category.")
    parser.add_argument("--record", action="store_true",
                        help="Append a row to benchmarks/RESULTS.md (or --results_file).")
    parser.add_argument("--results_file", type=Path, default=None, help="Table --record appends to.")
    args = parser.parse_args(argv)
    for name in ("per_device_train_batch_size", "num_global_crops", "steps", "peak_size", "peak_repeats"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be at least 1.")
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is visible.")
    if args.mixed_precision == "fp16" and device.type == "cpu":
        raise SystemExit("--mixed_precision fp16 needs a CUDA device (fp16 autocast on the CPU is a no-op); use bf16.")
    cuda_bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
    args.mixed_precision = choose_mixed_precision(args.mixed_precision, device.type, cuda_bf16).mixed_precision
    dtype = {"no": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[args.mixed_precision]

    step, accelerator = build_step(args)
    batch = make_batch(args, accelerator.device)

    def run_step() -> None:
        step(lambda: batch, STEP_VALUES)

    for _ in range(args.warmup_steps):
        run_step()
    step_flops, flops_by_op, last_layer_flops = count_step_flops(run_step)
    measured = time_steps(run_step, args.steps, accelerator.device)
    seconds = measured["seconds"]
    peak = measure_peak_flops(dtype, args.peak_size, args.peak_repeats, accelerator.device)
    median = statistics.median(seconds)
    achieved = step_flops / median
    config = step.unwrapped.config
    cpu = describe_cpu().describe()
    metrics: dict[str, Any] = {
        "model_config": args.model_config,
        "num_prototypes": config.num_prototypes,
        "batch_size": args.per_device_train_batch_size,
        "crops": f"{args.num_global_crops}x{args.global_crop_size}+{args.num_local_crops}x{args.local_crop_size}",
        "device": str(accelerator.device),
        "dtype": str(dtype).removeprefix("torch."),
        "mixed_precision": args.mixed_precision,
        "threads": torch.get_num_threads(),
        "cpu": cpu,
        **({"gpu": torch.cuda.get_device_name(accelerator.device)} if device.type == "cuda" else {}),
        "torch": torch.__version__,
        "step_flops": step_flops,
        "last_layer_flop_share": last_layer_flops / step_flops if step_flops else 0.0,
        "attention_flop_share": sum(count for op, count in flops_by_op.items()
                                    if "scaled_dot_product" in op or "bmm" in op) / max(step_flops, 1),
        "step_seconds_median": median,
        "system_seconds_per_step": statistics.median(measured["system_seconds"]),
        "page_faults_per_step": statistics.median(measured["page_faults"]),
        "achieved_flops_per_s": achieved,
        "peak_flops_per_s": peak,
        "peak_gemm": f"{args.peak_size}x{args.peak_size} {str(dtype).removeprefix('torch.')}",
        "mfu": achieved / peak,
        "load_average_1min": os.getloadavg()[0],  # other work on a shared machine skews timings
    }
    lines = [
        f"{BENCHMARK}: {args.model_config} (K {config.num_prototypes}), batch {args.per_device_train_batch_size}, "
        f"crops {metrics['crops']}, {metrics['dtype']}, {metrics['threads']} threads",
        f"  machine       {cpu}{'; GPU ' + metrics['gpu'] if 'gpu' in metrics else ''}; torch {torch.__version__}",
        f"  step FLOPs    {step_flops / 1e9:,.1f} GFLOP ("
        + ", ".join(f"{op} {count / step_flops:.0%}" for op, count in sorted(flops_by_op.items(), key=lambda x: -x[1]))
        + f"; last layer {metrics['last_layer_flop_share']:.0%})",
        f"  step time     {median:.3f} s (median of {len(seconds)}: {', '.join(f'{value:.3f}' for value in seconds)}; "
        f"{metrics['system_seconds_per_step']:.2f} s in the kernel, "
        f"{metrics['page_faults_per_step']:,.0f} page faults)",
        f"  achieved      {achieved / 1e9:,.1f} GFLOP/s",
        f"  peak          {peak / 1e9:,.1f} GFLOP/s ({metrics['peak_gemm']} GEMM, median of {args.peak_repeats})",
        f"  MFU           {metrics['mfu']:.1%}",
    ]
    print("\n".join(lines), flush=True)
    if args.profile:
        table, wall = profile_step(step, run_step, accelerator.device)
        total = sum(sum(ops.values()) for ops in table.values()) or 1.0
        title = (f"profile of one step ({wall:.3f} s under the profiler, {total / 1e6:.3f} s of it in ops): "
                 "self time by category")
        print("\n".join(["", title, *format_profile(table)]), flush=True)
        metrics["profiled_step_seconds"] = wall
        metrics["profiled_self_seconds"] = total / 1e6
        metrics.update({f"profile_share_{name}": round(sum(ops.values()) / total, 4) for name, ops in table.items()})
    notes = ("FLOPs: FlopCounterMode over one DinoTrainStep (matmuls, convolutions, attention; CPU SDPA given "
             "torch's GPU formula); time: median of the timed steps; peak: square GEMM in the step's dtype and "
             f"threads; {describe_versions()}")
    if args.record:
        command = f"python benchmarks/{BENCHMARK}.py " + " ".join(argv if argv is not None else sys.argv[1:])
        record_result(BENCHMARK, command.strip(), metrics, notes=notes, results_path=args.results_file)
    else:
        print(json.dumps({"benchmark": BENCHMARK, **metrics}), flush=True)
    return metrics


if __name__ == "__main__":
    main()

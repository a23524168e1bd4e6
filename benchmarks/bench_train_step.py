"""One full DINO optimiser step: dino_hf against the official code's step, same weights, same crops.

A step is: teacher forward on the global crops, student forward on all crops, DINO loss, backward,
per-parameter gradient clipping (3.0), AdamW, teacher EMA (0.996). Crops are pre-made random
tensors, so only the step is timed.

- ``reference``: the step as facebookresearch/dino ``main_dino.py`` writes it, on a deep copy of
  the same ``DinoForPreTraining``: ``MultiCropWrapper`` (``torch.cat`` of the per-view crops, one
  backbone call per resolution, head on the concatenated CLS tokens), eager attention (the
  official ViT computes ``softmax(q k^T) v`` explicitly; ``--reference_attention sdpa`` to change),
  the pairwise ``DINOLoss`` loop, ``clip_gradients`` (one ``p.grad.norm().item()`` host sync per
  tensor), ``torch.optim.AdamW`` with its defaults, the Python-loop EMA
  (``p_t.data.mul_(m).add_((1 - m) * p_s.detach().data)``) and ``loss.item()`` for logging.
- ``lightly_timm`` (when ``lightly`` and ``timm`` are installed: ``pip install -e '.[bench]'``): the
  step as a lightly user writes it (``benchmarks/lightly_dino.py``: timm ViT, lightly's
  ``DINOProjectionHead``, ``DINOLoss`` and ``update_momentum``, grouped forward of the global and the
  local crops, AdamW, ``clip_grad_norm_``), loaded with the same weights.
- ``ours``: ``DinoForPreTraining.forward`` (crop-major tensors, the last block computing the CLS row
  only, ``DinoLoss`` without the pair loop, SDPA attention), per-parameter clipping without host syncs (``torch._foreach_norm`` ->
  clamp -> ``torch._foreach_mul_``), fused AdamW (foreach where fused is unavailable),
  ``model.update_teacher`` (one ``torch._foreach_lerp_``).
- ``ours_compiled`` (``--torch_compile``): ours with ``compile_backbone(dynamic=False)`` in place on
  the student and teacher backbones (state-dict names unchanged); the compile time and the number
  of steps after which it pays off are reported.
- ``ours_checkpointing`` (``--gradient_checkpointing``): ours after
  ``model.gradient_checkpointing_enable()`` (``activation_checkpointing_enable`` in transformers 5,
  non-reentrant); memory saved and time cost are reported.
- ``ours_device_augmentation`` (``--device_augmentation``): ours fed every step by
  ``BatchedMultiCropAugmentation`` on the device from a ``(B, 3, S, S)`` uint8 batch (pinned host
  memory on CUDA, copied each step), i.e. the step plus on-device multi-crop; compiled backbones
  when ``--torch_compile`` is also given.

Variants run interleaved in one process (rotating which goes first), ``--repeats`` timed blocks of
``--steps_per_repeat`` steps after ``--warmup_steps`` untimed ones; medians are compared. The first
step of reference and ours starts from identical weights, seeds and crops, and the loss and
parameter differences after it are reported (a check that the two steps compute the same thing).
Peak memory is measured per variant in a separate process: the growth of ``ru_maxrss`` over two
steps on the CPU (``tracemalloc`` does not see torch's allocator), ``torch.cuda.max_memory_allocated``
on CUDA.

    .venv/bin/python benchmarks/bench_train_step.py                  # ViT-Ti/16, 2x224 + 8x96, batch 16
    .venv/bin/python benchmarks/bench_train_step.py --mixed_precision bf16
    .venv/bin/python benchmarks/bench_train_step.py --preset vit_small_patch16 --batch_size 64 \\
        --num_local_crops 10 --mixed_precision bf16 --torch_compile --device cuda
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the helper modules in benchmarks/
from lightly_dino import LightlyTimmStep, copy_dino_hf_weights, lightly_available
from official_dino import OfficialDINOLoss, OfficialMultiCropWrapper, official_clip_gradients
from recording import record_result, write_metrics_json

from dino_hf.data.batched_augmentation import BatchedMultiCropAugmentation
from dino_hf.models.configuration_dino import DinoConfig
from dino_hf.models.modeling_dino import DinoForPreTraining

CLIP_GRAD = 3.0
TEACHER_MOMENTUM = 0.996
TEACHER_TEMPERATURE = 0.04
WEIGHT_DECAY = 0.04
VARIANTS = ("reference", "lightly_timm", "ours", "ours_compiled", "ours_checkpointing", "ours_device_augmentation")


class ReferenceStep:
    """``train_one_epoch``'s body, official style, on its own copy of the model."""

    def __init__(self, model: DinoForPreTraining, scaler: torch.amp.GradScaler | None, autocast) -> None:
        self.student = OfficialMultiCropWrapper(model.student.backbone, model.student.head)
        self.teacher = OfficialMultiCropWrapper(model.teacher.backbone, model.teacher.head)
        self.model = model
        self.loss = None  # built on the first call, when the number of crops is known
        self.optimizer = torch.optim.AdamW(model.get_parameter_groups(WEIGHT_DECAY))  # official defaults
        self.scaler = scaler
        self.autocast = autocast

    def __call__(
        self, views: list[torch.Tensor], global_crops: torch.Tensor, local_crops: torch.Tensor | None
    ) -> float:
        if self.loss is None:
            self.loss = OfficialDINOLoss(self.model.config.num_prototypes, len(views)).to(views[0].device)
        with self.autocast():
            teacher_output = self.teacher(views[:2])  # only the 2 global views pass through the teacher
            student_output = self.student(views)
            loss = self.loss(student_output, teacher_output)
        self.optimizer.zero_grad()
        if self.scaler is None:
            loss.backward()
            official_clip_gradients(self.student, CLIP_GRAD)
            self.optimizer.step()
        else:
            self.scaler.scale(loss).backward()
            self.scaler.unscale_(self.optimizer)
            official_clip_gradients(self.student, CLIP_GRAD)
            self.scaler.step(self.optimizer)
            self.scaler.update()
        with torch.no_grad():  # EMA update for the teacher
            m = TEACHER_MOMENTUM
            for param_q, param_k in zip(self.student.parameters(), self.teacher.parameters(), strict=True):
                param_k.data.mul_(m).add_((1 - m) * param_q.detach().data)
        return loss.item()  # official: metric_logger.update(loss=loss.item())


# --------------------------------------------------------------------------------------------------
# Our step
# --------------------------------------------------------------------------------------------------
@torch.no_grad()
def clip_gradients_per_parameter_(parameters: list[nn.Parameter], max_norm: float) -> None:
    """Official per-tensor clipping (``grad *= min(1, max_norm / (||grad|| + 1e-6))``) without host syncs."""
    gradients = [p.grad for p in parameters if p.grad is not None]
    if not gradients:
        return
    norms = torch.stack(torch._foreach_norm(gradients))
    coefficients = (max_norm / (norms.float() + 1e-6)).clamp_(max=1.0)
    torch._foreach_mul_(gradients, list(coefficients.to(gradients[0].dtype).unbind(0)))


def _adamw(parameter_groups: list[dict], device: torch.device) -> torch.optim.AdamW:
    """Fused AdamW where torch supports it on ``device``, else the foreach implementation."""
    try:
        return torch.optim.AdamW(parameter_groups, fused=True)
    except (RuntimeError, ValueError):
        return torch.optim.AdamW(parameter_groups, foreach=True)


class OursStep:
    """``DinoForPreTraining`` forward + sync-free clipping + fused AdamW + foreach EMA."""

    def __init__(self, model: DinoForPreTraining, scaler: torch.amp.GradScaler | None, autocast) -> None:
        self.model = model
        self.optimizer = _adamw(model.get_parameter_groups(WEIGHT_DECAY), next(model.parameters()).device)
        self.trainable = [p for p in model.student.parameters() if p.requires_grad]
        self.scaler = scaler
        self.autocast = autocast

    def __call__(
        self, views: list[torch.Tensor], global_crops: torch.Tensor, local_crops: torch.Tensor | None
    ) -> torch.Tensor:
        with self.autocast():
            output = self.model(global_crops, local_crops, teacher_temperature=TEACHER_TEMPERATURE)
        if self.scaler is None:
            output.loss.backward()
            clip_gradients_per_parameter_(self.trainable, CLIP_GRAD)
            self.optimizer.step()
        else:
            self.scaler.scale(output.loss).backward()
            self.scaler.unscale_(self.optimizer)
            clip_gradients_per_parameter_(self.trainable, CLIP_GRAD)
            self.scaler.step(self.optimizer)
            self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.model.update_teacher(TEACHER_MOMENTUM)
        return output.loss.detach()


class DeviceAugmentationStep:
    """Ours, fed by ``BatchedMultiCropAugmentation`` on the training device from a uint8 batch.

    Every step copies the ``(B, 3, S, S)`` uint8 batch (pinned on the host when the device is CUDA,
    as a decode-only loader would hand it over) to the device, draws fresh multi-crop views there,
    then runs :class:`OursStep`; the pre-made crops are ignored.
    """

    def __init__(self, step: OursStep, args: argparse.Namespace, device: torch.device) -> None:
        self.step = step
        self.device = device
        self.augmentation = BatchedMultiCropAugmentation(
            global_crop_size=args.global_crop_size,
            local_crop_size=args.local_crop_size,
            num_local_crops=args.num_local_crops,
        )
        size = args.augmentation_image_size
        generator = torch.Generator().manual_seed(2)
        images = torch.randint(0, 256, (args.batch_size, 3, size, size), dtype=torch.uint8, generator=generator)
        self.images = images.pin_memory() if device.type == "cuda" else images

    def __call__(
        self, views: list[torch.Tensor], global_crops: torch.Tensor, local_crops: torch.Tensor | None
    ) -> torch.Tensor:
        crops = self.augmentation(self.images.to(self.device, non_blocking=True))
        return self.step(views, crops["global_crops"], crops["local_crops"])


# --------------------------------------------------------------------------------------------------
# Set-up
# --------------------------------------------------------------------------------------------------
def build_model(args: argparse.Namespace, device: torch.device) -> DinoForPreTraining:
    """The model every variant copies: ``--preset`` with ``--num_prototypes`` and the crop size."""
    config = DinoConfig.from_preset(args.preset, num_prototypes=args.num_prototypes)
    config.backbone_config.image_size = args.global_crop_size
    for item in filter(None, args.config_overrides.split(",")):
        key, value = (part.strip() for part in item.split("=", 1))
        target = config if hasattr(config, key) and key != "backbone_config" else config.backbone_config
        if not hasattr(target, key):
            raise SystemExit(f"--config_overrides: neither DinoConfig nor its backbone config has {key!r}.")
        current = getattr(target, key)
        setattr(
            target, key, value.lower() in ("1", "true", "yes") if isinstance(current, bool) else type(current)(value)
        )
    torch.manual_seed(0)
    return DinoForPreTraining(config).to(device).train()


def make_crops(
    args: argparse.Namespace, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor | None, list[torch.Tensor]]:
    """Random crop-major crops and the same crops as the official per-view list."""
    generator = torch.Generator().manual_seed(1)
    global_crops = torch.randn(
        2, args.batch_size, 3, args.global_crop_size, args.global_crop_size, generator=generator
    ).to(device)
    local_crops = None
    views = list(global_crops.unbind(0))
    if args.num_local_crops > 0:
        local_crops = torch.randn(
            args.num_local_crops, args.batch_size, 3, args.local_crop_size, args.local_crop_size, generator=generator
        ).to(device)
        views += list(local_crops.unbind(0))
    return global_crops, local_crops, views


def make_variant(name: str, model: DinoForPreTraining, args: argparse.Namespace, device: torch.device):
    """A step callable for ``name`` that trains ``model`` (give each variant its own copy)."""
    autocast = _autocast_factory(args.mixed_precision, device)
    scaler = torch.amp.GradScaler(device.type) if args.mixed_precision == "fp16" else None
    if name == "reference":
        model.student.backbone.set_attn_implementation(args.reference_attention)
        model.teacher.backbone.set_attn_implementation(args.reference_attention)
        return ReferenceStep(model, scaler, autocast)
    if name == "lightly_timm":
        learning_rate = OursStep(copy.deepcopy(model), None, autocast).optimizer.param_groups[0]["lr"]
        step = LightlyTimmStep(model.config, learning_rate, autocast=autocast)
        copy_dino_hf_weights(step, model.student, model.teacher)
        return step.to(device)
    if args.ours_attention != "sdpa":
        for network in (model.student, model.teacher):
            network.backbone.set_attn_implementation(args.ours_attention)
    if name == "ours_compiled" or (name == "ours_device_augmentation" and args.torch_compile):
        for network in (model.student, model.teacher):
            network.compile_backbone(dynamic=False)
    if name == "ours_checkpointing":
        if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.x name
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    step = OursStep(model, scaler, autocast)
    if name == "ours_device_augmentation":
        return DeviceAugmentationStep(step, args, device)
    return step


def _autocast_factory(mixed_precision: str, device: torch.device) -> Callable[[], contextlib.AbstractContextManager]:
    if mixed_precision == "no":
        return contextlib.nullcontext
    dtype = torch.bfloat16 if mixed_precision == "bf16" else torch.float16
    return lambda: torch.autocast(device_type=device.type, dtype=dtype)


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _variants(args: argparse.Namespace) -> list[str]:
    names = ["reference", "ours"]
    if not args.skip_lightly and lightly_available():
        names.insert(1, "lightly_timm")
    if args.torch_compile:
        names.append("ours_compiled")
    if args.gradient_checkpointing:
        names.append("ours_checkpointing")
    if args.device_augmentation:
        names.append("ours_device_augmentation")
    return names


# --------------------------------------------------------------------------------------------------
# Memory probe (runs in a fresh process per variant)
# --------------------------------------------------------------------------------------------------
def _process_memory_bytes(field: str) -> int | None:
    """``VmRSS`` (current) or ``VmHWM`` (peak) of this process from ``/proc/self/status``, or ``None``."""
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def _reset_peak_rss() -> bool:
    """Reset ``VmHWM`` to the current RSS (Linux >= 4.0, ``echo 5 > /proc/self/clear_refs``)."""
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as clear_refs:
            clear_refs.write("5")
        return _process_memory_bytes("VmHWM") is not None
    except OSError:
        return False


def memory_probe(args: argparse.Namespace, device: torch.device) -> dict:
    """Peak memory growth over two steps of the variant ``args.memory_probe`` (model and crops built first).

    On the CPU the peak resident set size is reset to the current one just before the steps
    (``/proc/self/clear_refs``) and read back after them (``VmHWM``); where that is unavailable,
    the growth of ``ru_maxrss`` is used (a lower bound: it also remembers the set-up's peak).
    """
    global_crops, local_crops, views = make_crops(args, device)
    step = make_variant(args.memory_probe, build_model(args, device), args, device)
    _synchronize(device)
    use_peak_rss = device.type != "cuda" and _reset_peak_rss()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
    elif use_peak_rss:
        before = _process_memory_bytes("VmRSS")
    else:
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    for _ in range(2):
        step(views, global_crops, local_crops)
    _synchronize(device)
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device)
    elif use_peak_rss:
        peak = _process_memory_bytes("VmHWM")
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"variant": args.memory_probe, "peak_memory_mb": (peak - before) / 2**20}


def _probe_command(args: argparse.Namespace, variant: str) -> list[str]:
    command = [sys.executable, str(Path(__file__).resolve()), "--memory_probe", variant]
    if args.threads is not None:
        command += ["--threads", str(args.threads)]
    for name in (
        "preset",
        "num_prototypes",
        "config_overrides",
        "global_crop_size",
        "local_crop_size",
        "batch_size",
        "num_local_crops",
        "mixed_precision",
        "device",
        "reference_attention",
        "ours_attention",
        "augmentation_image_size",
    ):
        command += [f"--{name}", str(getattr(args, name))]
    return command


def measure_memory(args: argparse.Namespace, variants: list[str]) -> dict[str, float]:
    peaks = {}
    for variant in variants:
        result = subprocess.run(_probe_command(args, variant), capture_output=True, text=True, check=False)
        if result.returncode != 0:
            raise RuntimeError(f"memory probe for {variant} failed:\n{result.stderr[-3000:]}")
        peaks[variant] = json.loads(result.stdout.strip().splitlines()[-1])["peak_memory_mb"]
    return peaks


# --------------------------------------------------------------------------------------------------
# Timing
# --------------------------------------------------------------------------------------------------
def _max_parameter_difference(first: nn.Module, second: nn.Module) -> float:
    return max(
        (a.detach().float() - b.detach().float()).abs().max().item()
        for a, b in zip(first.parameters(), second.parameters(), strict=True)
    )


def run_timing(args: argparse.Namespace, device: torch.device, variants: list[str]) -> dict:
    base = build_model(args, device)
    global_crops, local_crops, views = make_crops(args, device)
    steps = {name: make_variant(name, copy.deepcopy(base), args, device) for name in variants}
    del base

    # First step of every variant from identical weights, seeds and crops: equivalence check, and
    # for the compiled variant the compile time (first two steps, see below).
    first_losses, first_two_seconds = {}, {}
    for name, step in steps.items():
        torch.manual_seed(123)  # same drop-path masks for every variant
        _synchronize(device)
        start = time.perf_counter()
        first_losses[name] = float(step(views, global_crops, local_crops))
        for _ in range(max(args.warmup_steps, 2) - 1):
            step(views, global_crops, local_crops)
        _synchronize(device)
        first_two_seconds[name] = time.perf_counter() - start

    # Student weights after the identical warm-up steps (AdamW turns rounding differences of
    # near-zero gradients into differences of up to ~lr per step, so compare with the learning rate).
    parameter_difference = _max_parameter_difference(steps["reference"].model.student, steps["ours"].model.student)
    learning_rate = steps["ours"].optimizer.param_groups[0]["lr"]

    timings: dict[str, list[float]] = {name: [] for name in variants}
    cpu_timings: dict[str, list[float]] = {name: [] for name in variants}
    for repeat in range(args.repeats):
        order = variants[repeat % len(variants) :] + variants[: repeat % len(variants)]
        for name in order:
            _synchronize(device)
            start, cpu_start = time.perf_counter(), time.process_time()
            for _ in range(args.steps_per_repeat):
                steps[name](views, global_crops, local_crops)
            _synchronize(device)
            timings[name].append((time.perf_counter() - start) / args.steps_per_repeat)
            cpu_timings[name].append((time.process_time() - cpu_start) / args.steps_per_repeat)

    medians = {name: statistics.median(values) for name, values in timings.items()}
    cpu_medians = {name: statistics.median(values) for name, values in cpu_timings.items()}
    metrics: dict = {
        "first_step_loss_difference": abs(first_losses["ours"] - first_losses["reference"]),
        "first_step_loss": first_losses["ours"],
        "warmup_parameter_difference_in_learning_rates": parameter_difference / learning_rate,
    }
    for name in variants:
        metrics[f"{name}_seconds_per_step"] = medians[name]
        metrics[f"{name}_cpu_seconds_per_step"] = cpu_medians[name]
        metrics[f"{name}_images_per_second"] = args.batch_size / medians[name]
    metrics["speedup_ours_vs_reference"] = medians["reference"] / medians["ours"]
    if "lightly_timm" in variants:
        # wall time is what a user waits; CPU time is steadier on a shared machine: both are reported
        metrics["speedup_ours_vs_lightly_timm"] = medians["lightly_timm"] / medians["ours"]
        metrics["cpu_speedup_ours_vs_lightly_timm"] = cpu_medians["lightly_timm"] / cpu_medians["ours"]
    if "ours_compiled" in variants:
        warm_steps = max(args.warmup_steps, 2)
        compile_seconds = first_two_seconds["ours_compiled"] - warm_steps * medians["ours_compiled"]
        saved_per_step = medians["ours"] - medians["ours_compiled"]
        metrics["compile_seconds"] = compile_seconds
        metrics["speedup_compiled_vs_ours"] = medians["ours"] / medians["ours_compiled"]
        metrics["compile_breakeven_steps"] = compile_seconds / saved_per_step if saved_per_step > 0 else "never"
    if "ours_device_augmentation" in variants:
        metrics["device_augmentation_time_ratio"] = medians["ours_device_augmentation"] / medians["ours"]
    if "ours_checkpointing" in variants:
        metrics["checkpointing_time_ratio"] = medians["ours_checkpointing"] / medians["ours"]
    return metrics


# --------------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------------
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="vit_tiny_patch16", choices=DinoConfig.preset_names())
    parser.add_argument("--num_prototypes", type=int, default=65536, help="K (official 65536).")
    parser.add_argument(
        "--config_overrides",
        default="",
        help="Comma-separated key=value overrides of DinoConfig or its backbone, e.g. 'num_hidden_layers=2,head_hidden_size=64'.",
    )
    parser.add_argument("--global_crop_size", "--image_size", dest="global_crop_size", type=int, default=224)
    parser.add_argument("--local_crop_size", type=int, default=96)
    parser.add_argument("--batch_size", type=int, default=16, help="Source images per step.")
    parser.add_argument("--num_local_crops", type=int, default=8)
    parser.add_argument("--mixed_precision", choices=("no", "bf16", "fp16"), default="no")
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (cuda when available).")
    parser.add_argument("--torch_compile", action="store_true", help="Also time ours with compiled backbones.")
    parser.add_argument(
        "--gradient_checkpointing", action="store_true", help="Also time ours with activation checkpointing."
    )
    parser.add_argument(
        "--device_augmentation",
        action="store_true",
        help="Also time ours fed by BatchedMultiCropAugmentation on the device from a uint8 batch.",
    )
    parser.add_argument("--augmentation_image_size", type=int, default=256, help="Side of the uint8 working images.")
    parser.add_argument(
        "--reference_attention",
        choices=("eager", "sdpa"),
        default="eager",
        help="Attention of the reference backbone; the official ViT computes it explicitly (eager).",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch intra-op threads (default: torch's). On a shared, oversubscribed CPU use 1: every parallel "
        "region then waits for descheduled threads (measured ~11 ms per op with 2 threads at load 4 on 2 cores).",
    )
    parser.add_argument(
        "--ours_attention",
        choices=("sdpa", "eager"),
        default="sdpa",
        help="Attention of our backbones (the model's default is sdpa; eager is faster for bf16 on the CPU).",
    )
    parser.add_argument("--repeats", type=int, default=5, help="Timed blocks per variant (median reported).")
    parser.add_argument("--steps_per_repeat", type=int, default=2)
    parser.add_argument("--warmup_steps", type=int, default=2, help="Untimed steps per variant (>= 2).")
    parser.add_argument("--skip_memory", action="store_true", help="Do not start the per-variant memory probes.")
    parser.add_argument(
        "--skip_lightly", action="store_true", help="Do not time the lightly + timm step (timed when installed)."
    )
    parser.add_argument(
        "--results_file", type=Path, default=None, help="Table to append to (default benchmarks/RESULTS.md)."
    )
    parser.add_argument("--json_output", type=Path, default=None, help="Also write the metrics as JSON here.")
    parser.add_argument("--memory_probe", choices=VARIANTS, default=None, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    if args.mixed_precision == "fp16" and device.type == "cpu":
        raise SystemExit("--mixed_precision fp16 needs a CUDA device (fp16 autocast on the CPU is a no-op); use bf16.")
    if args.memory_probe:
        args.device = str(device)
        print(json.dumps(memory_probe(args, device)), flush=True)
        return {}

    args.device = str(device)
    variants = _variants(args)
    import platform

    metrics = {
        "preset": args.preset,
        "device": str(device),
        "mixed_precision": args.mixed_precision,
        "batch_size": args.batch_size,
        "crops": f"2x{args.global_crop_size}+{args.num_local_crops}x{args.local_crop_size}",
        "num_prototypes": args.num_prototypes,
        "threads": torch.get_num_threads(),
        "load_average_1min": os.getloadavg()[0],  # other work on a shared machine skews timings
        "malloc_env": " ".join(f"{k}={v}" for k, v in sorted(os.environ.items()) if k.startswith("MALLOC_")) or "none",
        "python": platform.python_version(),
    }
    metrics.update(run_timing(args, device, variants))
    if not args.skip_memory:
        peaks = measure_memory(args, variants)
        for name in variants:
            metrics[f"{name}_peak_memory_mb"] = peaks[name]
        metrics["memory_ratio_ours_vs_reference"] = peaks["ours"] / max(peaks["reference"], 1e-9)
        if "ours_checkpointing" in variants:
            metrics["checkpointing_memory_saved_mb"] = peaks["ours"] - peaks["ours_checkpointing"]
    command = "python benchmarks/bench_train_step.py " + " ".join(argv if argv is not None else sys.argv[1:])
    notes = (
        f"source images/s of one optimiser step on pre-made crops; reference = official-style step "
        f"({args.reference_attention} attention, MultiCropWrapper cat, pairwise DINOLoss, per-tensor clip with "
        f".item(), default AdamW, Python-loop EMA, loss.item()); lightly_timm = benchmarks/lightly_dino.py (timm "
        f"ViT, lightly head/loss/EMA, grouped forward, AdamW, clip_grad_norm_); ours = DinoForPreTraining "
        f"({args.ours_attention} "
        f"attention) + foreach clip + fused AdamW + foreach-lerp EMA; peak memory = "
        f"{'cuda max_memory_allocated' if device.type == 'cuda' else 'ru_maxrss growth'} over 2 steps in a fresh process"
    )
    record_result("bench_train_step", command.strip(), metrics, notes=notes, results_path=args.results_file)
    write_metrics_json(metrics, args.json_output)
    return metrics


if __name__ == "__main__":
    main()

"""What this machine is, and what runs fast on it: mixed precision, loader workers and compute threads.

A laptop, a cloud VM and a GPU node are all "any machine", and what is fast differs between them: bf16
autocast is several times faster than fp32 on a CPU with native bf16 instructions (AMX, AVX512-BF16)
and many times slower on one without them (benchmarks/RESULTS.md records both); two loader workers
and two compute threads on two cores spin against each other. The functions here decide once, at the
start of a run, from facts about the machine:

- :func:`describe_cpu`: the CPU model, its usable cores and whether it has native bf16 instructions;
- :func:`measure_cpu_bf16_speedup`: a sub-second probe, fp32 time over bf16-autocast time of a linear
  layer's forward and backward (above 1: bf16 is faster here);
- :func:`choose_mixed_precision`, :func:`choose_num_workers`, :func:`choose_num_threads`: the
  decisions, pure functions of those facts (tested with both answers of the probe).
"""

from __future__ import annotations

import functools
import os
import platform
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

__all__ = [
    "CpuInfo",
    "MachineSettings",
    "PrecisionChoice",
    "choose_mixed_precision",
    "choose_num_threads",
    "choose_num_workers",
    "describe_cpu",
    "measure_cpu_bf16_speedup",
    "usable_cores",
]

#: CPU feature flags (``/proc/cpuinfo``) that mean native bf16 arithmetic: x86 AVX512-BF16 and AMX,
#: ARM's BF16 extension.
NATIVE_BF16_FLAGS = ("avx512_bf16", "amx_bf16", "bf16")

#: bf16 autocast is chosen on a CPU only when the probe finds it at least this much faster than fp32:
#: a margin, so that noise on a machine where both are equally fast keeps the exact fp32 path.
BF16_MIN_SPEEDUP = 1.2


@dataclass(frozen=True)
class CpuInfo:
    """The facts about the CPU that speed decisions and benchmark records need.

    Attributes:
        model: the model name (``/proc/cpuinfo``'s ``model name``, else ``platform.processor()``).
        cores: cores this process may run on (its CPU affinity, which containers and ``taskset`` limit).
        native_bf16: the CPU reports native bf16 instructions (:data:`NATIVE_BF16_FLAGS`).
        vector_extensions: the widest SIMD torch dispatches to (``torch.backends.cpu.get_cpu_capability()``).
    """

    model: str
    cores: int
    native_bf16: bool
    vector_extensions: str

    def describe(self) -> str:
        """One line, e.g. ``"AMD EPYC, 2 cores, AVX2, no native bf16"``."""
        bf16 = "native bf16" if self.native_bf16 else "no native bf16"
        return f"{self.model}, {self.cores} cores, {self.vector_extensions}, {bf16}"


def usable_cores() -> int:
    """Cores this process may run on (affinity mask where the OS has one, else ``os.cpu_count()``)."""
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return max(1, os.cpu_count() or 1)


def describe_cpu(cpuinfo_path: str = "/proc/cpuinfo") -> CpuInfo:
    """The model, usable cores and native-bf16 support of this machine's CPU."""
    model = platform.processor() or platform.machine()
    flags: set[str] = set()
    try:
        with open(cpuinfo_path, encoding="utf-8") as cpuinfo:
            for line in cpuinfo:
                key, _, value = line.partition(":")
                key = key.strip().lower()
                if key == "model name" and value.strip():
                    model = value.strip()
                elif key in ("flags", "features") and not flags:
                    flags = set(value.split())
    except OSError:  # not Linux: the probe still decides
        pass
    return CpuInfo(
        model=model,
        cores=usable_cores(),
        native_bf16=any(flag in flags for flag in NATIVE_BF16_FLAGS),
        vector_extensions=torch.backends.cpu.get_cpu_capability(),
    )


@functools.cache
def measure_cpu_bf16_speedup(max_seconds: float = 0.5, size: int = 256) -> float:
    """fp32 time / bf16-autocast time of a linear layer's forward and backward on this CPU.

    Measured once per process (cached): the machine does not change, and every run of one process
    must choose the same precision, since accelerate fixes it at the process's first ``Accelerator``
    (a notebook that trains twice would otherwise fail when a noisy probe lands on the other side
    of the threshold).

    The layer, ``(size, 1.5 * size) @ (1.5 * size, 4 * size)`` with its backward, is the shape of a
    small ViT's MLP: what dominates a training step. Both precisions alternate three times and the
    medians are compared; the bf16 side stops early once it alone has used ``max_seconds`` (then bf16
    is many times slower and the ratio is a bound). Takes well under a second.

    Returns:
        The speed-up of bf16 over fp32: above 1 means bf16 is faster here.
    """
    generator = torch.Generator().manual_seed(0)
    inputs = torch.randn(size, size * 3 // 2, generator=generator)
    weight = torch.randn(size * 4, size * 3 // 2, generator=generator, requires_grad=True)

    def step(bf16: bool) -> float:
        started = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            output = torch.nn.functional.linear(inputs, weight)
        output.float().sum().backward()
        weight.grad = None
        return time.perf_counter() - started

    with torch.inference_mode(False), torch.enable_grad():
        step(False), step(True)  # first calls allocate and dispatch: not timed
        fp32_times, bf16_times = [], []
        bf16_budget = max_seconds
        for _ in range(3):
            fp32_times.append(step(False))
            bf16_times.append(step(True))
            bf16_budget -= bf16_times[-1]
            if bf16_budget <= 0:
                break
    fp32, bf16 = sorted(fp32_times)[len(fp32_times) // 2], sorted(bf16_times)[len(bf16_times) // 2]
    return fp32 / max(bf16, 1e-9)


@dataclass(frozen=True)
class PrecisionChoice:
    """The resolved ``--mixed_precision`` and why.

    Attributes:
        mixed_precision: ``"no"``, ``"bf16"`` or ``"fp16"`` (what accelerate gets).
        reason: one sentence for the log.
        warning: one sentence to warn with (an explicit choice that is slow here), else ``None``.
        cpu_bf16_speedup: the probe's figure when it ran, else ``None``.
    """

    mixed_precision: str
    reason: str
    warning: str | None = None
    cpu_bf16_speedup: float | None = None


def choose_mixed_precision(
    requested: str,
    device_type: str,
    cuda_bf16_supported: bool = False,
    cpu_bf16_speedup: Callable[[], float] = measure_cpu_bf16_speedup,
) -> PrecisionChoice:
    """Resolve ``--mixed_precision`` for the device the run trains on.

    ``auto``: on CUDA, bf16 where the GPU supports it, else fp16 (with loss scaling); on a CPU, bf16
    only where the probe finds it at least :data:`BF16_MIN_SPEEDUP` times faster than fp32, else fp32
    (``"no"``); elsewhere (MPS...) fp32. An explicit ``no``, ``bf16`` or ``fp16`` is obeyed; ``bf16``
    on a CPU where it is slower comes with a warning quoting the measured factor. (fp16 on a CPU is
    refused by the arguments' validation with the accelerator.)

    Args:
        requested: ``"auto"``, ``"no"``, ``"bf16"`` or ``"fp16"``.
        device_type: ``"cuda"``, ``"cpu"``, ``"mps"``...
        cuda_bf16_supported: ``torch.cuda.is_bf16_supported()`` on CUDA.
        cpu_bf16_speedup: called (once) when the decision needs the CPU probe.
    """
    if requested == "auto":
        if device_type == "cuda":
            if cuda_bf16_supported:
                return PrecisionChoice("bf16", "bf16 autocast: this GPU supports bf16 (no loss scaling needed).")
            return PrecisionChoice("fp16", "fp16 autocast with loss scaling: this GPU has no bf16.")
        if device_type == "cpu":
            speedup = cpu_bf16_speedup()
            if speedup >= BF16_MIN_SPEEDUP:
                return PrecisionChoice(
                    "bf16", f"bf16 autocast: measured {speedup:.1f}x faster than fp32 on this CPU.", None, speedup
                )
            return PrecisionChoice(
                "no", f"fp32: bf16 autocast measured {_slower(speedup)} on this CPU.", None, speedup
            )
        return PrecisionChoice("no", f"fp32: no mixed precision is chosen automatically on {device_type}.")
    if requested == "bf16" and device_type == "cpu":
        speedup = cpu_bf16_speedup()
        warning = None
        if speedup < 1.0:
            warning = (
                f"--mixed_precision bf16 is {_slower(speedup)} than fp32 on this CPU (measured), which has no fast "
                "bf16 arithmetic: use --mixed_precision auto or no to train faster."
            )
        return PrecisionChoice("bf16", "bf16 autocast, as asked.", warning, speedup)
    return PrecisionChoice(requested, "fp32, as asked." if requested == "no" else f"{requested} autocast, as asked.")


def _slower(speedup: float) -> str:
    """``"3.4x slower"`` for a speed-up of 1/3.4 (``"about as fast"`` near 1)."""
    if speedup >= 0.95:
        return "about as fast as fp32, not faster"
    return f"{1.0 / max(speedup, 1e-9):.1f}x slower"


def choose_num_workers(
    requested: int | None,
    cores_per_process: int,
    num_shards_per_process: int | None,
    device_type: str,
) -> int:
    """Loader worker processes per training process.

    An explicit count is obeyed. ``None`` (``--dataloader_num_workers auto``): on a GPU the loader
    feeds a device that does the compute, so every core but the training process's own may augment;
    on a CPU the cores are shared with the compute, so a quarter of them (at least one where there are
    two or more) augment. Never more workers than shards this process reads (extra workers would idle
    and warn) nor than cores; none on a single core.

    Args:
        requested: ``--dataloader_num_workers``, ``None`` for auto.
        cores_per_process: usable cores divided by the training processes on this machine.
        num_shards_per_process: data shards this process reads (``None``: unknown, no cap).
        device_type: the training device's type.
    """
    if requested is not None:
        return requested
    if cores_per_process <= 1:
        return 0
    if device_type == "cuda":
        workers = cores_per_process - 1
    else:
        workers = max(1, cores_per_process // 4)
    if num_shards_per_process is not None:
        workers = min(workers, max(num_shards_per_process, 1))
    return max(0, min(workers, cores_per_process - 1))


def choose_num_threads(cores_per_process: int, num_workers: int, device_type: str) -> int:
    """Compute threads of the training process: its cores minus those its loader workers use.

    On a GPU the host threads only launch kernels, but a CPU training step (or ``--augmentation_device
    cpu``) computes on them: giving them the cores the workers leave free avoids oversubscription
    (OpenMP threads and workers spinning against each other on the same cores), at least one.
    """
    if device_type == "cuda":
        return max(1, min(cores_per_process - num_workers, 4))
    return max(1, cores_per_process - num_workers)


@dataclass(frozen=True)
class MachineSettings:
    """What a run decided for this machine at its start: logged once and saved in ``training_args.json``.

    Attributes:
        device: the training device (``"cuda:0"``, ``"cpu"``...).
        cpu: the CPU's description (:meth:`CpuInfo.describe`).
        cores_per_process: usable cores divided by the training processes on this machine.
        precision: the resolved ``--mixed_precision`` and why.
        num_workers: loader workers per process.
        num_threads: compute threads per process.
    """

    device: str
    cpu: str
    cores_per_process: int
    precision: PrecisionChoice
    num_workers: int
    num_threads: int

    def describe(self) -> list[str]:
        """The log lines of these decisions."""
        return [
            f"machine: {self.device}; CPU {self.cpu}",
            f"mixed precision {self.precision.mixed_precision}: {self.precision.reason}",
            f"loader workers {self.num_workers} and compute threads {self.num_threads} per process "
            f"({self.cores_per_process} cores per process)",
        ]

    def to_dict(self) -> dict[str, object]:
        """Flat facts for ``training_args.json`` (keys prefixed ``resolved_``/``machine_``)."""
        return {
            "resolved_mixed_precision": self.precision.mixed_precision,
            "resolved_dataloader_num_workers": self.num_workers,
            "resolved_torch_num_threads": self.num_threads,
            "machine_device": self.device,
            "machine_cpu": self.cpu,
            "machine_cpu_bf16_speedup": (
                None if self.precision.cpu_bf16_speedup is None else round(self.precision.cpu_bf16_speedup, 3)
            ),
        }

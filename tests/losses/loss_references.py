"""The float64 references the loss tests share, written out plainly from the official code, and the
comparison helpers (imported by the test modules of this folder, which pytest puts on ``sys.path``)."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import torch


def reference_sinkhorn_knopp(
    teacher_logits: torch.Tensor, teacher_temperature: float, iterations: int = 3
) -> torch.Tensor:
    """DINOv2's ``sinkhorn_knopp_teacher`` on one process, for ``(G, B, K)`` logits."""
    num_global_crops, batch_size, num_prototypes = teacher_logits.shape
    assignment = torch.exp(teacher_logits.reshape(-1, num_prototypes) / teacher_temperature).t()
    num_samples = assignment.shape[1]
    assignment /= torch.sum(assignment)
    for _ in range(iterations):
        assignment /= torch.sum(assignment, dim=1, keepdim=True)
        assignment /= num_prototypes
        assignment /= torch.sum(assignment, dim=0, keepdim=True)
        assignment /= num_samples
    assignment *= num_samples
    return assignment.t().reshape(num_global_crops, batch_size, num_prototypes)


def reference_ibot_sinkhorn_knopp(teacher_output, teacher_temperature, iterations=3):
    """DINOv2 ``iBOTPatchLoss.sinkhorn_knopp_teacher`` on one process (B = the number of masked patches)."""
    q = torch.exp(teacher_output / teacher_temperature).t()
    num_samples = q.shape[1]
    num_prototypes = q.shape[0]
    q /= torch.sum(q)
    for _ in range(iterations):
        q /= torch.sum(q, dim=1, keepdim=True)
        q /= num_prototypes
        q /= torch.sum(q, dim=0, keepdim=True)
        q /= num_samples
    q *= num_samples
    return q.t()


def assert_close_relative(actual: torch.Tensor, expected: torch.Tensor, rtol: float) -> None:
    """Relative error measured against the largest magnitude of ``expected``."""
    scale = expected.abs().max().clamp_min(1e-30)
    error = (actual - expected).abs().max()
    assert error <= rtol * scale, f"relative error {float(error / scale):.3g} > {rtol}"


def random_logits(num_crops: int, batch_size: int, num_prototypes: int, generator) -> torch.Tensor:
    return 3 * torch.randn(num_crops, batch_size, num_prototypes, generator=generator).double()


def _gloo_process(rank: int, world_size: int, init_file: str, results_dir: str,
                  compute: Callable[[int, int], dict]) -> None:
    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    torch.save(compute(rank, world_size), os.path.join(results_dir, f"rank{rank}.pt"))
    torch.distributed.destroy_process_group()


def results_of_gloo_processes(compute: Callable[[int, int], dict], tmp_path: Path, world_size: int = 2) -> list[dict]:
    """``compute(rank, world_size)`` (a module-level function returning tensors) in ``world_size`` gloo
    processes; what each returned, by rank."""
    torch.multiprocessing.spawn(_gloo_process, args=(world_size, str(tmp_path / "init"), str(tmp_path), compute),
                                nprocs=world_size)
    return [torch.load(tmp_path / f"rank{rank}.pt", weights_only=True) for rank in range(world_size)]

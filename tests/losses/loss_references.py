"""The float64 references the loss tests share, written out plainly from the official code, and the
comparison helpers (imported by the test modules of this folder, which pytest puts on ``sys.path``)."""

from __future__ import annotations

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

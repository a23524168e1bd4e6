"""DINOv2's Sinkhorn-Knopp teacher (Caron et al. 2020, SwAV), shared by the DINO and the iBOT loss.

Instead of centring, the teacher's sharpened scores ``exp(t / tau_t)`` of ``N`` samples (class tokens
``(G * B, K)``, or masked patches ``(M, K)``) are alternately normalised so that each of the ``K``
prototypes receives ``1/K`` of the mass and each sample holds one distribution: an equipartition
that cannot collapse onto one prototype. The sums run over the rows of all processes (all-reduces),
so the assignment is the one of the global batch.

Also here: :func:`distributed_world_size`, which every loss's all-reduces consult.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch import Tensor


def distributed_world_size() -> int:
    """Number of processes when a ``torch.distributed`` process group is initialised, else 1."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return 1


@torch.no_grad()
def sinkhorn_knopp(scaled_logits: Tensor, iterations: int, num_samples: float | Tensor | None = None) -> Tensor:
    """DINOv2's Sinkhorn-Knopp teacher assignment over the rows of all processes.

    Args:
        scaled_logits: ``(N, K)`` teacher logits already divided by ``tau_t`` (``N`` may be 0 on some
            process; every process must call this, as it all-reduces).
        iterations: Sinkhorn-Knopp iterations (3 in DINOv2).
        num_samples: the number of rows over all processes; ``None`` means ``N * world_size`` (every
            process holds as many rows, as with the DINO class tokens). The iBOT patches differ in
            number per process and pass their all-reduced count.

    Returns:
        ``(N, K)``: every row sums to 1; after enough iterations each prototype receives
        ``num_samples / K`` of the mass over all processes.
    """
    distributed = distributed_world_size() > 1
    if num_samples is None:
        num_samples = scaled_logits.shape[0] * distributed_world_size()
    num_prototypes = scaled_logits.shape[-1]
    # one shift shared by all processes cancels in the first normalisation; it avoids overflow
    shift = scaled_logits.max() if scaled_logits.numel() else scaled_logits.new_full((), -math.inf)
    if distributed:
        dist.all_reduce(shift, op=dist.ReduceOp.MAX)
    assignment = torch.exp(scaled_logits - shift).t()  # (K, N): prototypes x samples, as in DINOv2
    tiny = torch.finfo(assignment.dtype).tiny
    total = assignment.sum()
    if distributed:
        dist.all_reduce(total)
    assignment /= total
    for _ in range(iterations):
        # each prototype receives 1/K of the mass (summed over all processes)
        prototype_mass = assignment.sum(dim=1, keepdim=True)
        if distributed:
            dist.all_reduce(prototype_mass)
        assignment /= prototype_mass.clamp_min_(tiny)
        assignment /= num_prototypes
        # each sample holds 1/N of the mass
        assignment /= assignment.sum(dim=0, keepdim=True).clamp_min_(tiny)
        assignment /= num_samples
    assignment *= num_samples  # columns sum to 1: one distribution per sample
    return assignment.t()

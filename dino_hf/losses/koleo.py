"""DINOv2's KoLeo regulariser (Sablayrolles et al. 2019): :class:`KoLeoLoss`.

The Kozachenko-Leonenko entropy estimator, up to constants, of the ``(N, D)`` student embeddings of
one batch: minus the mean log distance of each L2-normalised embedding to its nearest neighbour. It
pushes the embeddings of a batch apart over the unit sphere, so that the features do not collapse
into a small region (DINOv2 adds it with weight 0.1 on the class tokens of each global crop). The
0-dim loss runs in at least float32, where DINOv2's ``eps`` survives, and never pairs duplicates.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dino_hf.losses.precision import compute_dtype, full_precision
from dino_hf.losses.validation import check_positive_number, is_real


class KoLeoLoss(nn.Module):
    """DINOv2's KoLeo regulariser (Sablayrolles et al. 2019): spread features over the sphere.

    ``loss = -1/N * sum_i log(||x_i - x_nn(i) + eps|| + eps)`` over the L2-normalised features ``x``
    of one batch, ``nn(i)`` the nearest other sample (DINOv2's ``KoLeoLoss``, its ``eps`` placement
    included), computed in at least float32 whatever the autocast (under fp16 the reference's
    ``eps = 1e-8`` rounds to 0 and a duplicate gives ``inf``).

    Duplicates (samples within ``duplicate_tolerance`` of each other, e.g. the same image twice in a
    tiny batch) are not each other's neighbours: their distance would be about ``eps`` (a loss term of
    ~18 whose gradient, ~1/eps, points nowhere in particular). A sample's neighbour is then the
    nearest sample that differs from it, and a sample with none (a batch of one, or all alike) leaves
    the mean. Without duplicates the value is DINOv2's.

    Args:
        eps: DINOv2's ``1e-8`` (normalisation, distance and logarithm).
        duplicate_tolerance: distance at or below which two normalised features count as duplicates.
    """

    def __init__(self, eps: float = 1e-8, duplicate_tolerance: float = 1e-6) -> None:
        super().__init__()
        check_positive_number("eps", eps)
        if not is_real(duplicate_tolerance) or duplicate_tolerance < 0:
            raise ValueError(f"duplicate_tolerance must be 0 or more, got {duplicate_tolerance!r}.")
        self.eps = float(eps)
        self.duplicate_tolerance = float(duplicate_tolerance)

    def forward(self, features: Tensor) -> Tensor:
        """``(N, D)`` features (any scale: normalised here) -> 0-dim loss, float32 (float64 for float64)."""
        if not isinstance(features, Tensor) or features.ndim != 2 or not features.is_floating_point():
            got = tuple(features.shape) if isinstance(features, Tensor) else type(features).__name__
            raise ValueError(f"features must be a floating-point tensor of shape (N, D), got {got}.")
        dtype = compute_dtype(features)
        with full_precision(features.device):
            normalised = F.normalize(features.to(dtype), p=2, dim=-1, eps=self.eps)
            with torch.no_grad():
                # exact differences, not the Gram matrix: near-duplicates must not drown in its rounding
                distances = torch.cdist(normalised, normalised, compute_mode="donot_use_mm_for_euclid_dist")
                distances.masked_fill_(distances <= self.duplicate_tolerance, math.inf)  # self and duplicates
                nearest_distance, nearest = distances.min(dim=1)
                has_neighbour = torch.isfinite(nearest_distance)
            neighbour_distance = F.pairwise_distance(normalised, normalised[nearest], p=2, eps=self.eps)
            terms = -torch.log(neighbour_distance + self.eps)
            weights = has_neighbour.to(dtype)
            return (terms * weights).sum() / weights.sum().clamp_min(1.0)

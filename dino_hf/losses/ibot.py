"""DINOv2's iBOT masked-patch loss (Zhou et al. 2022, Oquab et al. 2024): :class:`IBOTPatchLoss`.

The student sees some of its ``N`` crops with patches masked. For each of the ``M`` masked patches
the teacher, which saw the same crop unmasked, gives a target over the ``K`` prototypes of the patch
head, and the student's patch logits ``[M, K]`` learn it by cross-entropy: each crop's masked patches
are averaged, then the crops. The targets are centred and sharpened like DINO's (with a centre
``[1, K]`` of their own: the EMA of the mean teacher patch logit over the masked patches of all
processes) or a Sinkhorn-Knopp assignment over those patches (:mod:`dino_hf.losses.sinkhorn_knopp`);
the settings are those of :class:`~dino_hf.losses.dino.DinoLoss`, checked by the same rule.
Processes may hold different numbers of masked patches, so sums and counts are all-reduced, not means.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor

from dino_hf.losses.dino import DinoLoss
from dino_hf.losses.precision import compute_dtype, full_precision
from dino_hf.losses.prototype_loss import PrototypeLoss
from dino_hf.losses.sinkhorn_knopp import distributed_world_size, sinkhorn_knopp
from dino_hf.losses.validation import check_temperature


@dataclass
class IBOTPatchLossOutput:
    """What :meth:`IBOTPatchLoss.forward` returns with ``return_statistics=True``.

    Attributes:
        loss: 0-dim, the iBOT masked-patch cross-entropy (float32, or float64 for float64 logits).
        teacher_entropy: mean entropy (nats) of the teacher's per-patch distributions (0 without
            masked patches); near 0 for many steps means one-hot collapse of the patch head.
        teacher_mean_entropy: entropy (nats) of the teacher's mean patch distribution.
        teacher_logits_sum: ``(1, K)``, this process's sum of the teacher logits over its masked
            patches: what the centre EMA consumes, with ``num_masked_patches``.
        num_masked_patches: 0-dim float, this process's number of masked patches ``M``.
    """

    loss: Tensor
    teacher_entropy: Tensor
    teacher_mean_entropy: Tensor
    teacher_logits_sum: Tensor
    num_masked_patches: Tensor


class IBOTPatchLoss(PrototypeLoss):
    """The iBOT masked-patch loss as DINOv2 computes it (``iBOTPatchLoss.forward_masked``).

    For the ``M`` masked patches of ``N`` student crops (rows in the order of ``masks.nonzero()``,
    i.e. ``patch_tokens[masks]``), with teacher targets ``q`` (centred and sharpened softmax, or a
    Sinkhorn-Knopp assignment over the masked patches of all processes) from the teacher's *unmasked*
    view of the same crop::

        loss = 1 / N * sum_n  1 / m_n * sum_{masked patches p of crop n} <q_p, -log_softmax(s_p / tau_s)>

    with ``m_n`` the number of masked patches of crop ``n``: each crop's masked patches are averaged,
    then the crops (an unmasked crop counts in ``N`` and adds 0, as in DINOv2).

    Args:
        num_prototypes: ``K`` of the patch head.
        student_temperature: ``tau_s`` (0.1 in DINOv2).
        center_momentum: EMA momentum of the centre (0.9); in ``[0, 1]``.
        centering: ``"centering"`` or ``"sinkhorn_knopp"`` (as :class:`DinoLoss`).
        sinkhorn_iterations: Sinkhorn-Knopp iterations (3 in DINOv2).

    Buffers:
        center: ``(1, K)`` float32, zeros at init, persistent.
    """

    def forward(
        self,
        student_patch_logits: Tensor,
        teacher_patch_logits: Tensor,
        masks: Tensor,
        teacher_temperature: float | Tensor,
        update_center: bool | None = None,
        return_statistics: bool = False,
    ) -> Tensor | IBOTPatchLossOutput:
        """The masked-patch loss of one batch.

        Args:
            student_patch_logits: ``(M, K)`` student patch-head logits of the masked patches (of the
                masked view), in the order of ``masks.nonzero()``. Gradients flow into it.
            teacher_patch_logits: ``(M, K)`` teacher patch-head logits of the same patches, from the
                unmasked view; never receives gradients.
            masks: ``(N, P)`` or ``(N, h, w)`` bool, the student crops' masks (``M = masks.sum()``).
                On the CPU no device synchronisation is needed to weight the patches.
            teacher_temperature: ``tau_t`` (> 0), a number or a 0-dim tensor.
            update_center: update the centre after the loss; ``None`` means ``self.training``.
            return_statistics: return an :class:`IBOTPatchLossOutput`.

        Returns:
            0-dim loss (float32, float64 for float64 logits), or an :class:`IBOTPatchLossOutput`.
        """
        masks = self._check_inputs(student_patch_logits, teacher_patch_logits, masks)
        teacher_probabilities = self.teacher_probabilities(teacher_patch_logits, teacher_temperature)
        loss = self.cross_entropy(student_patch_logits, teacher_probabilities, masks)
        dtype = compute_dtype(teacher_patch_logits)
        teacher_logits_sum = teacher_patch_logits.detach().sum(dim=0, keepdim=True, dtype=dtype)
        # a fill on the device, not a copy from the host (which would wait for the device)
        num_masked_patches = torch.full((), float(teacher_patch_logits.shape[0]), device=teacher_patch_logits.device)
        if update_center is None:
            update_center = self.training
        if update_center:
            self.update_center(teacher_logits_sum, num_masked_patches)
        if not return_statistics:
            return loss
        if teacher_probabilities.shape[0] == 0:
            zero = torch.zeros((), dtype=dtype, device=teacher_probabilities.device)
            entropy, mean_entropy = zero, zero.clone()
        else:
            entropy, mean_entropy = DinoLoss.teacher_statistics(teacher_probabilities)
        return IBOTPatchLossOutput(loss, entropy, mean_entropy, teacher_logits_sum, num_masked_patches)

    def cross_entropy(self, student_patch_logits: Tensor, teacher_probabilities: Tensor, masks: Tensor) -> Tensor:
        """The loss from precomputed ``(M, K)`` teacher probabilities (constants) and the ``(N, P)`` masks."""
        masks = masks.flatten(1)
        num_crops = masks.shape[0]
        # the crop of every masked patch (row-major order of masks.nonzero(), the order of tokens[masks])
        crop_index = masks.nonzero()[:, 0].to(student_patch_logits.device, non_blocking=True)
        patches_per_crop = masks.sum(dim=1).clamp_min(1).to(student_patch_logits.device, non_blocking=True)
        dtype = compute_dtype(student_patch_logits, teacher_probabilities)
        with full_precision(student_patch_logits.device):
            log_probabilities = torch.log_softmax(student_patch_logits.to(dtype) / self.student_temperature, dim=-1)
            per_patch = -(teacher_probabilities.detach().to(dtype) * log_probabilities).sum(dim=-1)  # (M,)
            weights = patches_per_crop.to(dtype).reciprocal()[crop_index]
            return (per_patch * weights).sum() / num_crops

    @torch.no_grad()
    def teacher_probabilities(self, teacher_patch_logits: Tensor, teacher_temperature: float | Tensor) -> Tensor:
        """``(M, K)`` teacher targets: centred and sharpened softmax, or Sinkhorn-Knopp over the masked
        patches of all processes (their total count is all-reduced)."""
        temperature = check_temperature(teacher_temperature)
        dtype = compute_dtype(teacher_patch_logits)
        with full_precision(teacher_patch_logits.device):
            logits = teacher_patch_logits.detach().to(dtype)
            temperature = self._temperature_like(temperature, logits)
            if self.centering == "centering":
                return self._centred_softmax(logits, temperature)
            num_samples = torch.full((), float(logits.shape[0]), dtype=dtype, device=logits.device)
            if distributed_world_size() > 1:
                dist.all_reduce(num_samples)
            return sinkhorn_knopp(logits / temperature, self.sinkhorn_iterations, num_samples)

    @torch.no_grad()
    def update_center(self, teacher_logits_sum: Tensor, num_masked_patches: Tensor, apply: Tensor | None = None) -> None:
        """``center <- m * center + (1 - m) * mean``, the mean teacher logit over the masked patches of all
        processes (sums and counts are all-reduced, so processes with more masked patches weigh more).

        Nothing happens with ``centering="sinkhorn_knopp"``, and the centre keeps its value when no
        patch was masked anywhere or where ``apply`` (a 0-dim bool tensor, "the step was finite") is False.
        DINOv2 instead averages each process's mean over a padded buffer of patches.

        Args:
            teacher_logits_sum: ``(1, K)`` sum of this process's teacher patch logits (e.g. over
                accumulation micro-steps).
            num_masked_patches: 0-dim, the number of patches in that sum.
        """
        if self.centering != "centering":
            return
        if teacher_logits_sum.numel() != self.num_prototypes:
            raise ValueError(
                f"teacher_logits_sum must be a tensor of shape (1, {self.num_prototypes}), "
                f"got {tuple(teacher_logits_sum.shape)}."
            )
        packed = torch.cat([teacher_logits_sum.detach().reshape(-1), num_masked_patches.detach().reshape(1)])
        packed = packed.to(device=self.center.device, dtype=self.center.dtype, copy=True)
        if distributed_world_size() > 1:
            dist.all_reduce(packed)  # one collective for the sums and the count
        total, count = packed[:-1].reshape(1, -1), packed[-1]
        updated = self.center * self.center_momentum + total / count.clamp_min(1.0) * (1.0 - self.center_momentum)
        keep = count > 0
        if apply is not None:
            keep = keep & apply.to(keep.device)
        self.center.copy_(torch.where(keep, updated, self.center))

    def _check_inputs(self, student_patch_logits: Tensor, teacher_patch_logits: Tensor, masks: Tensor) -> Tensor:
        """ValueError (one sentence) unless the logits and masks fit together; returns ``(N, P)`` masks."""
        for name, logits in (("student_patch_logits", student_patch_logits),
                             ("teacher_patch_logits", teacher_patch_logits)):
            if (not isinstance(logits, Tensor) or logits.ndim != 2 or logits.shape[-1] != self.num_prototypes
                    or not logits.is_floating_point()):
                got = tuple(logits.shape) if isinstance(logits, Tensor) else type(logits).__name__
                raise ValueError(f"{name} must be a floating-point tensor of shape (M, {self.num_prototypes}), got {got}.")
        if not isinstance(masks, Tensor) or masks.dtype != torch.bool or masks.ndim not in (2, 3) or masks.shape[0] < 1:
            got = f"{masks.dtype} {tuple(masks.shape)}" if isinstance(masks, Tensor) else type(masks).__name__
            raise ValueError(f"masks must be a bool tensor of shape (N, P) or (N, h, w) with N >= 1, got {got}.")
        masks = masks.flatten(1)
        num_masked = int(masks.sum())
        if student_patch_logits.shape[0] != num_masked or teacher_patch_logits.shape[0] != num_masked:
            raise ValueError(
                f"student_patch_logits and teacher_patch_logits must hold one row per masked patch ({num_masked}), "
                f"got {student_patch_logits.shape[0]} and {teacher_patch_logits.shape[0]}."
            )
        return masks

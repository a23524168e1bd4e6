"""The DINO multi-crop self-distillation loss (Caron et al. 2021): :class:`DinoLoss`.

Notation (shapes in brackets): ``S`` student crops, the first ``G`` of which are the views the
teacher saw, batch ``B``, ``K`` prototypes.

- teacher probabilities ``q_t = softmax((t_t - center) / tau_t)`` ``[G, B, K]`` (or a
  Sinkhorn-Knopp assignment, DINOv2: :mod:`dino_hf.losses.sinkhorn_knopp`), treated as constants;
  the centre ``[1, K]`` is an EMA of the batch-mean teacher logit, all-reduced over processes;
- student log-probabilities ``log p_s = log_softmax(s_s / tau_s)`` ``[S, B, K]``;
- the loss pairs every teacher crop with every student crop of another view::

      loss = 1 / (P * B) * sum_b sum_t sum_{s != t} <q_t, -log p_s>,   P = G * (S - 1) pairs,

  computed without the pair loop, its gradient in the same pass (:mod:`dino_hf.losses.cross_entropy`).

Next to the loss it reports collapse monitors from the same softmaxes (:data:`LOSS_STATISTICS`).
All probability math runs in at least float32 (float64 inputs stay float64), also under autocast
(:mod:`dino_hf.losses.precision`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor

from dino_hf.losses.cross_entropy import MultiCropCrossEntropy, cross_entropy_sum
from dino_hf.losses.precision import compute_dtype, full_precision
from dino_hf.losses.prototype_loss import PrototypeLoss
from dino_hf.losses.sinkhorn_knopp import distributed_world_size, sinkhorn_knopp
from dino_hf.losses.validation import (
    check_logits_tensor,
    check_multi_crop_logits,
    check_temperature,
)

#: The statistics :meth:`DinoLoss.forward` reports next to the loss (``DinoLossOutput.statistics``),
#: all 0-dim, detached, in nats:
#:
#: - ``teacher_entropy``: mean entropy of the per-sample teacher distributions ``q_t``; near 0 means
#:   the teacher is one-hot per image, near ln(K) that it is uniform (uniform collapse);
#: - ``teacher_mean_entropy``: entropy of the batch-mean teacher distribution; near 0 means every
#:   image goes to the same prototype (one-hot collapse);
#: - ``student_entropy``: mean entropy of the student distributions ``p_s`` over all its crops;
#: - ``teacher_student_kl``: mean ``KL(q_t || p_s)`` over the same (t, s != t) pairs as the loss,
#:   which is ``loss - teacher_entropy`` (``H(q, p) = H(q) + KL(q || p)``, and every teacher crop
#:   takes part in ``S - 1`` pairs, so the pairs' mean ``H(q_t)`` is ``teacher_entropy``): what the
#:   student can still learn. A loss that falls only because the teacher sharpens leaves it flat.
#:
#: Loss terms added later (iBOT, KoLeo) add their names here and to the dict.
LOSS_STATISTICS = ("teacher_entropy", "teacher_mean_entropy", "student_entropy", "teacher_student_kl")


@dataclass
class DinoLossOutput:
    """What :meth:`DinoLoss.forward` returns with ``return_statistics=True``.

    Attributes:
        loss: the DINO cross-entropy, 0-dim float32 (float64 for float64 logits).
        teacher_logits_mean: ``(1, K)``, this process's batch mean of the teacher logits: what the
            centre EMA consumes (:meth:`DinoLoss.update_center`, e.g. averaged over accumulation steps).
        statistics: ``{name: 0-dim tensor}`` for every name of :data:`LOSS_STATISTICS`, computed from
            the same teacher softmax and student log-softmax as the loss.
    """

    loss: Tensor
    teacher_logits_mean: Tensor
    statistics: dict[str, Tensor]

    @property
    def teacher_entropy(self) -> Tensor:
        return self.statistics["teacher_entropy"]

    @property
    def teacher_mean_entropy(self) -> Tensor:
        return self.statistics["teacher_mean_entropy"]


class DinoLoss(PrototypeLoss):
    """DINO loss: centred, sharpened teacher probabilities against every other student crop.

    Args:
        num_prototypes: ``K``, the output size of the projection head (65536 in DINO).
        student_temperature: ``tau_s`` of the student softmax (0.1 in DINO); must be > 0.
        center_momentum: EMA momentum of the centre (0.9 in DINO); in ``[0, 1]``.
        centering: ``"centering"`` (DINO: subtract the EMA centre before the teacher softmax) or
            ``"sinkhorn_knopp"`` (DINOv2: a few Sinkhorn-Knopp iterations over the global teacher
            batch instead; the centre is then neither used nor updated by ``forward``).
        sinkhorn_iterations: Sinkhorn-Knopp iterations (3 in DINOv2).

    Buffers:
        center: ``(1, K)`` float32, zeros at init, persistent (saved with the model).

    Example::

        loss_fn = DinoLoss(num_prototypes=65536)
        loss = loss_fn(student_logits, teacher_logits, teacher_temperature=0.04)
        # student_logits (num_crops, B, K), teacher_logits (num_global_crops, B, K)
    """

    def forward(
        self,
        student_logits: Tensor,
        teacher_logits: Tensor,
        teacher_temperature: float | Tensor,
        update_center: bool | None = None,
        return_statistics: bool = False,
    ) -> Tensor | DinoLossOutput:
        """Mean cross-entropy over all (teacher crop, other student crop) pairs and the batch.

        Args:
            student_logits: ``(num_crops, B, K)``; the first ``num_global_crops`` crops are the
                views the teacher saw, in the same order. Gradients flow into it.
            teacher_logits: ``(num_global_crops, B, K)``; never receives gradients.
            teacher_temperature: ``tau_t`` (> 0), a number or a 0-dim tensor (a tensor on an
                accelerator is not read back to the host, so its value is not checked).
            update_center: update the centre from ``teacher_logits`` after computing the loss;
                ``None`` means ``self.training``. Use ``False`` on gradient-accumulation
                micro-steps and call :meth:`update_center` once per optimiser step instead.
            return_statistics: return a :class:`DinoLossOutput` with the collapse monitors and the
                batch-mean teacher logit next to the loss, from the same teacher softmax.

        Returns:
            0-dim loss in float32 (float64 when the logits are float64), also under autocast; or a
            :class:`DinoLossOutput` holding it.
        """
        check_multi_crop_logits(student_logits, teacher_logits, self.num_prototypes)
        # One teacher softmax serves the loss and the statistics; it uses the center *before* this
        # step's update, as the official code does.
        teacher_probabilities = self.teacher_probabilities(teacher_logits, teacher_temperature)
        if return_statistics:
            loss, student_entropy = self.cross_entropy(student_logits, teacher_probabilities, return_student_entropy=True)
        else:
            loss = self.cross_entropy(student_logits, teacher_probabilities)
        teacher_logits_mean = self.teacher_logits_mean(teacher_logits)
        if update_center is None:
            update_center = self.training
        if update_center:
            self.update_center(teacher_logits_mean)
        if not return_statistics:
            return loss
        teacher_entropy, teacher_mean_entropy = self.teacher_statistics(teacher_probabilities)
        statistics = {
            "teacher_entropy": teacher_entropy,
            "teacher_mean_entropy": teacher_mean_entropy,
            "student_entropy": student_entropy,
            "teacher_student_kl": loss.detach() - teacher_entropy,
        }
        return DinoLossOutput(loss, teacher_logits_mean, statistics)

    def cross_entropy(
        self, student_logits: Tensor, teacher_probabilities: Tensor, return_student_entropy: bool = False
    ) -> Tensor | tuple[Tensor, Tensor]:
        """The loss from precomputed teacher probabilities (e.g. those of :meth:`teacher_probabilities`).

        Args:
            student_logits: ``(num_crops, B, K)``.
            teacher_probabilities: ``(num_global_crops, B, K)``, treated as constants.
            return_student_entropy: also return the mean entropy of the ``num_crops * B`` student
                distributions (0-dim, detached), computed in the same pass.

        Returns:
            0-dim mean over the ``num_global_crops * (num_crops - 1)`` pairs and the batch (and the
            student entropy).
        """
        check_multi_crop_logits(
            student_logits, teacher_probabilities, self.num_prototypes, teacher_name="teacher_probabilities"
        )
        num_crops, batch_size, _ = student_logits.shape
        normaliser = float(teacher_probabilities.shape[0] * (num_crops - 1) * batch_size)
        dtype = compute_dtype(student_logits, teacher_probabilities)
        with full_precision(student_logits.device):
            teacher_probabilities = teacher_probabilities.detach().to(dtype).contiguous()
            if torch.is_grad_enabled() and student_logits.requires_grad:
                loss, entropy = MultiCropCrossEntropy.apply(
                    student_logits, teacher_probabilities, self.student_temperature, normaliser
                )
            else:
                entropy = torch.zeros((), dtype=dtype, device=student_logits.device) if return_student_entropy else None
                total = cross_entropy_sum(
                    student_logits.detach(), teacher_probabilities, self.student_temperature, None, entropy
                )
                loss = total / normaliser
                if entropy is not None:
                    entropy /= num_crops * batch_size
        return (loss, entropy) if return_student_entropy else loss

    @torch.no_grad()
    def teacher_probabilities(
        self, teacher_logits: Tensor, teacher_temperature: float | Tensor
    ) -> Tensor:
        """Teacher targets: centred and sharpened softmax, or the Sinkhorn-Knopp assignment.

        Args:
            teacher_logits: ``(num_global_crops, B, K)``.
            teacher_temperature: ``tau_t`` (> 0), a number or a 0-dim tensor.

        Returns:
            ``(num_global_crops, B, K)`` probabilities (each row sums to 1) in float32 (float64
            for float64 logits), without gradient.
        """
        check_logits_tensor("teacher_logits", teacher_logits, self.num_prototypes)
        temperature = check_temperature(teacher_temperature)
        dtype = compute_dtype(teacher_logits)
        with full_precision(teacher_logits.device):
            logits = teacher_logits.detach().to(dtype)
            temperature = self._temperature_like(temperature, logits)
            if self.centering == "centering":
                return self._centred_softmax(logits, temperature)
            return self._sinkhorn_knopp(logits / temperature)

    @torch.no_grad()
    def _sinkhorn_knopp(self, scaled_logits: Tensor) -> Tensor:
        """DINOv2's Sinkhorn-Knopp teacher: equipartition over prototypes across all processes.

        Args:
            scaled_logits: ``(G, B, K)`` teacher logits already divided by ``tau_t``.

        Returns:
            ``(G, B, K)``: every sample's row sums to 1; after enough iterations each prototype
            receives ``G * B * world_size / K`` of the mass in total.
        """
        num_global_crops, batch_size, num_prototypes = scaled_logits.shape
        assignment = sinkhorn_knopp(scaled_logits.reshape(-1, num_prototypes), self.sinkhorn_iterations)
        return assignment.reshape(num_global_crops, batch_size, num_prototypes)

    @staticmethod
    @torch.no_grad()
    def teacher_logits_mean(teacher_logits: Tensor) -> Tensor:
        """This process's mean teacher logit over crops and batch: ``(G, B, K)`` -> ``(1, K)``.

        Computed in at least float32 and detached; feed it (or its mean over accumulation
        micro-steps) to :meth:`update_center`.
        """
        dtype = compute_dtype(teacher_logits)
        leading_dims = tuple(range(teacher_logits.ndim - 1))
        return teacher_logits.detach().mean(dim=leading_dims, dtype=dtype).unsqueeze(0)

    @torch.no_grad()
    def update_center(self, teacher_logits_mean: Tensor, apply: Tensor | None = None) -> None:
        """EMA update of the centre: ``center <- m * center + (1 - m) * mean`` (DINO centering only).

        With ``centering="sinkhorn_knopp"`` there is no centre to update and nothing happens.

        Args:
            teacher_logits_mean: ``(1, K)`` (or ``(K,)``), this process's batch-mean teacher
                logit. When ``torch.distributed`` is initialised it is averaged over all
                processes first (an all-reduce), as in the official code.
            apply: optional 0-dim bool tensor; where it is False the centre keeps its value. The
                training loop passes "this step was finite", decided on the device, so that a
                skipped step leaves the centre untouched without a host sync.
        """
        if self.centering != "centering":
            return
        if (
            not isinstance(teacher_logits_mean, Tensor)
            or teacher_logits_mean.shape[-1:] != (self.num_prototypes,)
            or teacher_logits_mean.numel() != self.num_prototypes
        ):
            shape = (
                tuple(teacher_logits_mean.shape)
                if isinstance(teacher_logits_mean, Tensor)
                else type(teacher_logits_mean).__name__
            )
            raise ValueError(
                f"teacher_logits_mean must be a tensor of shape (1, {self.num_prototypes}), "
                f"got {shape}."
            )
        batch_center = teacher_logits_mean.detach().reshape(1, self.num_prototypes)
        batch_center = batch_center.to(
            device=self.center.device, dtype=self.center.dtype, copy=True
        )
        world_size = distributed_world_size()
        if world_size > 1:
            dist.all_reduce(batch_center)
            batch_center /= world_size
        previous = self.center.clone() if apply is not None else None
        self.center.mul_(self.center_momentum).add_(batch_center, alpha=1.0 - self.center_momentum)
        if previous is not None:
            self.center.copy_(torch.where(apply, self.center, previous))

    @staticmethod
    @torch.no_grad()
    def teacher_statistics(teacher_probabilities: Tensor) -> tuple[Tensor, Tensor]:
        """Collapse monitors from teacher probabilities ``(..., K)``, e.g. ``(G, B, K)``.

        Returns:
            ``(mean per-sample entropy, entropy of the mean distribution)``, both 0-dim,
            detached, in nats (float32 or float64). The first tends to 0 under one-hot
            collapse; both sit at ``ln K`` under uniform collapse.
        """
        probabilities = teacher_probabilities.detach()
        probabilities = probabilities.to(compute_dtype(probabilities))
        probabilities = probabilities.reshape(-1, probabilities.shape[-1])
        sample_entropy = torch.special.entr(probabilities).sum(dim=-1).mean()
        mean_entropy = torch.special.entr(probabilities.mean(dim=0)).sum()
        return sample_entropy, mean_entropy

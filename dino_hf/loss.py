"""The DINO multi-crop self-distillation loss (Caron et al. 2021), computed without the pair loop,
and the two terms DINOv2 adds (Oquab et al. 2024): the iBOT masked-patch loss
(:class:`IBOTPatchLoss`) and the KoLeo regulariser (:class:`KoLeoLoss`); the Sinkhorn-Knopp teacher
(:func:`sinkhorn_knopp`) serves both teachers.

Notation (shapes in brackets): ``S`` student crops, the first ``G`` of which are the views the
teacher saw, batch ``B``, ``K`` prototypes.

- teacher probabilities ``q_t = softmax((t_t - center) / tau_t)`` ``[G, B, K]`` (or a
  Sinkhorn-Knopp assignment, DINOv2), treated as constants;
- student log-probabilities ``log p_s = log_softmax(s_s / tau_s)`` ``[S, B, K]``;
- the official loss pairs every teacher crop with every student crop of another view::

      loss = 1 / (P * B) * sum_b sum_t sum_{s != t} <q_t, -log p_s>,   P = G * (S - 1) pairs.

Writing ``Q = sum_t q_t`` ``[B, K]``, the double sum is exactly::

      sum_s <Q, -log p_s>  -  sum_{t < G} <q_t, -log p_t>,

so each student crop needs one log-softmax and two dot products at most, instead of one
log-softmax per pair (22 for 2 global + 10 local crops). The gradient with respect to the scaled
student logits is just as direct: ``c_s * softmax(s_s / tau_s) - W_s`` with ``W_s = Q - q_s`` for
``s < G``, ``W_s = Q`` otherwise, and ``c_s`` the row sums of ``W_s``. :class:`DinoLoss`
computes both in one pass over the student logits, in chunks small enough to stay in the CPU
cache, and hands the stored gradient back in ``backward`` (see :class:`_MultiCropCrossEntropy`).

All probability math runs in at least float32 (float64 inputs stay float64), also under autocast.
"""

from __future__ import annotations

import contextlib
import math
import numbers
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

CENTERING_METHODS = ("centering", "sinkhorn_knopp")

# On CPU the student logits are processed in row chunks of about this many bytes, so that the
# scaled logits, their log-softmax and the gradient of a chunk stay in the L2/L3 cache between
# the few passes made over them, which is faster than whole-crop passes (benchmarks/RESULTS.md,
# "Figures from code comments").
_CPU_CHUNK_BYTES = 2 * 1024 * 1024


def _distributed_world_size() -> int:
    """Number of processes when a ``torch.distributed`` process group is initialised, else 1."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return 1


def _full_precision(device: torch.device) -> contextlib.AbstractContextManager:
    """A context that switches autocast off on ``device`` (a no-op where autocast does not exist)."""
    if torch.amp.is_autocast_available(device.type):
        return torch.autocast(device_type=device.type, enabled=False)
    return contextlib.nullcontext()


def _compute_dtype(*tensors: Tensor) -> torch.dtype:
    """float32, or float64 when any input is float64: never half precision."""
    dtype = torch.float32
    for tensor in tensors:
        dtype = torch.promote_types(dtype, tensor.dtype)
    return dtype


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
    distributed = _distributed_world_size() > 1
    if num_samples is None:
        num_samples = scaled_logits.shape[0] * _distributed_world_size()
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


def _cross_entropy_sum(
    student_logits: Tensor,
    teacher_probabilities: Tensor,
    student_temperature: float,
    gradient: Tensor | None,
    student_entropy: Tensor | None = None,
) -> Tensor:
    """Sum over pairs and batch of ``<q_t, -log p_s>`` (s != t), optionally with its gradient.

    Args:
        student_logits: ``(S, B, K)`` raw student logits, any floating dtype.
        teacher_probabilities: ``(G, B, K)`` contiguous, in the compute dtype.
        student_temperature: ``tau_s``.
        gradient: ``None``, or an ``(S, B, K)`` buffer in the compute dtype that receives
            ``-(c_s * softmax(s_s / tau_s) - W_s)``, the negated gradient of the returned sum
            with respect to the *scaled* logits ``s_s / tau_s``.
        student_entropy: ``None``, or a 0-dim buffer in the compute dtype to which the summed
            entropy ``-<p_s, log p_s>`` of every student row (``S * B`` of them) is added, from the
            chunk already in the cache (one extra dot product per chunk, no extra pass).

    Returns:
        0-dim tensor in the compute dtype: the unnormalised sum (divide by ``P * B``).
    """
    num_crops, batch_size, num_prototypes = student_logits.shape
    num_global_crops = teacher_probabilities.shape[0]
    dtype = teacher_probabilities.dtype
    total_probabilities = teacher_probabilities.sum(dim=0)  # Q, (B, K)
    total_mass = total_probabilities.sum(dim=-1, keepdim=True)  # row sums of Q, (B, 1)
    crop_mass = teacher_probabilities.sum(dim=-1, keepdim=True)  # row sums of q_t, (G, B, 1)

    if student_logits.device.type == "cpu":
        element_size = torch.finfo(dtype).bits // 8
        chunk_rows = max(1, _CPU_CHUNK_BYTES // (num_prototypes * element_size))
    else:  # accelerators: one crop per step keeps kernels large and launches few
        chunk_rows = batch_size
    chunk_rows = min(chunk_rows, batch_size)
    log_probabilities = torch.empty(
        (chunk_rows, num_prototypes), dtype=dtype, device=student_logits.device
    )
    scaled = torch.empty_like(log_probabilities) if gradient is None else None
    total = torch.zeros((), dtype=dtype, device=student_logits.device)

    for crop in range(num_crops):
        is_teacher_view = crop < num_global_crops
        for start in range(0, batch_size, chunk_rows):
            rows = slice(start, start + chunk_rows)
            count = min(chunk_rows, batch_size - start)
            # z = s / tau_s in the compute dtype; written where the gradient of this chunk goes
            z = gradient[crop, rows] if gradient is not None else scaled[:count]
            z.copy_(student_logits[crop, rows]).div_(student_temperature)
            log_p = torch.log_softmax(z, dim=-1, out=log_probabilities[:count])
            weights = total_probabilities[rows]  # Q rows, (count, K)
            total -= torch.dot(weights.reshape(-1), log_p.reshape(-1))
            if is_teacher_view:  # remove the pair (t, t): same view for teacher and student
                own = teacher_probabilities[crop, rows]
                total += torch.dot(own.reshape(-1), log_p.reshape(-1))
            if gradient is None:
                if student_entropy is not None:  # z is free again: it receives p = exp(log p)
                    student_entropy -= torch.dot(torch.exp(log_p, out=z).reshape(-1), log_p.reshape(-1))
                continue
            if student_entropy is not None:
                # H(p) = logsumexp(z) - <p, z> (rows of p sum to 1); logsumexp(z) = z - log p in any
                # column, and <p, z> is taken below once log_p holds p, before z is overwritten.
                student_entropy += (z[:, 0] - log_p[:, 0]).sum()
            mass = total_mass[rows]
            if is_teacher_view:
                mass = mass - crop_mass[crop, rows]
            # -(c * softmax(z) - W) = W - c * softmax(z), with W = Q (- q_t for the same view)
            probabilities = log_p.exp_()
            if student_entropy is not None:
                student_entropy -= torch.dot(probabilities.reshape(-1), z.reshape(-1))
            torch.addcmul(weights, probabilities, mass, value=-1.0, out=z)
            if is_teacher_view:
                z.sub_(own)
    return total


class _MultiCropCrossEntropy(torch.autograd.Function):
    """Autograd wrapper: the forward pass also computes the gradient, the backward pass scales it.

    The gradient costs one extra in-cache pass per chunk during the forward pass, while the
    data is hot, instead of a second sweep over the ``(S, B, K)`` logits during ``backward``.
    """

    @staticmethod
    def forward(
        ctx: Any,
        student_logits: Tensor,
        teacher_probabilities: Tensor,
        student_temperature: float,
        normaliser: float,
    ) -> tuple[Tensor, Tensor]:
        """``(S, B, K)`` logits, ``(G, B, K)`` constant probabilities -> 0-dim mean loss and the
        0-dim mean student entropy (a statistic: not differentiable)."""
        dtype = teacher_probabilities.dtype
        gradient = torch.empty(student_logits.shape, dtype=dtype, device=student_logits.device)
        entropy = torch.zeros((), dtype=dtype, device=student_logits.device)
        total = _cross_entropy_sum(
            student_logits, teacher_probabilities, student_temperature, gradient, entropy
        )
        ctx.gradient = gradient  # -(d total / d z); consumed by the first backward call
        ctx.student_temperature = student_temperature
        ctx.normaliser = normaliser
        ctx.save_for_backward(student_logits, teacher_probabilities)
        entropy /= student_logits.shape[0] * student_logits.shape[1]
        ctx.mark_non_differentiable(entropy)
        return total / normaliser, entropy

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad_output: Tensor, _grad_entropy: Tensor | None = None) -> tuple[Tensor, None, None, None]:
        """Gradient with respect to the student logits only (the teacher is a constant)."""
        gradient = ctx.gradient
        ctx.gradient = None
        student_logits, teacher_probabilities = ctx.saved_tensors
        if gradient is None:  # second call (retain_graph=True): recompute, the buffer is spent
            gradient = torch.empty(
                student_logits.shape,
                dtype=teacher_probabilities.dtype,
                device=student_logits.device,
            )
            _cross_entropy_sum(
                student_logits, teacher_probabilities, ctx.student_temperature, gradient
            )
        # d loss / d s = (1 / normaliser) * (1 / tau_s) * (c * softmax - W)
        factor = grad_output.to(gradient.dtype) * (
            -1.0 / (ctx.normaliser * ctx.student_temperature)
        )
        gradient.mul_(factor)
        return gradient.to(student_logits.dtype), None, None, None


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


class DinoLoss(nn.Module):
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

    center: Tensor

    def __init__(
        self,
        num_prototypes: int,
        student_temperature: float = 0.1,
        center_momentum: float = 0.9,
        centering: str = "centering",
        sinkhorn_iterations: int = 3,
    ) -> None:
        super().__init__()
        if not _is_positive_integer(num_prototypes):
            raise ValueError(f"num_prototypes must be a positive integer, got {num_prototypes!r}.")
        _check_positive_number("student_temperature", student_temperature)
        if not _is_real(center_momentum) or not 0.0 <= center_momentum <= 1.0:
            raise ValueError(
                f"center_momentum must be a number in [0, 1], got {center_momentum!r}."
            )
        if centering not in CENTERING_METHODS:
            raise ValueError(
                f"centering must be one of {', '.join(map(repr, CENTERING_METHODS))}, "
                f"got {centering!r}."
            )
        if not _is_positive_integer(sinkhorn_iterations):
            raise ValueError(
                f"sinkhorn_iterations must be a positive integer, got {sinkhorn_iterations!r}."
            )
        self.num_prototypes = int(num_prototypes)
        self.student_temperature = float(student_temperature)
        self.center_momentum = float(center_momentum)
        self.centering = centering
        self.sinkhorn_iterations = int(sinkhorn_iterations)
        self.register_buffer("center", torch.zeros(1, self.num_prototypes), persistent=True)

    def extra_repr(self) -> str:
        return (
            f"num_prototypes={self.num_prototypes}, student_temperature={self.student_temperature}, "
            f"center_momentum={self.center_momentum}, centering={self.centering!r}"
        )

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
        self._check_logits(student_logits, teacher_logits)
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
        self._check_logits(
            student_logits, teacher_probabilities, teacher_name="teacher_probabilities"
        )
        num_crops, batch_size, _ = student_logits.shape
        normaliser = float(teacher_probabilities.shape[0] * (num_crops - 1) * batch_size)
        dtype = _compute_dtype(student_logits, teacher_probabilities)
        with _full_precision(student_logits.device):
            teacher_probabilities = teacher_probabilities.detach().to(dtype).contiguous()
            if torch.is_grad_enabled() and student_logits.requires_grad:
                loss, entropy = _MultiCropCrossEntropy.apply(
                    student_logits, teacher_probabilities, self.student_temperature, normaliser
                )
            else:
                entropy = torch.zeros((), dtype=dtype, device=student_logits.device) if return_student_entropy else None
                total = _cross_entropy_sum(
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
        _check_logits_tensor("teacher_logits", teacher_logits, self.num_prototypes)
        temperature = _check_temperature(teacher_temperature)
        dtype = _compute_dtype(teacher_logits)
        with _full_precision(teacher_logits.device):
            logits = teacher_logits.detach().to(dtype)
            if isinstance(temperature, Tensor):
                # a 0-dim CPU tensor mixes with accelerator tensors without a copy or a sync
                temperature = temperature.detach().to(dtype)
                if temperature.device.type != "cpu":
                    temperature = temperature.to(logits.device)
            if self.centering == "centering":
                return torch.softmax((logits - self.center.to(dtype)) / temperature, dim=-1)
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
        dtype = _compute_dtype(teacher_logits)
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
        world_size = _distributed_world_size()
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
        probabilities = probabilities.to(_compute_dtype(probabilities))
        probabilities = probabilities.reshape(-1, probabilities.shape[-1])
        sample_entropy = torch.special.entr(probabilities).sum(dim=-1).mean()
        mean_entropy = torch.special.entr(probabilities.mean(dim=0)).sum()
        return sample_entropy, mean_entropy

    def _check_logits(
        self, student_logits: Tensor, teacher_logits: Tensor, teacher_name: str = "teacher_logits"
    ) -> None:
        """ValueError (one sentence) unless the shapes form a valid multi-crop batch."""
        _check_logits_tensor("student_logits", student_logits, self.num_prototypes)
        _check_logits_tensor(teacher_name, teacher_logits, self.num_prototypes)
        num_crops, batch_size, _ = student_logits.shape
        num_global_crops, teacher_batch_size, _ = teacher_logits.shape
        if teacher_batch_size != batch_size:
            raise ValueError(
                f"{teacher_name} must have the batch size of student_logits ({batch_size}) in "
                f"dimension 1, got {teacher_batch_size}."
            )
        if num_crops < 2:
            raise ValueError(
                "student_logits must hold at least 2 crops in total (dimension 0 >= 2), "
                f"got {num_crops}."
            )
        if num_global_crops > num_crops:
            raise ValueError(
                f"{teacher_name} must not hold more crops than student_logits ({num_crops}) in "
                f"dimension 0, got {num_global_crops}."
            )



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


class IBOTPatchLoss(nn.Module):
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

    center: Tensor

    def __init__(
        self,
        num_prototypes: int,
        student_temperature: float = 0.1,
        center_momentum: float = 0.9,
        centering: str = "centering",
        sinkhorn_iterations: int = 3,
    ) -> None:
        super().__init__()
        # the same checks and buffers as the DINO loss (one rule for both heads)
        reference = DinoLoss(num_prototypes, student_temperature, center_momentum, centering, sinkhorn_iterations)
        self.num_prototypes = reference.num_prototypes
        self.student_temperature = reference.student_temperature
        self.center_momentum = reference.center_momentum
        self.centering = reference.centering
        self.sinkhorn_iterations = reference.sinkhorn_iterations
        self.register_buffer("center", torch.zeros(1, self.num_prototypes), persistent=True)

    def extra_repr(self) -> str:
        return (
            f"num_prototypes={self.num_prototypes}, student_temperature={self.student_temperature}, "
            f"center_momentum={self.center_momentum}, centering={self.centering!r}"
        )

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
        dtype = _compute_dtype(teacher_patch_logits)
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
        dtype = _compute_dtype(student_patch_logits, teacher_probabilities)
        with _full_precision(student_patch_logits.device):
            log_probabilities = torch.log_softmax(student_patch_logits.to(dtype) / self.student_temperature, dim=-1)
            per_patch = -(teacher_probabilities.detach().to(dtype) * log_probabilities).sum(dim=-1)  # (M,)
            weights = patches_per_crop.to(dtype).reciprocal()[crop_index]
            return (per_patch * weights).sum() / num_crops

    @torch.no_grad()
    def teacher_probabilities(self, teacher_patch_logits: Tensor, teacher_temperature: float | Tensor) -> Tensor:
        """``(M, K)`` teacher targets: centred and sharpened softmax, or Sinkhorn-Knopp over the masked
        patches of all processes (their total count is all-reduced)."""
        temperature = _check_temperature(teacher_temperature)
        dtype = _compute_dtype(teacher_patch_logits)
        with _full_precision(teacher_patch_logits.device):
            logits = teacher_patch_logits.detach().to(dtype)
            if isinstance(temperature, Tensor):
                temperature = temperature.detach().to(dtype)
                if temperature.device.type != "cpu":
                    temperature = temperature.to(logits.device)
            if self.centering == "centering":
                return torch.softmax((logits - self.center.to(dtype)) / temperature, dim=-1)
            num_samples = torch.full((), float(logits.shape[0]), dtype=dtype, device=logits.device)
            if _distributed_world_size() > 1:
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
        if _distributed_world_size() > 1:
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
        _check_positive_number("eps", eps)
        if not _is_real(duplicate_tolerance) or duplicate_tolerance < 0:
            raise ValueError(f"duplicate_tolerance must be 0 or more, got {duplicate_tolerance!r}.")
        self.eps = float(eps)
        self.duplicate_tolerance = float(duplicate_tolerance)

    def forward(self, features: Tensor) -> Tensor:
        """``(N, D)`` features (any scale: normalised here) -> 0-dim loss, float32 (float64 for float64)."""
        if not isinstance(features, Tensor) or features.ndim != 2 or not features.is_floating_point():
            got = tuple(features.shape) if isinstance(features, Tensor) else type(features).__name__
            raise ValueError(f"features must be a floating-point tensor of shape (N, D), got {got}.")
        dtype = _compute_dtype(features)
        with _full_precision(features.device):
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


def _is_real(value: object) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _is_positive_integer(value: object) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool) and value >= 1


def _check_positive_number(name: str, value: object) -> None:
    if not _is_real(value) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a positive finite number, got {value!r}.")


def _check_temperature(teacher_temperature: float | Tensor) -> float | Tensor:
    """Validate ``tau_t``; a CPU tensor is checked, an accelerator tensor is not (no host sync)."""
    if isinstance(teacher_temperature, Tensor):
        if teacher_temperature.ndim != 0 or not teacher_temperature.is_floating_point():
            raise ValueError(
                "teacher_temperature must be a positive number or a 0-dim floating-point tensor, "
                f"got a {teacher_temperature.dtype} tensor of shape {tuple(teacher_temperature.shape)}."
            )
        if teacher_temperature.device.type == "cpu":
            _check_positive_number("teacher_temperature", teacher_temperature.item())
        return teacher_temperature
    _check_positive_number("teacher_temperature", teacher_temperature)
    return float(teacher_temperature)


def _check_logits_tensor(name: str, logits: object, num_prototypes: int) -> None:
    """``logits`` must be a floating-point ``(crops >= 1, batch >= 1, num_prototypes)`` tensor."""
    expected = f"(num_crops, batch_size, {num_prototypes})"
    if not isinstance(logits, Tensor) or logits.ndim != 3 or logits.shape[-1] != num_prototypes:
        got = tuple(logits.shape) if isinstance(logits, Tensor) else type(logits).__name__
        raise ValueError(f"{name} must be a tensor of shape {expected}, got {got}.")
    if logits.shape[0] < 1 or logits.shape[1] < 1:
        raise ValueError(
            f"{name} must have at least one crop and one sample, got shape {tuple(logits.shape)}."
        )
    if not logits.is_floating_point():
        raise ValueError(f"{name} must be a floating-point tensor, got {logits.dtype}.")

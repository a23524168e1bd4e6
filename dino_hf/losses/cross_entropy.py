"""The DINO multi-crop cross-entropy without the pair loop, and its gradient in the same pass.

Notation (shapes in brackets): ``S`` student crops, the first ``G`` of which are the views the
teacher saw, batch ``B``, ``K`` prototypes; teacher probabilities ``q_t`` ``[G, B, K]`` (constants),
student log-probabilities ``log p_s = log_softmax(s_s / tau_s)`` ``[S, B, K]``. The official loss
pairs every teacher crop with every student crop of another view::

      loss = 1 / (P * B) * sum_b sum_t sum_{s != t} <q_t, -log p_s>,   P = G * (S - 1) pairs.

Writing ``Q = sum_t q_t`` ``[B, K]``, the double sum is exactly::

      sum_s <Q, -log p_s>  -  sum_{t < G} <q_t, -log p_t>,

so each student crop needs one log-softmax and two dot products at most, instead of one
log-softmax per pair (22 for 2 global + 10 local crops). The gradient with respect to the scaled
student logits is just as direct: ``c_s * softmax(s_s / tau_s) - W_s`` with ``W_s = Q - q_s`` for
``s < G``, ``W_s = Q`` otherwise, and ``c_s`` the row sums of ``W_s``. :func:`cross_entropy_sum`
computes both in one pass over the student logits, in chunks small enough to stay in the CPU
cache, and :class:`MultiCropCrossEntropy` hands the stored gradient back in ``backward``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

# On CPU the student logits are processed in row chunks of about this many bytes, so that the
# scaled logits, their log-softmax and the gradient of a chunk stay in the L2/L3 cache between
# the few passes made over them, which is faster than whole-crop passes (benchmarks/RESULTS.md,
# "Figures from code comments").
_CPU_CHUNK_BYTES = 2 * 1024 * 1024


def cross_entropy_sum(
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


class MultiCropCrossEntropy(torch.autograd.Function):
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
        total = cross_entropy_sum(
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
            cross_entropy_sum(
                student_logits, teacher_probabilities, ctx.student_temperature, gradient
            )
        # d loss / d s = (1 / normaliser) * (1 / tau_s) * (c * softmax - W)
        factor = grad_output.to(gradient.dtype) * (
            -1.0 / (ctx.normaliser * ctx.student_temperature)
        )
        gradient.mul_(factor)
        return gradient.to(student_logits.dtype), None, None, None

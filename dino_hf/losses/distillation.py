"""Distillation from a frozen teacher: :class:`DistillationLoss`, the terms a student learns a foundation
model's features by (LightlyTrain's ``distillation`` v1/v2/v3, DINOv3's distilled small models).

Notation (shapes in brackets): ``N`` global crops of the batch (``num_global_crops * batch``), ``D`` the
teacher's width, ``Q`` the queue of past teacher embeddings, ``h x w`` the student's feature grid.

- ``cosine``: ``1 - cos(s, t)`` averaged over the crops, ``s`` [N, D] the student's embedding through its
  learned projector, ``t`` [N, D] the teacher's embedding of the same crop;
- ``soft`` (soft targets, as LightlyTrain v1 and SEED): both embeddings, L2-normalised, are compared with
  the queue ``[Q, D]`` of earlier teacher embeddings; the teacher's ``softmax(t . queue / tau_t)`` is the
  target of the student's ``log_softmax(s . queue / tau_s)`` (cross-entropy, mean over the crops). The
  queue is then refreshed with this step's teacher embeddings (gathered over processes, FIFO), so every
  process keeps the same queue;
- ``dense`` (LightlyTrain v2): the student's feature map through a learned 1x1 projection ``[N, D, h, w]``
  against the teacher's patch tokens resized (bilinear) to the same ``h x w``; both L2-normalised per
  position, the loss is their mean squared difference (``2 - 2 cos`` per position, averaged).

All arithmetic is float32 at least, also under autocast (:mod:`dino_hf.losses.precision`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from dino_hf.losses.precision import compute_dtype, full_precision
from dino_hf.losses.sinkhorn_knopp import distributed_world_size
from dino_hf.losses.validation import check_positive_integer, check_positive_number

__all__ = ["DISTILLATION_TERMS", "DistillationLoss", "DistillationLossOutput"]

#: The terms, by their name in the metrics (``distillation_<term>_loss``) and the config
#: (``distillation_<term>_weight``).
DISTILLATION_TERMS = ("cosine", "soft", "dense")


@dataclass
class DistillationLossOutput:
    """What :meth:`DistillationLoss.forward` returns: the weighted sum and each computed term (0-dim)."""

    loss: Tensor
    terms: dict[str, Tensor]


class DistillationLoss(nn.Module):
    """The distillation terms of the module docstring, weighted; the queue of teacher embeddings is a buffer
    (it travels with the model's state, so a resumed run continues with the same queue).

    Args:
        embedding_size: ``D``, the teacher's embedding width.
        cosine_weight, soft_weight, dense_weight: the terms' weights (0 leaves a term out).
        queue_size: ``Q``, teacher embeddings the soft targets are computed over.
        student_temperature, teacher_temperature: ``tau_s`` and ``tau_t`` of the soft targets (a sharper
            teacher, as in DINO).
    """

    def __init__(self, embedding_size: int, cosine_weight: float = 1.0, soft_weight: float = 0.0,
                 dense_weight: float = 0.0, queue_size: int = 4096, student_temperature: float = 0.1,
                 teacher_temperature: float = 0.04) -> None:
        super().__init__()
        check_positive_integer("embedding_size", embedding_size)
        check_positive_integer("queue_size", queue_size)
        check_positive_number("student_temperature", student_temperature)
        check_positive_number("teacher_temperature", teacher_temperature)
        self.weights = {"cosine": float(cosine_weight), "soft": float(soft_weight), "dense": float(dense_weight)}
        if not any(weight > 0 for weight in self.weights.values()):
            raise ValueError("At least one distillation term needs a weight above 0 (cosine, soft or dense).")
        self.student_temperature = float(student_temperature)
        self.teacher_temperature = float(teacher_temperature)
        # Random unit vectors until the queue has been filled once (as MoCo's queue): a fixed, seeded start.
        generator = torch.Generator().manual_seed(0)
        queue = F.normalize(torch.randn(queue_size, embedding_size, generator=generator), dim=1)
        self.register_buffer("queue", queue if self.weights["soft"] > 0 else queue[:0], persistent=True)
        self.register_buffer("queue_position", torch.zeros((), dtype=torch.long), persistent=True)

    @property
    def uses_dense(self) -> bool:
        """Whether the student's feature map is needed (the dense term has a weight)."""
        return self.weights["dense"] > 0

    def forward(self, student_embedding: Tensor, teacher_embedding: Tensor, student_map: Tensor | None = None,
                teacher_map: Tensor | None = None, update_queue: bool = True) -> DistillationLossOutput:
        """The weighted terms.

        Args:
            student_embedding: ``(N, D)``, the student's projected embedding of each global crop.
            teacher_embedding: ``(N, D)``, the teacher's embedding of the same crops (no gradient).
            student_map: ``(N, D, h, w)``, the student's projected feature map (the dense term only).
            teacher_map: ``(N, D, H, W)``, the teacher's patch tokens on its own grid (the dense term only).
            update_queue: refresh the queue with ``teacher_embedding`` (the soft term only; off to evaluate).
        Raises:
            ValueError: shapes that do not match (one sentence).
        """
        if student_embedding.shape != teacher_embedding.shape or student_embedding.ndim != 2:
            raise ValueError(f"student and teacher embeddings must both be (N, D), got {tuple(student_embedding.shape)} "
                             f"and {tuple(teacher_embedding.shape)}.")
        with full_precision(student_embedding.device):  # autocast would run the products in half precision
            return self._terms(student_embedding, teacher_embedding, student_map, teacher_map, update_queue)

    def _terms(self, student_embedding: Tensor, teacher_embedding: Tensor, student_map: Tensor | None,
               teacher_map: Tensor | None, update_queue: bool) -> DistillationLossOutput:
        dtype = compute_dtype(student_embedding)
        student = F.normalize(student_embedding.to(dtype), dim=1)
        teacher = F.normalize(teacher_embedding.detach().to(dtype), dim=1)
        terms: dict[str, Tensor] = {}
        if self.weights["cosine"] > 0:
            terms["cosine"] = 1.0 - (student * teacher).sum(dim=1).mean()
        if self.weights["soft"] > 0:
            queue = self.queue.to(dtype, copy=True)  # the graph keeps this copy: the queue is refreshed below
            targets = torch.softmax(teacher @ queue.T / self.teacher_temperature, dim=1)
            log_predictions = torch.log_softmax(student @ queue.T / self.student_temperature, dim=1)
            terms["soft"] = -(targets * log_predictions).sum(dim=1).mean()
            if update_queue and self.training:
                self._enqueue(teacher)
        if self.weights["dense"] > 0:
            if student_map is None or teacher_map is None:
                raise ValueError("The dense distillation term needs the student's and the teacher's feature maps.")
            terms["dense"] = _dense_term(student_map.to(dtype), teacher_map.detach().to(dtype))
        loss = sum(self.weights[name] * value for name, value in terms.items())
        return DistillationLossOutput(loss=loss, terms=terms)

    @torch.no_grad()
    def _enqueue(self, teacher: Tensor) -> None:
        """FIFO: this step's normalised teacher embeddings, of every process, replace the oldest entries."""
        if distributed_world_size() > 1:
            gathered = [torch.empty_like(teacher) for _ in range(dist.get_world_size())]
            dist.all_gather(gathered, teacher.contiguous())
            teacher = torch.cat(gathered)
        size = self.queue.shape[0]
        teacher = teacher[-size:].to(self.queue.dtype)
        positions = (self.queue_position + torch.arange(teacher.shape[0], device=teacher.device)) % size
        self.queue.index_copy_(0, positions, teacher)
        self.queue_position.copy_((self.queue_position + teacher.shape[0]) % size)


def _dense_term(student_map: Tensor, teacher_map: Tensor) -> Tensor:
    """Mean over positions of ``|| s/|s| - t/|t| ||^2``, the teacher map resized to the student's grid."""
    if student_map.ndim != 4 or teacher_map.ndim != 4 or student_map.shape[:2] != teacher_map.shape[:2]:
        raise ValueError(f"feature maps must be (N, D, h, w) with the same N and D, got {tuple(student_map.shape)} and "
                         f"{tuple(teacher_map.shape)}.")
    if teacher_map.shape[-2:] != student_map.shape[-2:]:
        teacher_map = F.interpolate(teacher_map, size=student_map.shape[-2:], mode="bilinear", align_corners=False)
    student = F.normalize(student_map, dim=1)
    teacher = F.normalize(teacher_map, dim=1)
    return (student - teacher).square().sum(dim=1).mean()


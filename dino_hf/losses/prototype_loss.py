"""What DINO's and iBOT's losses share: a student learning a sharpened teacher distribution over a
head's ``K`` prototypes, with the teacher centred by an EMA centre ``[1, K]`` (or balanced by
Sinkhorn-Knopp), and the settings of that, with their defaults, written once.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from dino_hf.base.official_recipe import (
    DEFAULT_TEACHER_CENTERING,
    DINOV2_SINKHORN_ITERATIONS,
    OFFICIAL_CENTER_MOMENTUM,
    OFFICIAL_STUDENT_TEMPERATURE,
)
from dino_hf.losses.validation import check_loss_settings


class PrototypeLoss(nn.Module):
    """The settings and the centre of a prototype loss (:class:`~dino_hf.losses.dino.DinoLoss`,
    :class:`~dino_hf.losses.ibot.IBOTPatchLoss`), validated by one rule.

    Args:
        num_prototypes: ``K``, the head's output dimension.
        student_temperature: ``tau_s`` (official 0.1).
        center_momentum: EMA momentum of the centre (official 0.9).
        centering: ``"centering"`` (DINO) or ``"sinkhorn_knopp"`` (DINOv2's large runs).
        sinkhorn_iterations: Sinkhorn-Knopp iterations (3 in DINOv2).

    Buffers:
        center: ``(1, K)`` float32, zeros at init, persistent.
    """

    center: Tensor

    def __init__(
        self,
        num_prototypes: int,
        student_temperature: float = OFFICIAL_STUDENT_TEMPERATURE,
        center_momentum: float = OFFICIAL_CENTER_MOMENTUM,
        centering: str = DEFAULT_TEACHER_CENTERING,
        sinkhorn_iterations: int = DINOV2_SINKHORN_ITERATIONS,
    ) -> None:
        super().__init__()
        check_loss_settings(num_prototypes, student_temperature, center_momentum, centering, sinkhorn_iterations)
        self.num_prototypes = int(num_prototypes)
        self.student_temperature = float(student_temperature)
        self.center_momentum = float(center_momentum)
        self.centering = centering
        self.sinkhorn_iterations = int(sinkhorn_iterations)
        self.register_buffer("center", torch.zeros(1, self.num_prototypes), persistent=True)

    @staticmethod
    def _temperature_like(temperature: float | Tensor, logits: Tensor) -> float | Tensor:
        """A validated temperature in the dtype of ``logits``; a 0-dim CPU tensor stays on the CPU, where
        it mixes with accelerator tensors without a copy or a sync."""
        if isinstance(temperature, Tensor):
            temperature = temperature.detach().to(logits.dtype)
            if temperature.device.type != "cpu":
                temperature = temperature.to(logits.device)
        return temperature

    def _centred_softmax(self, logits: Tensor, temperature: float | Tensor) -> Tensor:
        """``softmax((logits - center) / temperature)`` over the prototypes, in the dtype of ``logits``."""
        return torch.softmax((logits - self.center.to(logits.dtype)) / temperature, dim=-1)

    def extra_repr(self) -> str:
        return (
            f"num_prototypes={self.num_prototypes}, student_temperature={self.student_temperature}, "
            f"center_momentum={self.center_momentum}, centering={self.centering!r}"
        )

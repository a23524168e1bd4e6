"""The official DINO training-step parts (facebookresearch/dino ``main_dino.py``, ``utils.py``), as
references for the benchmarks: written in the official code's style on purpose (pairwise loss loop,
per-tensor host syncs), so that our formulations are measured against what users run today.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

TEACHER_TEMPERATURE = 0.04


class OfficialMultiCropWrapper(nn.Module):
    """``utils.MultiCropWrapper``: concatenate same-resolution crops, one backbone call each, then the head."""

    def __init__(self, backbone: nn.Module, head: nn.Module) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = head

    def forward(self, x: list[torch.Tensor]) -> torch.Tensor:
        """``x``: list of ``(B, 3, H_v, W_v)`` views -> ``(len(x) * B, K)`` logits."""
        idx_crops = torch.cumsum(
            torch.unique_consecutive(torch.tensor([inp.shape[-1] for inp in x]), return_counts=True)[1], 0
        )
        start_idx, output = 0, torch.empty(0).to(x[0].device)
        for end_idx in idx_crops:
            hidden = self.backbone(torch.cat(x[start_idx:end_idx]), interpolate_pos_encoding=True)
            _out = hidden.last_hidden_state[:, 0]  # the official ViT returns the CLS token
            output = torch.cat((output, _out))
            start_idx = end_idx
        return self.head(output)


class OfficialDINOLoss(nn.Module):
    """``main_dino.DINOLoss`` with a constant teacher temperature (pairwise loop over crops)."""

    def __init__(
        self,
        out_dim: int,
        ncrops: int,
        student_temp: float = 0.1,
        center_momentum: float = 0.9,
        teacher_temp: float = TEACHER_TEMPERATURE,
    ) -> None:
        super().__init__()
        self.teacher_temp = teacher_temp
        self.student_temp = student_temp
        self.center_momentum = center_momentum
        self.ncrops = ncrops
        self.register_buffer("center", torch.zeros(1, out_dim))

    def forward(self, student_output: torch.Tensor, teacher_output: torch.Tensor) -> torch.Tensor:
        """``student_output`` ``(ncrops * B, K)``, ``teacher_output`` ``(2 * B, K)`` -> scalar loss."""
        student_out = student_output / self.student_temp
        student_out = student_out.chunk(self.ncrops)
        teacher_out = F.softmax((teacher_output - self.center) / self.teacher_temp, dim=-1)
        teacher_out = teacher_out.detach().chunk(2)
        total_loss = 0
        n_loss_terms = 0
        for iq, q in enumerate(teacher_out):
            for v in range(len(student_out)):
                if v == iq:
                    continue
                loss = torch.sum(-q * F.log_softmax(student_out[v], dim=-1), dim=-1)
                total_loss += loss.mean()
                n_loss_terms += 1
        total_loss /= n_loss_terms
        self.update_center(teacher_output)
        return total_loss

    @torch.no_grad()
    def update_center(self, teacher_output: torch.Tensor) -> None:
        batch_center = torch.sum(teacher_output, dim=0, keepdim=True)
        batch_center = batch_center / len(teacher_output)  # official: all_reduce, / (len * world_size)
        self.center = self.center * self.center_momentum + batch_center * (1 - self.center_momentum)


def official_clip_gradients(model: nn.Module, clip: float) -> list[float]:
    """``utils.clip_gradients``: each parameter's gradient norm clipped separately, one sync per tensor."""
    norms = []
    for _, p in model.named_parameters():
        if p.grad is not None:
            param_norm = p.grad.data.norm(2)
            norms.append(param_norm.item())
            clip_coef = clip / (param_norm + 1e-6)
            if clip_coef < 1:
                p.grad.data.mul_(clip_coef)
    return norms

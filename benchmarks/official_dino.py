"""The official DINO parts (facebookresearch/dino ``main_dino.py``, ``utils.py``) as references for the
benchmarks: the multi-crop augmentation (torchvision v1 on PIL images), the multi-crop wrapper, the
loss and gradient clipping. Written in the official code's style on purpose (per-image PIL, pairwise
loss loop, per-tensor host syncs), so that our formulations are measured against what users run today.
"""

from __future__ import annotations

import random

import torch
import torch.nn.functional as F
from PIL import Image, ImageFilter, ImageOps
from torch import nn
from torchvision import transforms

TEACHER_TEMPERATURE = 0.04


class GaussianBlur:
    """``utils.GaussianBlur``: PIL Gaussian blur with a random radius, applied with probability ``p``."""

    def __init__(self, p: float = 0.5, radius_min: float = 0.1, radius_max: float = 2.0) -> None:
        self.prob = p
        self.radius_min = radius_min
        self.radius_max = radius_max

    def __call__(self, img: Image.Image) -> Image.Image:
        do_it = random.random() <= self.prob
        if not do_it:
            return img
        return img.filter(ImageFilter.GaussianBlur(radius=random.uniform(self.radius_min, self.radius_max)))


class Solarization:
    """``utils.Solarization``: PIL solarise (threshold 128) with probability ``p``."""

    def __init__(self, p: float) -> None:
        self.p = p

    def __call__(self, img: Image.Image) -> Image.Image:
        if random.random() < self.p:
            return ImageOps.solarize(img)
        return img


class DataAugmentationDINO:
    """``main_dino.DataAugmentationDINO`` with configurable crop sizes."""

    def __init__(
        self,
        global_crops_scale: tuple[float, float],
        local_crops_scale: tuple[float, float],
        local_crops_number: int,
        global_crop_size: int = 224,
        local_crop_size: int = 96,
    ) -> None:
        flip_and_color_jitter = transforms.Compose(
            [
                transforms.RandomHorizontalFlip(p=0.5),
                transforms.RandomApply(
                    [transforms.ColorJitter(brightness=0.4, contrast=0.4, saturation=0.2, hue=0.1)], p=0.8
                ),
                transforms.RandomGrayscale(p=0.2),
            ]
        )
        normalize = transforms.Compose(
            [
                transforms.ToTensor(),
                transforms.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
            ]
        )
        bicubic = transforms.InterpolationMode.BICUBIC
        self.global_transfo1 = transforms.Compose(
            [
                transforms.RandomResizedCrop(global_crop_size, scale=global_crops_scale, interpolation=bicubic),
                flip_and_color_jitter,
                GaussianBlur(1.0),
                normalize,
            ]
        )
        self.global_transfo2 = transforms.Compose(
            [
                transforms.RandomResizedCrop(global_crop_size, scale=global_crops_scale, interpolation=bicubic),
                flip_and_color_jitter,
                GaussianBlur(0.1),
                Solarization(0.2),
                normalize,
            ]
        )
        self.local_crops_number = local_crops_number
        self.local_transfo = transforms.Compose(
            [
                transforms.RandomResizedCrop(local_crop_size, scale=local_crops_scale, interpolation=bicubic),
                flip_and_color_jitter,
                GaussianBlur(p=0.5),
                normalize,
            ]
        )

    def __call__(self, image: Image.Image) -> list[torch.Tensor]:
        crops = [self.global_transfo1(image), self.global_transfo2(image)]
        for _ in range(self.local_crops_number):
            crops.append(self.local_transfo(image))
        return crops



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

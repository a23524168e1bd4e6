"""Distillation from a frozen foundation model: the teacher that is not trained, and the student's projectors.

- :class:`FrozenTeacher` wraps a backbone of any family (a DINOv2 from the Hub, a run's export...): frozen
  (eval mode, no gradient, never an optimiser's or a checkpoint's), it sees the student's global crops as its
  own image processor would give them (the student's normalisation undone, resized to the teacher's input
  size, normalised with the teacher's mean and std) and returns :class:`DistillationTargets`;
- :class:`DistillationProjectors` is what the student learns besides its backbone: a linear projector from its
  embedding to the teacher's width and, for the dense term, a 1x1 projection of its feature map, with the
  :class:`~dino_hf.losses.distillation.DistillationLoss` (and its queue). They live in ``DinoForPreTraining``
  (checkpointed, resumed, sharded with it) and are never exported: an export is the student's backbone alone.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import PreTrainedModel

from dino_hf.data.augmentation import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from dino_hf.losses.distillation import DistillationLoss, DistillationLossOutput
from dino_hf.models.backbones import config_patch_size, family_of

__all__ = ["DistillationProjectors", "DistillationTargets", "FrozenTeacher", "teacher_input_size", "weights_sha256"]


@dataclass
class DistillationTargets:
    """What the frozen teacher says about a batch of global crops.

    Attributes:
        embedding: ``(N, D)``, its embedding of each crop (its family's: CLS token or pooled output).
        feature_map: ``(N, D, H, W)``, its patch tokens on its patch grid (``None`` unless the dense term is on).
    """

    embedding: Tensor
    feature_map: Tensor | None = None


def teacher_input_size(processor: Mapping[str, Any] | None, config: Any) -> tuple[int, int]:
    """The ``(height, width)`` the teacher's image processor gives its model: the center crop when it crops,
    else its resize target (a shortest edge as a square), else the config's ``image_size``; rounded to the
    patch size for a family whose inputs must be patch multiples (a DINOv2's 224 stays 224, patch 14)."""
    processor = dict(processor or {})
    size: Any = processor.get("crop_size") if processor.get("do_center_crop") else processor.get("size")
    if isinstance(size, Mapping):
        if "height" in size and "width" in size:
            height, width = int(size["height"]), int(size["width"])
        else:
            height = width = int(size.get("shortest_edge") or size.get("longest_edge") or 224)
    elif isinstance(size, (int, float)):
        height = width = int(size)
    else:
        image_size = getattr(config, "image_size", 224) or 224
        height, width = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
    if family_of(config).crops == "patch_multiple":
        patch_height, patch_width = config_patch_size(config)
        height = max(patch_height, round(height / patch_height) * patch_height)
        width = max(patch_width, round(width / patch_width) * patch_width)
    return int(height), int(width)


def weights_sha256(module: nn.Module) -> str:
    """SHA-256 of a module's state dict (names, dtypes, shapes and bytes, in name order): what a resumed run
    compares to know its teacher is the one it started with."""
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        data = tensor.detach().to("cpu").contiguous()
        digest.update(f"{name}:{data.dtype}:{tuple(data.shape)};".encode())
        digest.update(data.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


class FrozenTeacher(nn.Module):
    """A frozen backbone that turns the student's global crops into :class:`DistillationTargets`.

    Args:
        backbone: the teacher, any family dino_hf knows.
        image_processor: the dict of its ``preprocessor_config.json`` (mean, std, size), ``None`` for ImageNet
            statistics at its config's ``image_size``.
        dense: also return its patch tokens as a feature map (:meth:`enable_dense`).
        student_mean, student_std: the normalisation of the crops it is given (the training crops' ImageNet one).
    Raises:
        ValueError: a dense teacher without patch tokens (one sentence).
    """

    def __init__(self, backbone: PreTrainedModel, image_processor: Mapping[str, Any] | None = None, dense: bool = False,
                 student_mean: Sequence[float] = IMAGENET_DEFAULT_MEAN,
                 student_std: Sequence[float] = IMAGENET_DEFAULT_STD) -> None:
        super().__init__()
        self.family = family_of(backbone.config)
        self.backbone = backbone.eval().requires_grad_(False)
        self.dense = False
        if dense:
            self.enable_dense()
        processor = dict(image_processor or {})
        self.input_size = teacher_input_size(processor, backbone.config)
        teacher_mean = processor.get("image_mean", IMAGENET_DEFAULT_MEAN) if processor.get("do_normalize", True) else (0.0,) * 3
        teacher_std = processor.get("image_std", IMAGENET_DEFAULT_STD) if processor.get("do_normalize", True) else (1.0,) * 3
        # x_teacher = (x_student * std_s + mean_s - mean_t) / std_t = x_student * scale + shift, per channel
        scale = torch.tensor(student_std, dtype=torch.float32) / torch.tensor(_three(teacher_std), dtype=torch.float32)
        shift = (torch.tensor(student_mean, dtype=torch.float32) - torch.tensor(_three(teacher_mean), dtype=torch.float32)) \
            / torch.tensor(_three(teacher_std), dtype=torch.float32)
        self.register_buffer("scale", scale.view(1, 3, 1, 1), persistent=False)
        self.register_buffer("shift", shift.view(1, 3, 1, 1), persistent=False)
        self.embedding_size = self.family.embedding_size(backbone.config)

    def enable_dense(self) -> None:
        """Return the patch tokens too (the dense term); ``ValueError`` for a teacher without any (a ConvNet)."""
        if self.family.embedding != "class_token":
            raise ValueError(
                "--distillation_dense_weight: the dense term matches the teacher's patch tokens, and a "
                f"{self.family.name_of(self.backbone.config.model_type)} teacher has none: use a ViT-family teacher "
                "(ViT, DeiT, DINOv2, DINOv3 ViT) or --distillation_dense_weight 0."
            )
        self.dense = True

    def train(self, mode: bool = True) -> FrozenTeacher:
        """Always eval mode: a frozen teacher keeps its batch-norm statistics and drops no paths."""
        return super().train(False)

    def preprocess(self, crops: Tensor) -> Tensor:
        """``(N, 3, h, w)`` student crops -> ``(N, 3, H, W)`` what the teacher's own processor would give it."""
        crops = crops.float()
        if tuple(crops.shape[-2:]) != self.input_size:
            crops = F.interpolate(crops, size=self.input_size, mode="bilinear", align_corners=False, antialias=True)
        return crops * self.scale + self.shift

    @torch.no_grad()
    def forward(self, crops: Tensor) -> DistillationTargets:
        """``(N, 3, h, w)`` normalised student crops -> the teacher's :class:`DistillationTargets` (float32)."""
        pixels = self.preprocess(crops)
        if not self.dense:
            return DistillationTargets(self.family.embed(self.backbone, pixels).float())
        embedding, feature_map = self.family.embed_map(self.backbone, pixels)
        return DistillationTargets(embedding.float(), feature_map.float())


def _three(values: Sequence[float] | float) -> list[float]:
    """A per-channel statistic as three numbers (a processor may give one number for every channel)."""
    values = [float(values)] if isinstance(values, (int, float)) else [float(value) for value in values]
    return values * 3 if len(values) == 1 else values[:3]


class DistillationProjectors(nn.Module):
    """The student's projector to the teacher's width (and 1x1 projection of its feature map), with the loss.

    Args:
        student_embedding_size: width of the student's DINO embedding.
        student_map_channels: channels of the student's feature map (patch tokens or last ConvNet stage).
        teacher_embedding_size: ``D``, the teacher's width.
        loss_settings: :class:`~dino_hf.losses.distillation.DistillationLoss`'s weights, queue and temperatures.
    """

    def __init__(self, student_embedding_size: int, student_map_channels: int, teacher_embedding_size: int,
                 **loss_settings: Any) -> None:
        super().__init__()
        self.loss_fn = DistillationLoss(teacher_embedding_size, **loss_settings)
        self.global_projector = nn.Linear(student_embedding_size, teacher_embedding_size)
        self.dense_projector = (nn.Conv2d(student_map_channels, teacher_embedding_size, kernel_size=1)
                                if self.loss_fn.uses_dense else None)

    @property
    def uses_dense(self) -> bool:
        return self.dense_projector is not None

    def forward(self, student_embedding: Tensor, student_map: Tensor | None,
                targets: DistillationTargets) -> DistillationLossOutput:
        """The :class:`~dino_hf.losses.distillation.DistillationLossOutput` of the student's ``(N, D_s)``
        embedding (and ``(N, C, h, w)`` feature map) against the teacher's ``targets``."""
        projected_map = self.dense_projector(student_map) if self.dense_projector is not None else None
        return self.loss_fn(self.global_projector(student_embedding), targets.embedding, projected_map,
                            targets.feature_map)

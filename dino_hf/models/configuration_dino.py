"""`DinoConfig`: everything that determines the shape of a DINO student/teacher pair.

The configuration travels in ``config.json`` next to the weights. It nests the backbone's own
``transformers`` config (a ``ViTConfig`` by default; any family of :mod:`dino_hf.models.backbones`, named by
its ``model_type``, so that the exported backbone is the stock ``transformers`` model) and adds the
projection head, the number of prototypes and the loss constants the official DINO code fixes at
build time. Training-time recipe values (learning rates, schedules, crops) live in
``DinoTrainingArguments``.
"""

from __future__ import annotations

import math
from collections.abc import Callable

from huggingface_hub.dataclasses import strict
from transformers import Dinov2WithRegistersConfig, PreTrainedConfig, ResNetConfig, ViTConfig
from transformers.configuration_utils import SubConfigSpec

from dino_hf.base.official_recipe import (
    DEFAULT_TEACHER_CENTERING,
    DINOV2_SINKHORN_ITERATIONS,
    OFFICIAL_CENTER_MOMENTUM,
    OFFICIAL_DROP_PATH_RATE,
    OFFICIAL_STUDENT_TEMPERATURE,
)
from dino_hf.base.run_folder import DINO_MODEL_TYPE
from dino_hf.losses.validation import (
    check_centering,
    check_fraction,
    check_positive_integer,
    check_positive_number,
    is_real,
)
from dino_hf.models.backbones import family_of

#: DinoConfig fields that are also training flags (``--num_prototypes``, ``--student_temperature``...):
#: a flag that is given sets the field of the same name, after ``--config_overrides``.
TRAINING_FLAG_FIELDS = ("num_prototypes", "student_temperature", "center_momentum", "teacher_centering",
                        "sinkhorn_iterations", "ibot_loss_weight", "ibot_separate_head", "ibot_num_prototypes",
                        "koleo_loss_weight", "dino_loss_weight", "distillation_cosine_weight",
                        "distillation_soft_weight", "distillation_dense_weight", "distillation_queue_size",
                        "distillation_student_temperature", "distillation_teacher_temperature")


def _check_drop_path_rate(name: str, value: object) -> None:
    if not is_real(value) or not 0.0 <= value < 1.0:
        raise ValueError(f"{name} must be a number in [0, 1), got {value!r}.")


def _check_loss_weight(name: str, value: object) -> None:
    if not is_real(value) or not math.isfinite(value) or value < 0:
        raise ValueError(f"{name} must be a finite number >= 0 (0 disables the term), got {value!r}.")


def _check_bool(name: str, value: object) -> None:
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be true or false, got {value!r}.")


def _check_optional_positive_integer(name: str, value: object) -> None:
    if value is not None:
        check_positive_integer(name, value)


#: The rule of each checked field; the loss settings' rules are the losses' own
#: (:mod:`dino_hf.losses.validation`), so a config, a flag and a loss accept the same values.
_SETTING_CHECKS: dict[str, Callable[[str, object], None]] = {
    "num_prototypes": check_positive_integer,
    "head_hidden_size": check_positive_integer,
    "head_bottleneck_size": check_positive_integer,
    "head_num_layers": check_positive_integer,
    "drop_path_rate": _check_drop_path_rate,
    "student_temperature": check_positive_number,
    "center_momentum": check_fraction,
    "teacher_centering": lambda name, value: check_centering(value, name),
    "sinkhorn_iterations": check_positive_integer,
    "ibot_loss_weight": _check_loss_weight,
    "koleo_loss_weight": _check_loss_weight,
    "ibot_separate_head": _check_bool,
    "ibot_num_prototypes": _check_optional_positive_integer,
    "dino_loss_weight": _check_loss_weight,
    "distillation_embedding_size": _check_optional_positive_integer,
    "distillation_cosine_weight": _check_loss_weight,
    "distillation_soft_weight": _check_loss_weight,
    "distillation_dense_weight": _check_loss_weight,
    "distillation_queue_size": check_positive_integer,
    "distillation_student_temperature": check_positive_number,
    "distillation_teacher_temperature": check_positive_number,
}


def check_settings(values: dict[str, object], label: str) -> None:
    """Raise ``ValueError`` with one sentence for the first of ``values`` that breaks its field's rule.

    The one validation of these fields: ``DinoConfig.check_architecture`` passes every field
    (``label="DinoConfig.{}"``), ``DinoTrainingArguments`` the flags that are given (``label="--{}"``).
    """
    for name, value in values.items():
        _SETTING_CHECKS[name](label.format(name), value)

# Architecture of the backbones the official DINO release trains. DINO's ViT differs from the
# ViTConfig defaults in its LayerNorm epsilon (1e-6, as timm/DeiT) — that difference matters for
# numerically exact imports of official checkpoints.
_BACKBONE_PRESETS: dict[str, dict] = {
    "vit_tiny_patch16": {"hidden_size": 192, "num_attention_heads": 3, "patch_size": 16},
    "vit_small_patch16": {"hidden_size": 384, "num_attention_heads": 6, "patch_size": 16},
    "vit_small_patch8": {"hidden_size": 384, "num_attention_heads": 6, "patch_size": 8},
    "vit_base_patch16": {"hidden_size": 768, "num_attention_heads": 12, "patch_size": 16},
    "vit_base_patch8": {"hidden_size": 768, "num_attention_heads": 12, "patch_size": 8},
}

#: Backbone settings shared by every DINO ViT (official ``vision_transformer.py``).
DINO_BACKBONE_DEFAULTS: dict = {
    "num_hidden_layers": 12,
    "image_size": 224,
    "layer_norm_eps": 1e-6,
    "qkv_bias": True,
    "hidden_act": "gelu",
    "hidden_dropout_prob": 0.0,
    "attention_probs_dropout_prob": 0.0,
    "initializer_range": 0.02,
}


# Presets of the other families: the backbone config, and DinoConfig fields that go with it.
_FAMILY_PRESETS: dict[str, tuple[Callable[[], PreTrainedConfig], dict]] = {
    # DINOv2's ViT-S/14 with 4 registers (Darcet et al. 2024): layer scale 1e-5, LayerNorm eps 1e-6,
    # 224 px global crops (16 x 16 patches).
    "dinov2_small_patch14": (
        lambda: Dinov2WithRegistersConfig(
            hidden_size=384, num_hidden_layers=12, num_attention_heads=6, mlp_ratio=4, patch_size=14,
            image_size=224, num_register_tokens=4, layerscale_value=1e-5, layer_norm_eps=1e-6, qkv_bias=True,
        ),
        {},
    ),
    # The official DINO ResNet-50 (torchvision's layout = transformers' ResNetConfig defaults): no
    # stochastic depth; the rest of its recipe (SGD, lr 0.03, weight decay 1e-4, crop scales) is
    # scripts/configs/resnet50.yaml.
    "resnet50": (lambda: ResNetConfig(), {"drop_path_rate": 0.0}),
    # A small ResNet for small images (the Fashion-MNIST CPU recipe fashion_mnist_resnet_cpu.yaml): a
    # 32-wide stem and three stages of one basic block (32, 64, 128 channels), no downsampling in the
    # first stage, so a 28 px crop ends on a 2 x 2 map and a 14 px one on 1 x 1; 0.31 M parameters,
    # 7.3 MFLOPs per 28 px image (a fifth of the 4 x 256 ViT of fashion_mnist_cpu.yaml).
    "resnet_tiny": (
        lambda: ResNetConfig(embedding_size=32, hidden_sizes=[32, 64, 128], depths=[1, 1, 1], layer_type="basic",
                             downsample_in_first_stage=False),
        {"drop_path_rate": 0.0},
    ),
}


def dino_backbone_config(**overrides) -> ViTConfig:
    """A ``ViTConfig`` with DINO's defaults (ViT-S/16 unless ``overrides`` say otherwise).

    ``intermediate_size`` follows ``4 * hidden_size`` (DINO's ``mlp_ratio=4``) unless given.
    """
    settings = {**DINO_BACKBONE_DEFAULTS, **_BACKBONE_PRESETS["vit_small_patch16"], **overrides}
    settings.setdefault("intermediate_size", 4 * settings["hidden_size"])
    return ViTConfig(**settings)


def preset_backbone_settings(name: str) -> dict | None:
    """The backbone fields of preset ``name`` (with DINO's defaults and ``intermediate_size``), or None."""
    if name not in _BACKBONE_PRESETS:
        return None
    settings = {**DINO_BACKBONE_DEFAULTS, **_BACKBONE_PRESETS[name]}
    settings.setdefault("intermediate_size", 4 * settings["hidden_size"])
    return settings


@strict
class DinoConfig(PreTrainedConfig):
    r"""
    Configuration of [`DinoForPreTraining`]: a ViT backbone, the DINO projection head and the
    constants of the DINO loss. Defaults reproduce the official facebookresearch/dino ViT-S/16.

    Args:
        backbone_config (`PreTrainedConfig` or `dict`, *optional*):
            The student/teacher backbone: a config of any family dino_hf trains (ViT, DeiT, DINOv2,
            DINOv2 with registers, DINOv3 ViT, ConvNeXt, DINOv3 ConvNeXt, ResNet; a dict names it by
            ``model_type``). Defaults to DINO's ViT-S/16 (hidden 384, 12 layers, 6 heads, patch 16,
            224 px, LayerNorm eps 1e-6, qkv bias).
        num_prototypes (`int`, *optional*, defaults to 65536):
            Output dimension K of the head (the official ``out_dim``). Smaller K (1-4k) learns faster on
            small data sets; ln(K) is the loss of a uniformly collapsed model.
        head_hidden_size (`int`, *optional*, defaults to 2048):
            Width of the hidden layers of the head MLP.
        head_bottleneck_size (`int`, *optional*, defaults to 256):
            Width of the L2-normalised bottleneck in front of the weight-normalised prototype layer.
        head_num_layers (`int`, *optional*, defaults to 3):
            Number of linear layers in the head MLP (1 means a single linear projection).
        head_use_batch_norm (`bool`, *optional*, defaults to `False`):
            Batch normalisation after each hidden linear layer of the head (official default off for ViT).
        norm_last_layer (`bool`, *optional*, defaults to `True`):
            Fix the norm of the prototype layer's weight to 1. `False` trains it, which the official code
            recommends for ViT-B for performance but which can make training unstable.
        drop_path_rate (`float`, *optional*, defaults to 0.1):
            Stochastic depth of the student backbone (linearly increasing over the layers). The teacher
            never drops paths; the exported backbone is unaffected.
        student_temperature (`float`, *optional*, defaults to 0.1):
            Temperature of the student softmax in the DINO loss.
        center_momentum (`float`, *optional*, defaults to 0.9):
            EMA momentum of the teacher-logit center.
        teacher_centering (`str`, *optional*, defaults to `"centering"`):
            How teacher targets avoid collapse, for the DINO and the iBOT teacher alike: `"centering"`
            (DINO: subtract an EMA center, then sharpen) or `"sinkhorn_knopp"` (DINOv2's large runs:
            equipartition over prototypes by `sinkhorn_iterations` Sinkhorn-Knopp iterations; the
            center buffers are then unused).
        sinkhorn_iterations (`int`, *optional*, defaults to 3):
            Sinkhorn-Knopp iterations of `teacher_centering="sinkhorn_knopp"` (DINOv2: 3).
        ibot_loss_weight (`float`, *optional*, defaults to 0.0):
            Weight of the iBOT masked-patch loss (DINOv2: 1.0). Above 0 the student's global crops are
            block-masked and the model gets what that needs: the backbone's mask token (a ViT or DeiT is
            built with `use_mask_token=True`) and the iBOT center (and head, with `ibot_separate_head`).
            0 is DINO v1.
        ibot_separate_head (`bool`, *optional*, defaults to `False`):
            Give the patch tokens a projection head of their own instead of the DINO head
            (DINOv2's default config shares it; its ViT-L/g recipes use separate heads).
        ibot_num_prototypes (`int`, *optional*):
            Prototypes of the separate iBOT head; defaults to `num_prototypes`. Its MLP has the DINO
            head's widths.
        koleo_loss_weight (`float`, *optional*, defaults to 0.0):
            Weight of the KoLeo regulariser on the student's global-crop embeddings (DINOv2: 0.1; as in
            DINOv2 the term is summed over the global crops).
        dino_loss_weight (`float`, *optional*, defaults to 1.0):
            Weight of the DINO self-distillation term. 0 is pure distillation from a frozen teacher (then the
            EMA teacher and the local crops are not run at all); it needs `distillation_embedding_size`.
        distillation_embedding_size (`int`, *optional*):
            Width of the frozen teacher a run distils (`--distillation_teacher`, set by the trainer from the
            teacher's config); `None` is no distillation. The student then gets the projectors of
            `dino_hf.models.distillation` (trained and checkpointed, never exported).
        distillation_cosine_weight (`float`, *optional*, defaults to 1.0):
            Weight of the cosine term: the student's projected embedding against the teacher's, per crop.
        distillation_soft_weight (`float`, *optional*, defaults to 0.0):
            Weight of the soft-target term over a queue of teacher embeddings (LightlyTrain's v1).
        distillation_dense_weight (`float`, *optional*, defaults to 0.0):
            Weight of the dense term: the student's feature map through a 1x1 projection against the teacher's
            patch tokens resized to its grid (LightlyTrain's v2); a ViT-family teacher only.
        distillation_queue_size (`int`, *optional*, defaults to 4096):
            Teacher embeddings the soft targets are computed over.
        distillation_student_temperature (`float`, *optional*, defaults to 0.1),
        distillation_teacher_temperature (`float`, *optional*, defaults to 0.04):
            Softmax temperatures of the soft targets (the teacher's sharper, as in DINO).
        backbone_image_processor (`dict`, *optional*):
            The `preprocessor_config.json` the backbone came with (continued pre-training of a Hub or
            local backbone): every export writes it again, so a DINOv2 keeps its own resize rule and
            mean/std. `None` (training from scratch): exports get ImageNet mean/std at the crop size.

    Example:

    ```python
    >>> from dino_hf import DinoConfig, DinoForPreTraining
    >>> config = DinoConfig.from_preset("vit_small_patch16")
    >>> config.backbone_config.hidden_size = 64  # still editable
    >>> config.num_prototypes = 256
    >>> model = DinoForPreTraining(config)
    ```"""

    model_type = DINO_MODEL_TYPE
    sub_configs_defaults = {
        "backbone_config": SubConfigSpec(
            config_class=ViTConfig,
            init_kwargs={
                **DINO_BACKBONE_DEFAULTS,
                **_BACKBONE_PRESETS["vit_small_patch16"],
                "intermediate_size": 4 * _BACKBONE_PRESETS["vit_small_patch16"]["hidden_size"],
            },
        ),
    }

    backbone_config: dict | PreTrainedConfig | None = None
    num_prototypes: int = 65536
    head_hidden_size: int = 2048
    head_bottleneck_size: int = 256
    head_num_layers: int = 3
    head_use_batch_norm: bool = False
    norm_last_layer: bool = True
    drop_path_rate: float | int = OFFICIAL_DROP_PATH_RATE
    student_temperature: float | int = OFFICIAL_STUDENT_TEMPERATURE
    center_momentum: float | int = OFFICIAL_CENTER_MOMENTUM
    teacher_centering: str = DEFAULT_TEACHER_CENTERING
    sinkhorn_iterations: int = DINOV2_SINKHORN_ITERATIONS
    ibot_loss_weight: float | int = 0.0
    ibot_separate_head: bool = False
    ibot_num_prototypes: int | None = None
    koleo_loss_weight: float | int = 0.0
    dino_loss_weight: float | int = 1.0
    distillation_embedding_size: int | None = None
    distillation_cosine_weight: float | int = 1.0
    distillation_soft_weight: float | int = 0.0
    distillation_dense_weight: float | int = 0.0
    distillation_queue_size: int = 4096
    distillation_student_temperature: float | int = 0.1
    distillation_teacher_temperature: float | int = 0.04
    backbone_image_processor: dict | None = None

    @property
    def uses_ibot(self) -> bool:
        """Whether the iBOT masked-patch loss is on (the model then masks and has a mask token)."""
        return self.ibot_loss_weight > 0

    @property
    def distils(self) -> bool:
        """Whether the student also learns from a frozen teacher (``distillation_embedding_size`` is set)."""
        return self.distillation_embedding_size is not None

    @property
    def self_distils(self) -> bool:
        """Whether DINO's own student/teacher path runs (its term has a weight, or iBOT needs its teacher)."""
        return self.dino_loss_weight > 0 or self.uses_ibot

    @property
    def distillation_loss_settings(self) -> dict:
        """The :class:`~dino_hf.losses.distillation.DistillationLoss` arguments these fields give."""
        return {"cosine_weight": self.distillation_cosine_weight, "soft_weight": self.distillation_soft_weight,
                "dense_weight": self.distillation_dense_weight, "queue_size": self.distillation_queue_size,
                "student_temperature": self.distillation_student_temperature,
                "teacher_temperature": self.distillation_teacher_temperature}

    @property
    def ibot_head_num_prototypes(self) -> int:
        """``K`` of the patch head: the separate head's, else the shared DINO head's."""
        if self.ibot_separate_head and self.ibot_num_prototypes is not None:
            return self.ibot_num_prototypes
        return self.num_prototypes

    def check_architecture(self) -> None:
        """Raise ``ValueError`` with one sentence when a field has an impossible value."""
        check_settings({name: getattr(self, name) for name in _SETTING_CHECKS}, "DinoConfig.{}")
        if self.ibot_num_prototypes is not None:
            if not self.ibot_separate_head and self.ibot_num_prototypes != self.num_prototypes:
                raise ValueError(
                    f"DinoConfig.ibot_num_prototypes ({self.ibot_num_prototypes}) needs ibot_separate_head: a shared "
                    f"head has the DINO head's num_prototypes ({self.num_prototypes})."
                )
        family = family_of(self.backbone_config)
        family.check(self.backbone_config)
        if self.uses_ibot:
            family.check_masking(self.backbone_config, "DinoConfig.ibot_loss_weight")
        self._check_distillation()

    def _check_distillation(self) -> None:
        """The objective has a term to learn from, and the distillation terms combine with it."""
        if self.dino_loss_weight == 0 and not self.distils:
            raise ValueError("DinoConfig.dino_loss_weight 0 leaves nothing to learn without a distillation teacher: "
                             "give one (--distillation_teacher) or a weight above 0.")
        if not self.distils:
            return
        if not (self.distillation_cosine_weight or self.distillation_soft_weight or self.distillation_dense_weight):
            raise ValueError("Distillation needs one of distillation_cosine_weight, distillation_soft_weight or "
                             "distillation_dense_weight above 0.")
        if self.distillation_dense_weight and self.uses_ibot:
            raise ValueError("The dense distillation term and iBOT both take the student's patch tokens (iBOT masked): "
                             "use --distillation_dense_weight 0 or --ibot_loss_weight 0.")

    @staticmethod
    def preset_names() -> list[str]:
        """Names accepted by :meth:`from_preset`."""
        return sorted([*_BACKBONE_PRESETS, *_FAMILY_PRESETS])

    @classmethod
    def from_preset(cls, name: str, **kwargs) -> DinoConfig:
        """Build the configuration of an official DINO (or DINOv2) architecture.

        Args:
            name: one of :meth:`preset_names`: the official DINO ViTs (``vit_tiny_patch16``,
                ``vit_small_patch16``, ``vit_small_patch8``, ``vit_base_patch16``, ``vit_base_patch8``),
                DINOv2's ViT-S/14 with registers (``dinov2_small_patch14``), the official DINO
                ResNet-50 (``resnet50``) and a small ResNet for 28 px images (``resnet_tiny``).
            kwargs: overrides of the DinoConfig fields (head, K, drop path...).
        """
        if name in _FAMILY_PRESETS:
            build, fields = _FAMILY_PRESETS[name]
            return cls(backbone_config=build(), **{**fields, **kwargs})
        if name not in _BACKBONE_PRESETS:
            raise ValueError(f"Unknown DINO preset {name!r}; use one of: {', '.join(cls.preset_names())}.")
        backbone = dino_backbone_config(**_BACKBONE_PRESETS[name])
        return cls(backbone_config=backbone, **kwargs)


__all__ = ["DinoConfig", "TRAINING_FLAG_FIELDS", "check_settings", "dino_backbone_config", "preset_backbone_settings",
           "DINO_BACKBONE_DEFAULTS"]

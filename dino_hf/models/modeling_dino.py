"""DINO student/teacher model as a ``transformers`` ``PreTrainedModel``.

``DinoForPreTraining`` holds everything a restart needs — student (backbone + projection head, and an
iBOT patch head when DINOv2's is separate), teacher (an identical copy updated only by EMA) and the
losses with their centering buffers — so that ``save_pretrained``/``from_pretrained`` round-trip a run
through one safetensors file. Its objective is DINO's, plus DINOv2's iBOT masked-patch loss and KoLeo
regulariser when their weights in :class:`DinoConfig` are above 0. The trained
backbone leaves through :meth:`DinoForPreTraining.save_backbone` as a stock ``ViTModel`` folder that
plain ``transformers`` loads without dino_hf.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable
from transformers import AutoConfig, AutoModel, AutoModelForPreTraining, PreTrainedModel
from transformers import initialization as init
from transformers.utils import ModelOutput

from dino_hf.base.official_recipe import OFFICIAL_TEACHER_TEMPERATURE
from dino_hf.losses.dino import DinoLoss
from dino_hf.losses.ibot import IBOTPatchLoss
from dino_hf.losses.koleo import KoLeoLoss
from dino_hf.models.backbones import family_of, image_processor_dict, save_backbone
from dino_hf.models.configuration_dino import DinoConfig
from dino_hf.models.distillation import DistillationProjectors, DistillationTargets


@dataclass
class DinoForPreTrainingOutput(ModelOutput):
    """Output of :class:`DinoForPreTraining`.

    Args:
        loss: 0-dim float32, the objective: ``dino_loss + ibot_loss_weight * ibot_loss
            + koleo_loss_weight * num_global_crops * koleo_loss`` (just ``dino_loss`` for DINO v1).
        dino_loss: 0-dim, the DINO cross-entropy averaged over crop pairs and batch.
        ibot_loss: 0-dim, the iBOT masked-patch loss (``None`` without iBOT; 0 without masks).
        koleo_loss: 0-dim, the KoLeo regulariser averaged over the global crops (``None`` when off).
        student_logits: ``(num_crops, batch, num_prototypes)``, global crops first.
        teacher_logits: ``(num_global_crops, batch, num_prototypes)``, no gradient.
        teacher_entropy: 0-dim, mean entropy (nats) of the per-sample teacher distributions.
            Near 0 for many steps means one-hot collapse.
        teacher_mean_entropy: 0-dim, entropy (nats) of the batch-mean teacher distribution.
            Near ln(K) together with ``teacher_entropy`` near ln(K) means uniform collapse.
        teacher_logits_mean: ``(1, num_prototypes)``, this process's batch mean of the teacher logits;
            what the center EMA consumes (see ``DinoLoss.update_center`` for gradient accumulation).
        loss_statistics: ``{name: 0-dim tensor}``, every statistic of ``dino_hf.losses.dino.LOSS_STATISTICS``
            (the two teacher entropies above, the student entropy, the teacher-student KL...).
        ibot_teacher_entropy, ibot_teacher_mean_entropy: 0-dim, the same monitors for the iBOT teacher's
            masked-patch distributions (``None`` without iBOT masks).
        ibot_teacher_logits_sum: ``(1, K_ibot)``, sum of the iBOT teacher logits over this process's
            masked patches, and ``ibot_num_masked_patches`` (0-dim) their number: what the iBOT
            center EMA consumes (``IBOTPatchLoss.update_center``).
        distillation_loss: 0-dim, the weighted distillation terms (``None`` without a frozen teacher), and
            ``distillation_terms`` each of them (``{"cosine": ..., "soft": ..., "dense": ...}``, those weighted).
            Without DINO's own term (``dino_loss_weight`` 0) the DINO fields above are ``None``.
    """

    loss: torch.FloatTensor | None = None
    dino_loss: torch.FloatTensor | None = None
    ibot_loss: torch.FloatTensor | None = None
    koleo_loss: torch.FloatTensor | None = None
    student_logits: torch.FloatTensor | None = None
    teacher_logits: torch.FloatTensor | None = None
    teacher_entropy: torch.FloatTensor | None = None
    teacher_mean_entropy: torch.FloatTensor | None = None
    teacher_logits_mean: torch.FloatTensor | None = None
    loss_statistics: dict[str, torch.Tensor] | None = None
    ibot_teacher_entropy: torch.FloatTensor | None = None
    ibot_teacher_mean_entropy: torch.FloatTensor | None = None
    ibot_teacher_logits_sum: torch.FloatTensor | None = None
    ibot_num_masked_patches: torch.FloatTensor | None = None
    distillation_loss: torch.FloatTensor | None = None
    distillation_terms: dict[str, torch.Tensor] | None = None


def initialize_head_module(module: nn.Module, initialization: ModuleType = nn.init) -> None:
    """The official DINO head initialisation of one module (anything else is left alone).

    Linear layers: truncated normal weights (std 0.02) and zero biases; batch norms: unit scale, zero
    shift and fresh running statistics; the prototype layer: :meth:`WeightNormalizedLinear.reset_parameters`.
    ``initialization`` is ``torch.nn.init`` when a standalone :class:`DinoHead` is built and
    ``transformers.initialization`` in ``DinoPreTrainedModel._init_weights``.
    """
    if isinstance(module, nn.Linear):
        initialization.trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            initialization.zeros_(module.bias)
    elif isinstance(module, nn.BatchNorm1d):
        initialization.ones_(module.weight)
        initialization.zeros_(module.bias)
        if module.running_mean is not None:
            initialization.zeros_(module.running_mean)
            initialization.ones_(module.running_var)
    elif isinstance(module, WeightNormalizedLinear):
        module.reset_parameters(initialization)


class _ScaledRowsLinear(torch.autograd.Function):
    """``y = (x @ v.T) * s`` with ``s = g / ||v||`` per output row, and its gradient in closed form.

    Shapes: ``x`` ``(N, D)``, ``v`` ``(K, D)``, ``g`` ``(K, 1)``, ``y`` ``(N, K)``. With ``G = dL/dy`` and
    ``c_j = sum_n G[n, j] (x_n . v_j)``::

        dL/dx = (G * s) @ v
        dL/dv = (G * s).T @ x - (c * s / ||v||^2) v      one (K, D) product, then an in-place update
        dL/dg = c / ||v||

    exactly the gradient of ``linear(x, g * v / ||v||)``. Letting autograd differentiate the norm
    instead allocates and sweeps several more ``(K, D)`` tensors per step (65,536 x 256 in the
    official head), which made the prototype layer the largest item of a CPU step after the backbone
    (benchmarks/RESULTS.md, bench_train_step).
    """

    @staticmethod
    def forward(ctx: Any, inputs: torch.Tensor, weight_v: torch.Tensor, weight_g: torch.Tensor) -> torch.Tensor:
        norm = torch.linalg.vector_norm(weight_v, dim=1, keepdim=True)  # (K, 1)
        scale = (weight_g / norm).squeeze(1)  # (K,)
        raw = F.linear(inputs, weight_v)  # (N, K)
        ctx.scale_trainable = ctx.needs_input_grad[2]
        if ctx.scale_trainable:  # c needs the unscaled product: keep it
            logits = raw * scale.to(raw.dtype)
            ctx.save_for_backward(inputs, weight_v, norm, scale, raw)
        else:  # scale in place (one (N, K) allocation) and recover c * s from the output
            logits = raw.mul_(scale.to(raw.dtype))
            ctx.save_for_backward(inputs, weight_v, norm, scale, logits)
        return logits

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad_logits: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        inputs, weight_v, norm, scale, saved = ctx.saved_tensors
        grad_inputs = grad_v = grad_g = None
        scaled = grad_logits * scale.to(grad_logits.dtype)  # G * s, (N, K)
        if ctx.needs_input_grad[0]:
            grad_inputs = scaled.to(weight_v.dtype) @ weight_v
        if ctx.needs_input_grad[1] or ctx.needs_input_grad[2]:
            # c (trainable g: saved = x @ v.T) or c * s (fixed g: saved = y), per prototype, (K,)
            products = (grad_logits * saved).sum(0).to(norm.dtype)
            norm_squared = norm.squeeze(1).square()
            if ctx.needs_input_grad[1]:
                grad_v = scaled.t().mm(inputs.to(scaled.dtype)).to(weight_v.dtype)  # (K, D)
                coefficient = (products * scale if ctx.scale_trainable else products) / norm_squared
                grad_v.addcmul_(weight_v, coefficient.neg().unsqueeze(1).to(weight_v.dtype))
            if ctx.needs_input_grad[2]:
                grad_g = (products / norm.squeeze(1)).unsqueeze(1)
        return grad_inputs, grad_v, grad_g


class WeightNormalizedLinear(nn.Module):
    """Bias-free linear layer with weight normalisation, ``weight = g * v / ||v||`` per output row.

    Parameter names ``weight_g`` ``(out, 1)`` and ``weight_v`` ``(out, in)`` match the official DINO
    checkpoints (``torch.nn.utils.weight_norm``), so they import one-to-one. With ``fix_norm`` the
    norm ``g`` stays at 1 and receives no gradient (the official ``norm_last_layer=True``).
    """

    def __init__(self, in_features: int, out_features: int, fix_norm: bool = True) -> None:
        super().__init__()
        self.weight_g = nn.Parameter(torch.ones(out_features, 1), requires_grad=not fix_norm)
        self.weight_v = nn.Parameter(torch.empty(out_features, in_features))
        self.reset_parameters()

    def reset_parameters(self, initialization: ModuleType = nn.init) -> None:
        """PyTorch's ``nn.Linear`` init for the direction, unit norm (the official DINO head).

        ``initialization`` is ``torch.nn.init`` for a standalone layer and ``transformers.initialization``
        from ``DinoPreTrainedModel._init_weights`` (whose functions leave loaded weights alone).
        """
        initialization.kaiming_uniform_(self.weight_v, a=5**0.5)
        initialization.ones_(self.weight_g)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """``(N, in_features)`` -> ``(N, out_features)``."""
        if hidden_states.shape[0] < self.weight_v.shape[1]:
            # Few rows (the teacher's 2 x batch, small batches): scaling the (N, out) output costs less
            # than materialising the normalised (out, in) weight, e.g. 65536 x 256 (same result).
            return _ScaledRowsLinear.apply(hidden_states, self.weight_v, self.weight_g)
        scale = self.weight_g / torch.linalg.vector_norm(self.weight_v, dim=1, keepdim=True)  # (out, 1)
        return F.linear(hidden_states, self.weight_v * scale)


class DinoHead(nn.Module):
    """The official DINO projection head.

    ``mlp``: ``num_layers`` linear layers (GELU between them, optional BatchNorm after each hidden
    one) from the backbone width to the bottleneck; then L2 normalisation; then a weight-normalised
    linear layer to ``num_prototypes`` logits. The ``mlp`` layout (an ``nn.Sequential``, or a
    single ``nn.Linear`` when ``num_layers == 1``) reproduces the official module indices.
    """

    def __init__(
        self,
        in_features: int,
        num_prototypes: int,
        hidden_size: int = 2048,
        bottleneck_size: int = 256,
        num_layers: int = 3,
        use_batch_norm: bool = False,
        norm_last_layer: bool = True,
    ) -> None:
        super().__init__()
        if num_layers == 1:
            self.mlp = nn.Linear(in_features, bottleneck_size)
        else:
            layers: list[nn.Module] = []
            width = in_features
            for _ in range(num_layers - 1):
                layers.append(nn.Linear(width, hidden_size))
                if use_batch_norm:
                    layers.append(nn.BatchNorm1d(hidden_size))
                layers.append(nn.GELU())
                width = hidden_size
            layers.append(nn.Linear(hidden_size, bottleneck_size))
            self.mlp = nn.Sequential(*layers)
        self.last_layer = WeightNormalizedLinear(bottleneck_size, num_prototypes, fix_norm=norm_last_layer)
        for module in self.mlp.modules():
            initialize_head_module(module)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """``(N, in_features)`` backbone embeddings -> ``(N, num_prototypes)`` logits."""
        projected = F.normalize(self.mlp(features), dim=-1, p=2)
        return self.last_layer(projected)


class DinoStudentTeacherNetwork(nn.Module):
    """A backbone of any supported family followed by a :class:`DinoHead` (and, with DINOv2's separate
    iBOT head, an ``ibot_head`` for the patch tokens); the student and the teacher are each one. What is
    specific to the backbone's family (building, stochastic depth, the DINO embedding, patch tokens and
    mask token) is :mod:`dino_hf.models.backbones`'."""

    def __init__(self, config: DinoConfig, drop_path_rate: float = 0.0) -> None:
        super().__init__()
        self.family = family_of(config.backbone_config)
        self.backbone = self.family.build(config.backbone_config, drop_path_rate, mask_token=config.uses_ibot)
        self._compiled_embed = None  # set by compile_backbone
        head_settings = {
            "in_features": self.family.embedding_size(config.backbone_config),
            "hidden_size": config.head_hidden_size,
            "bottleneck_size": config.head_bottleneck_size,
            "num_layers": config.head_num_layers,
            "use_batch_norm": config.head_use_batch_norm,
            "norm_last_layer": config.norm_last_layer,
        }
        self.head = DinoHead(num_prototypes=config.num_prototypes, **head_settings)
        self.ibot_head = None
        if config.uses_ibot and config.ibot_separate_head:
            self.ibot_head = DinoHead(num_prototypes=config.ibot_head_num_prototypes, **head_settings)

    @property
    def heads(self) -> list[DinoHead]:
        """The projection heads: the DINO head, then the separate iBOT head if any."""
        return [self.head] if self.ibot_head is None else [self.head, self.ibot_head]

    def embed_tokens(
        self, pixel_values: torch.Tensor, bool_masked_pos: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(N, 3, H, W)`` -> ``(N, D)`` DINO embeddings and ``(N, P, D)`` patch tokens (registers
        excluded), masked patches (``bool_masked_pos`` ``(N, P)``) replaced by the mask token."""
        return self.family.embed_tokens(self.backbone, pixel_values, bool_masked_pos)

    def embed(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """``(N, 3, H, W)`` -> ``(N, embedding_size)``: the backbone's DINO embedding (its family's)."""
        if self._compiled_embed is not None:
            return self._compiled_embed(self.backbone, pixel_values)
        return self.family.embed(self.backbone, pixel_values)

    def compile_backbone(self, **compile_options) -> None:
        """``torch.compile`` what :meth:`embed` runs, as one function (weights and state-dict names unchanged).

        One compiled frame for the whole backbone: compiling each block separately would share one
        code object between blocks whose drop-path rates differ, and recompile past torch's limit.
        """
        self._compiled_embed = torch.compile(self.family.embed, **compile_options)


class DinoPreTrainedModel(PreTrainedModel):
    """Weight initialisation and loading conventions shared by the DINO models."""

    config: DinoConfig
    config_class = DinoConfig
    base_model_prefix = "dino"
    main_input_name = "global_crops"
    input_modalities = ("image",)
    supports_gradient_checkpointing = True
    _no_split_modules = ["ViTEmbeddings", "ViTLayer"]
    _supports_sdpa = True

    def _init_weights(self, module: nn.Module) -> None:
        """The official DINO head initialisation (:func:`initialize_head_module`) and zero centers.

        The backbone (a ``ViTModel``) initialises itself with its own ``_init_weights``.
        """
        initialize_head_module(module, init)
        if isinstance(module, (DinoLoss, IBOTPatchLoss)):
            init.zeros_(module.center)

    def get_input_embeddings(self) -> None:
        """None: the model has no token embedding (accelerate's FSDP2 preparation asks)."""
        return None


class DinoForPreTraining(DinoPreTrainedModel):
    """Student and teacher networks plus the DINO loss.

    Example:

    ```python
    >>> import torch
    >>> from dino_hf import DinoConfig, DinoForPreTraining
    >>> config = DinoConfig.from_preset("vit_tiny_patch16", num_prototypes=1024)
    >>> model = DinoForPreTraining(config)
    >>> global_crops = torch.randn(2, 4, 3, 224, 224)  # (num_global, batch, 3, H, W)
    >>> local_crops = torch.randn(8, 4, 3, 96, 96)  # (num_local, batch, 3, h, w)
    >>> output = model(global_crops, local_crops, teacher_temperature=0.04)
    >>> output.loss.backward()
    >>> model.update_teacher(momentum=0.996)
    ```
    """

    def __init__(self, config: DinoConfig) -> None:
        super().__init__(config)
        config.check_architecture()
        self.student = DinoStudentTeacherNetwork(config, drop_path_rate=config.drop_path_rate)
        self.teacher = DinoStudentTeacherNetwork(config, drop_path_rate=0.0)
        loss_settings = {
            "student_temperature": config.student_temperature,
            "center_momentum": config.center_momentum,
            "centering": config.teacher_centering,
            "sinkhorn_iterations": config.sinkhorn_iterations,
        }
        self.loss_fn = DinoLoss(num_prototypes=config.num_prototypes, **loss_settings)
        self.ibot_loss_fn = None
        if config.uses_ibot:
            self.ibot_loss_fn = IBOTPatchLoss(num_prototypes=config.ibot_head_num_prototypes, **loss_settings)
        self.koleo_loss_fn = KoLeoLoss() if config.koleo_loss_weight > 0 else None
        self.distillation = None
        if config.distils:
            width = self.student.family.embedding_size(config.backbone_config)
            self.distillation = DistillationProjectors(width, width, config.distillation_embedding_size,
                                                       **config.distillation_loss_settings)
        self.post_init()
        # FSDP wraps the blocks of this backbone family (accelerate reads the model's _no_split_modules)
        self._no_split_modules = set(self.student.backbone._no_split_modules or [])
        self._set_trainable_parameters()
        # The teacher starts as an exact copy of the student (official: load_state_dict).
        self._copy_student_to_teacher()

    def _set_trainable_parameters(self) -> None:
        """Teacher: no gradients at all. Student: all but a fixed prototype norm (``norm_last_layer``)."""
        self.teacher.requires_grad_(False)
        self.student.requires_grad_(True)
        for head in self.student.heads:
            head.last_layer.weight_g.requires_grad_(not self.config.norm_last_layer)

    @classmethod
    def from_pretrained(cls, *args, **kwargs) -> DinoForPreTraining:
        """``PreTrainedModel.from_pretrained``, then the gradient flags that loading resets."""
        model = super().from_pretrained(*args, **kwargs)
        if isinstance(model, tuple):  # output_loading_info=True
            model[0]._set_trainable_parameters()
        else:
            model._set_trainable_parameters()
        return model

    @torch.no_grad()
    def _copy_student_to_teacher(self) -> None:
        for student_tensor, teacher_tensor in self._student_teacher_pairs():
            if not teacher_tensor.is_meta:
                teacher_tensor.copy_(student_tensor)

    def _student_teacher_pairs(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Matching (student, teacher) parameters, in a fixed order."""
        teacher_parameters = dict(self.teacher.named_parameters())
        return [(parameter, teacher_parameters[name]) for name, parameter in self.student.named_parameters()]

    # ------------------------------------------------------------------ forward
    @staticmethod
    def _check_crops(global_crops: torch.Tensor, local_crops: torch.Tensor | None) -> None:
        if not isinstance(global_crops, torch.Tensor) or global_crops.ndim != 5 or global_crops.shape[2] != 3:
            shape = tuple(global_crops.shape) if isinstance(global_crops, torch.Tensor) else type(global_crops)
            raise ValueError(
                f"global_crops must have shape (num_global_crops, batch, 3, height, width), got {shape}."
            )
        num_global, batch = global_crops.shape[:2]
        num_local = 0
        if local_crops is not None:
            if local_crops.ndim != 5 or local_crops.shape[2] != 3 or local_crops.shape[1] != batch:
                raise ValueError(
                    f"local_crops must have shape (num_local_crops, {batch}, 3, height, width) to match "
                    f"global_crops, got {tuple(local_crops.shape)}."
                )
            num_local = local_crops.shape[0]
        if num_global < 1 or num_global + num_local < 2:
            raise ValueError(
                "DINO needs at least 2 crops per image (e.g. 2 global crops); got "
                f"{num_global} global and {num_local} local crops."
            )

    def forward(
        self,
        global_crops: torch.Tensor,
        local_crops: torch.Tensor | None = None,
        teacher_temperature: float | torch.Tensor = OFFICIAL_TEACHER_TEMPERATURE,
        update_center: bool | None = None,
        return_dict: bool = True,
        freeze_backbone: bool = False,
        masks: torch.Tensor | None = None,
        distillation_targets: DistillationTargets | None = None,
    ) -> DinoForPreTrainingOutput | tuple:
        """Run teacher on the global crops and student on all crops; compute the DINO (v2) objective.

        With iBOT (``config.ibot_loss_weight > 0``) and ``masks``, the student sees its global crops with
        the masked patches replaced by the backbone's mask token while the teacher sees them unmasked,
        as in DINOv2; the student's masked patch tokens learn the teacher's (:class:`IBOTPatchLoss`).
        With KoLeo the student's global-crop embeddings are spread (:class:`KoLeoLoss`, per crop).

        Args:
            global_crops: ``(num_global_crops, batch, 3, H, W)``, crop-major.
            local_crops: ``(num_local_crops, batch, 3, h, w)`` or ``None``.
            teacher_temperature: teacher softmax temperature (schedule value for this step), of both teachers.
            update_center: update the losses' centers after the loss; ``None`` means "in training mode".
                Pass ``False`` on gradient-accumulation micro-steps and update once per optimiser
                step from the averaged ``teacher_logits_mean`` (and the iBOT sums).
            freeze_backbone: the student's backbone runs without gradients (a head warm-up).
            masks: ``(num_global_crops, batch, H / patch, W / patch)`` (or ``(..., num_patches)``) bool,
                the patches of the student's global crops to mask (:class:`dino_hf.data.masking.MaskSampler`);
                only with iBOT. Best given on the CPU (the masked positions are then found without a
                device synchronisation).
            distillation_targets: what a frozen teacher says about ``global_crops.flatten(0, 1)``
                (:class:`~dino_hf.models.distillation.FrozenTeacher`); required exactly when the model distils.
        """
        self._check_crops(global_crops, local_crops)
        if (self.distillation is None) != (distillation_targets is None):
            raise ValueError("distillation_targets must be given exactly when the model distils a teacher "
                             "(config.distillation_embedding_size is set).")
        num_global, batch = global_crops.shape[:2]
        global_flat = global_crops.flatten(0, 1)
        if not self.config.self_distils:
            output = self._distillation_forward(global_flat, num_global, batch, distillation_targets, freeze_backbone)
            return output if return_dict else output.to_tuple()
        patch_masks = self._flat_masks(masks, num_global, batch)
        use_ibot = patch_masks is not None
        if use_ibot:
            # rows of the masked patches in (crop, patch) order: found on the masks' device (the CPU)
            masked_rows = patch_masks.flatten().nonzero().squeeze(1).to(global_flat.device, non_blocking=True)
            bool_masked_pos = patch_masks.to(global_flat.device, non_blocking=True)

        with torch.no_grad():
            if use_ibot:
                teacher_class, teacher_patches = self.teacher.embed_tokens(global_flat)
                teacher_masked = self._masked_patches(teacher_patches, masked_rows, patch_masks.shape[1])
                teacher_logits, teacher_patch_logits = self._heads(self.teacher, teacher_class, teacher_masked)
            else:
                teacher_logits = self.teacher.head(self.teacher.embed(global_flat))
            teacher_logits = teacher_logits.view(num_global, batch, -1)

        with torch.no_grad() if freeze_backbone else contextlib.nullcontext():
            if use_ibot:
                global_class, student_patches = self.student.embed_tokens(global_flat, bool_masked_pos)
                student_masked = self._masked_patches(student_patches, masked_rows, patch_masks.shape[1])
                student_map = None  # the dense distillation term is refused with iBOT (DinoConfig)
            else:
                global_class, student_map = self._student_global(global_flat)
            class_tokens = [global_class]
            if local_crops is not None and local_crops.shape[0] > 0:
                class_tokens.append(self.student.embed(local_crops.flatten(0, 1)))
        class_tokens = torch.cat(class_tokens)
        if use_ibot:
            student_logits, student_patch_logits = self._heads(self.student, class_tokens, student_masked)
        else:
            student_logits = self.student.head(class_tokens)
        student_logits = student_logits.view(-1, batch, student_logits.shape[-1])

        losses = self.loss_fn(
            student_logits, teacher_logits, teacher_temperature, update_center=update_center, return_statistics=True
        )
        output = DinoForPreTrainingOutput(
            loss=self.config.dino_loss_weight * losses.loss,
            dino_loss=losses.loss,
            student_logits=student_logits,
            teacher_logits=teacher_logits,
            teacher_entropy=losses.teacher_entropy,
            teacher_mean_entropy=losses.teacher_mean_entropy,
            teacher_logits_mean=losses.teacher_logits_mean,
            loss_statistics=losses.statistics,
        )
        if self.ibot_loss_fn is not None:
            if use_ibot:
                patch_losses = self.ibot_loss_fn(student_patch_logits, teacher_patch_logits, patch_masks,
                                                 teacher_temperature, update_center=update_center,
                                                 return_statistics=True)
                output.ibot_loss = patch_losses.loss
                output.ibot_teacher_entropy = patch_losses.teacher_entropy
                output.ibot_teacher_mean_entropy = patch_losses.teacher_mean_entropy
                output.ibot_teacher_logits_sum = patch_losses.teacher_logits_sum
                output.ibot_num_masked_patches = patch_losses.num_masked_patches
            else:  # nothing masked: no patch term
                output.ibot_loss = torch.zeros((), device=losses.loss.device, dtype=losses.loss.dtype)
            output.loss = output.loss + self.config.ibot_loss_weight * output.ibot_loss
        if self.koleo_loss_fn is not None:
            # per global crop, as DINOv2 (two crops of one image are not each other's neighbours)
            per_crop = torch.stack([self.koleo_loss_fn(crop) for crop in global_class.view(num_global, batch, -1)])
            output.koleo_loss = per_crop.mean()
            output.loss = output.loss + self.config.koleo_loss_weight * per_crop.sum()
        if self.distillation is not None:
            self._add_distillation(output, global_class, student_map, distillation_targets)
        return output if return_dict else output.to_tuple()

    def _student_global(self, global_flat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The student's ``(N, D)`` embedding of the global crops and, when the dense distillation term needs
        it, its ``(N, C, h, w)`` feature map (else ``None``), from one forward pass."""
        if self.distillation is not None and self.distillation.uses_dense:
            return self.student.family.embed_map(self.student.backbone, global_flat)
        return self.student.embed(global_flat), None

    def _add_distillation(self, output: DinoForPreTrainingOutput, global_class: torch.Tensor,
                          student_map: torch.Tensor | None, targets: DistillationTargets) -> None:
        """The distillation terms of the student's global crops, added to ``output`` and its loss."""
        distilled = self.distillation(global_class, student_map, targets)
        output.distillation_loss = distilled.loss
        output.distillation_terms = distilled.terms
        output.loss = distilled.loss if output.loss is None else output.loss + distilled.loss

    def _distillation_forward(self, global_flat: torch.Tensor, num_global: int, batch: int,
                              targets: DistillationTargets, freeze_backbone: bool) -> DinoForPreTrainingOutput:
        """Pure distillation (``dino_loss_weight`` 0, no iBOT): the student on its global crops against the frozen
        teacher, with KoLeo when it has a weight; the EMA teacher and the local crops are not run."""
        with torch.no_grad() if freeze_backbone else contextlib.nullcontext():
            global_class, student_map = self._student_global(global_flat)
        output = DinoForPreTrainingOutput()
        self._add_distillation(output, global_class, student_map, targets)
        if self.koleo_loss_fn is not None:
            per_crop = torch.stack([self.koleo_loss_fn(crop) for crop in global_class.view(num_global, batch, -1)])
            output.koleo_loss = per_crop.mean()
            output.loss = output.loss + self.config.koleo_loss_weight * per_crop.sum()
        return output

    def _flat_masks(self, masks: torch.Tensor | None, num_global: int, batch: int) -> torch.Tensor | None:
        """``masks`` as ``(num_global * batch, P)`` bool in the order of ``global_crops.flatten(0, 1)``, or
        ``None`` when nothing is to be masked (no masks, or no iBOT)."""
        if masks is None or self.ibot_loss_fn is None:
            return None
        if not isinstance(masks, torch.Tensor) or masks.dtype != torch.bool or masks.ndim not in (3, 4) \
                or tuple(masks.shape[:2]) != (num_global, batch):
            got = f"{masks.dtype} {tuple(masks.shape)}" if isinstance(masks, torch.Tensor) else type(masks).__name__
            raise ValueError(
                f"masks must be a bool tensor of shape ({num_global}, {batch}, h, w) or ({num_global}, {batch}, "
                f"num_patches) to match global_crops, got {got}."
            )
        return masks.reshape(num_global * batch, -1)

    @staticmethod
    def _masked_patches(patch_tokens: torch.Tensor, masked_rows: torch.Tensor, num_patches: int) -> torch.Tensor:
        """``(N, P, D)`` patch tokens -> ``(M, D)``, the masked ones in (crop, patch) order."""
        if patch_tokens.shape[1] != num_patches:
            raise ValueError(
                f"masks cover {num_patches} patches per crop but the backbone gives {patch_tokens.shape[1]} patch "
                "tokens: draw the masks on the global crops' patch grid."
            )
        return patch_tokens.flatten(0, 1).index_select(0, masked_rows)

    @staticmethod
    def _heads(
        network: DinoStudentTeacherNetwork, class_tokens: torch.Tensor, masked_patches: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """DINO logits of the class tokens and iBOT logits of the masked patch tokens: one call of the
        shared head on both (as DINOv2), or each through its own head."""
        if network.ibot_head is not None:
            return network.head(class_tokens), network.ibot_head(masked_patches)
        logits = network.head(torch.cat([class_tokens, masked_patches]))
        return logits[: class_tokens.shape[0]], logits[class_tokens.shape[0]:]

    def embed(self, pixel_values: torch.Tensor, which: str = "teacher") -> torch.Tensor:
        """``(N, 3, H, W)`` -> ``(N, D)`` DINO embedding of the teacher (default) or student."""
        return self._network(which).embed(pixel_values)

    def _network(self, which: str) -> DinoStudentTeacherNetwork:
        if which not in ("teacher", "student"):
            raise ValueError(f"which must be 'teacher' or 'student', got {which!r}.")
        return self.teacher if which == "teacher" else self.student

    # ------------------------------------------------------------------ training helpers
    @torch.no_grad()
    def update_teacher(self, momentum: float | torch.Tensor) -> None:
        """EMA of the student into the teacher: ``teacher = momentum * teacher + (1 - momentum) * student``.

        One fused ``torch._foreach_lerp_`` over all parameters (no Python loop over tensors); with
        ``momentum == 1`` the teacher is unchanged and with ``momentum == 0`` it becomes the student.
        ``momentum`` may be a 0-dim tensor on the parameters' device (e.g. 1.0 on a skipped step,
        chosen on the device): it is then used without reading it back to the host.
        """
        cached = getattr(self, "_ema_pairs", None)
        if cached is None or cached[0][0] is not next(self.student.parameters()):
            # (re)built when the parameters were replaced, e.g. by FSDP's sharded ones
            pairs = self._student_teacher_pairs()
            self._ema_pairs = ([student for student, _ in pairs], [teacher for _, teacher in pairs])
        student_parameters, teacher_parameters = self._ema_pairs
        if isinstance(momentum, torch.Tensor):
            if momentum.ndim != 0:
                raise ValueError(f"momentum must be a number or a 0-dim tensor, got shape {tuple(momentum.shape)}.")
            weight = (1.0 - momentum).to(teacher_parameters[0].dtype)
            torch._foreach_lerp_(teacher_parameters, student_parameters, [weight] * len(teacher_parameters))
            return
        if not 0.0 <= momentum <= 1.0:
            raise ValueError(f"momentum must be in [0, 1] (official 0.996 -> 1), got {momentum!r}.")
        torch._foreach_lerp_(teacher_parameters, student_parameters, 1.0 - momentum)

    def _apply(self, fn, recurse: bool = True):
        # Moving or casting the model creates new parameter tensors: forget the cached EMA pairs.
        self._ema_pairs = None
        return super()._apply(fn, recurse)

    def get_parameter_groups(
        self,
        weight_decay: float,
        backbone_learning_rate_scale: float = 1.0,
        layerwise_learning_rate_decay: float = 1.0,
    ) -> list[dict]:
        """Optimiser parameter groups of the student (and its distillation projectors), following the official DINO rule.

        Biases and all 1-D parameters (norm weights, layer scales) get no weight decay; frozen
        parameters (the teacher, a fixed prototype norm) are left out. Each group carries
        ``apply_weight_decay`` (so that a weight-decay schedule updates only the decayed groups) and
        ``lr_scale`` (the training step sets ``lr = scheduled lr * lr_scale``).

        Args:
            weight_decay: initial weight decay of the decayed groups.
            backbone_learning_rate_scale: learning-rate factor of every backbone parameter (the heads
                keep 1): continued pre-training moves a pretrained backbone less than its fresh head.
            layerwise_learning_rate_decay: factor per block from the top (as DINOv2 / BEiT fine-tuning):
                block ``i`` of ``L`` gets ``decay ** (L + 1 - i)``, the embeddings ``decay ** (L + 1)``.
        """
        family = self.student.family
        num_blocks = family.num_blocks(self.config.backbone_config)
        groups: dict[tuple[bool, float], list[torch.nn.Parameter]] = {}
        named = list(self.student.named_parameters())
        if not self.config.self_distils:  # pure distillation: the DINO heads get no gradient, so no optimiser state
            named = [(name, parameter) for name, parameter in named if not name.startswith(("head.", "ibot_head."))]
        if self.distillation is not None:  # the projectors to a frozen teacher learn as the heads do
            named += list(self.distillation.named_parameters(prefix="distillation"))
        for name, parameter in named:
            if not parameter.requires_grad:
                continue
            scale = 1.0
            if name.startswith("backbone."):
                depth = family.block_index(name[len("backbone."):], num_blocks)
                scale = backbone_learning_rate_scale * layerwise_learning_rate_decay ** (num_blocks + 1 - depth)
            decayed = not (name.endswith(".bias") or parameter.ndim <= 1)
            groups.setdefault((decayed, scale), []).append(parameter)
        return [
            {
                "params": parameters,
                "weight_decay": weight_decay if decayed else 0.0,
                "apply_weight_decay": decayed,
                "lr_scale": scale,
            }
            for (decayed, scale), parameters in sorted(groups.items(), key=lambda item: (not item[0][0], -item[0][1]))
        ]

    def backbone_parameters(self, which: str = "student") -> list[torch.nn.Parameter]:
        """The parameters of the student's (or teacher's) backbone."""
        return list(self._network(which).backbone.parameters())

    @torch.no_grad()
    def copy_student_head_to_teacher(self) -> None:
        """Make the teacher's heads the student's (e.g. at the end of a head warm-up, whose EMA lags)."""
        for student_head, teacher_head in zip(self.student.heads, self.teacher.heads, strict=True):
            teacher_head.load_state_dict(student_head.state_dict())

    def cancel_last_layer_gradients(self) -> None:
        """Drop the gradients of the student's prototype layers (official last-layer freeze; DINOv2
        freezes the iBOT head's as well)."""
        for head in self.student.heads:
            for parameter in head.last_layer.parameters():
                parameter.grad = None

    # ------------------------------------------------------------------ export / import
    def save_backbone(self, output_dir: str | Path, which: str = "teacher", image_size: int | None = None) -> Path:
        """Write the teacher (default) or student backbone as a stock ``transformers`` folder.

        The folder holds ``config.json``, ``model.safetensors`` and a ``preprocessor_config.json`` (the
        processor the backbone came with, else ImageNet mean/std and a resize to ``image_size``), so
        that ``AutoModel.from_pretrained``, ``AutoImageProcessor`` and
        ``pipeline("image-feature-extraction")`` work without dino_hf. The export is the class of the
        input (a ``ViTModel`` stays a ``ViTModel``, a DINOv2 a ``Dinov2Model``...). ViT and DeiT
        exports carry an identity pooler, so ``pooler_output`` is the DINO embedding too.

        Args:
            output_dir: destination folder (created).
            which: ``"teacher"`` (the official choice for evaluation) or ``"student"``.
            image_size: processor resolution of a backbone trained from scratch; defaults to the
                backbone's ``image_size``.
        """
        backbone = self._network(which).backbone
        if getattr(backbone.config, "drop_path_rate", None) != getattr(self.config.backbone_config, "drop_path_rate", None):
            # the student's own stochastic depth is a training setting: export the configured value
            backbone = copy.copy(backbone)
            backbone.config = copy.deepcopy(self.config.backbone_config)
        return save_backbone(backbone, output_dir, image_size, self.config.backbone_image_processor)

    @classmethod
    def from_backbone(
        cls, backbone: str | Path | PreTrainedModel, config: DinoConfig | None = None,
        hub_options: Mapping[str, Any] | None = None, **config_kwargs
    ) -> DinoForPreTraining:
        """Start DINO pre-training from an existing backbone of any supported family (continued pre-training).

        Args:
            backbone: a backbone model, or a folder / Hub id that ``AutoModel`` loads (e.g.
                ``facebook/dinov2-small`` or a folder written by :meth:`save_backbone`). Its image
                processor, when it has one, is kept for the exports.
            config: a DinoConfig for the heads and loss; its ``backbone_config`` is replaced by the
                backbone's own. When omitted, DINO defaults plus ``config_kwargs`` are used.
            hub_options: ``revision``, ``token`` and ``cache_dir`` of a Hub id (``from_pretrained``'s).
        Returns:
            A model whose student and teacher backbones both hold the given weights and whose heads
            are freshly initialised.
        """
        processor = None
        if not isinstance(backbone, PreTrainedModel):
            hub_options = dict(hub_options or {})
            processor = image_processor_dict(backbone, **hub_options)
            backbone = family_of(AutoConfig.from_pretrained(backbone, **hub_options)).load(backbone, **hub_options)
        family = family_of(backbone.config)
        backbone_config = copy.deepcopy(backbone.config)
        if config is None:
            config = DinoConfig(backbone_config=backbone_config, **config_kwargs)
        else:
            config = copy.deepcopy(config)
            config.backbone_config = backbone_config
            for key, value in config_kwargs.items():
                setattr(config, key, value)
        config.backbone_image_processor = processor
        if family.stochastic_depth is None:
            config.drop_path_rate = 0.0
        model = cls(config)
        state = family.state_dict_for_loading(backbone)
        for network in (model.student, model.teacher):
            family.load_weights(network.backbone, state)
        return model


AutoConfig.register(DinoConfig.model_type, DinoConfig, exist_ok=True)
AutoModel.register(DinoConfig, DinoForPreTraining, exist_ok=True)
AutoModelForPreTraining.register(DinoConfig, DinoForPreTraining, exist_ok=True)

__all__ = [
    "DinoForPreTraining",
    "DinoForPreTrainingOutput",
    "DinoHead",
    "DinoPreTrainedModel",
]

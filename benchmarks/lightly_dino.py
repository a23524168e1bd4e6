"""A DINO optimiser step as a lightly + timm user writes it: the second reference of bench_train_step.py.

Follows lightly's own DINO example (``examples/pytorch/dino.py``) and ImageNet ViT benchmark:

- backbone: timm's ``VisionTransformer`` with the architecture of the dino_hf model it is compared
  with (``vit_tiny_patch16_224`` for the benchmark's default), ``num_classes=0``,
  ``dynamic_img_size=True``, drop path on the student only; ``vit(x)`` returns the normed CLS token;
- head: ``lightly.models.modules.DINOProjectionHead(dim, hidden, bottleneck, K)`` (its last layer is
  ``nn.utils.weight_norm`` with the norm frozen, as the official ``norm_last_layer=True``);
- teacher: a deep copy of the student backbone without drop path and a second head loaded with the
  student head's weights (``copy.deepcopy`` of an ``nn.utils.weight_norm`` module fails), no gradients;
- "grouped forward": the global crops in one backbone call, the local crops in another, one head
  call on the concatenated features (the teacher: global crops only);
- ``lightly.loss.DINOLoss`` (all crop pairs, centre EMA inside), ``torch.optim.AdamW`` over lightly's
  ``get_weight_decay_parameters`` groups, ``torch.nn.utils.clip_grad_norm_`` (lightly has no clipping
  helper of its own) and ``lightly.models.utils.update_momentum`` for the EMA.

:func:`copy_dino_hf_weights` loads a dino_hf network's weights into it, so both steps start from the
same function. Needs ``pip install -e '.[bench]'`` (lightly, timm).
"""

from __future__ import annotations

import contextlib
import copy

import torch
from torch import nn

CLIP_GRAD = 3.0
TEACHER_MOMENTUM = 0.996
TEACHER_TEMPERATURE = 0.04
WEIGHT_DECAY = 0.04

def lightly_available() -> bool:
    """Whether lightly and timm can be imported (the ``bench`` extra)."""
    try:
        import lightly  # noqa: F401
        import timm  # noqa: F401
    except ImportError:
        return False
    return True


class LightlyTimmStep:
    """One optimiser step of a lightly + timm DINO, called like the other steps of bench_train_step.py."""

    def __init__(self, config, learning_rate: float, autocast=None) -> None:
        from lightly.loss import DINOLoss
        from lightly.models.modules import DINOProjectionHead
        from lightly.models.utils import deactivate_requires_grad, get_weight_decay_parameters
        from timm.layers import DropPath
        from timm.models.vision_transformer import VisionTransformer

        vit = config.backbone_config
        self.student_backbone = VisionTransformer(
            img_size=vit.image_size, patch_size=vit.patch_size, embed_dim=vit.hidden_size, depth=vit.num_hidden_layers,
            num_heads=vit.num_attention_heads, mlp_ratio=vit.intermediate_size / vit.hidden_size, qkv_bias=vit.qkv_bias,
            num_classes=0, dynamic_img_size=True, drop_path_rate=config.drop_path_rate,
        )
        hidden_size, num_prototypes = vit.hidden_size, config.num_prototypes
        head_sizes = (hidden_size, config.head_hidden_size, config.head_bottleneck_size, num_prototypes)
        self.student_head = DINOProjectionHead(*head_sizes)
        self.teacher_backbone = copy.deepcopy(self.student_backbone)
        for module in list(self.teacher_backbone.modules()):
            for child_name, child in list(module.named_children()):
                if isinstance(child, DropPath):
                    setattr(module, child_name, nn.Identity())
        self.teacher_head = DINOProjectionHead(*head_sizes)
        self.teacher_head.load_state_dict(self.student_head.state_dict())
        deactivate_requires_grad(self.teacher_backbone)
        deactivate_requires_grad(self.teacher_head)
        self.criterion = DINOLoss(output_dim=num_prototypes, warmup_teacher_temp=TEACHER_TEMPERATURE,
                                  teacher_temp=TEACHER_TEMPERATURE)
        decayed, not_decayed = get_weight_decay_parameters([self.student_backbone, self.student_head])
        self.optimizer = torch.optim.AdamW(
            [{"params": decayed, "weight_decay": WEIGHT_DECAY}, {"params": not_decayed, "weight_decay": 0.0}],
            lr=learning_rate,
        )
        self.trainable = [parameter for module in (self.student_backbone, self.student_head)
                          for parameter in module.parameters() if parameter.requires_grad]
        self.autocast = autocast or contextlib.nullcontext

    def to(self, device: torch.device) -> LightlyTimmStep:
        for module in (self.student_backbone, self.student_head, self.teacher_backbone, self.teacher_head,
                       self.criterion):
            module.to(device)
        return self

    def __call__(self, views: list[torch.Tensor], global_crops=None, local_crops=None) -> torch.Tensor:
        from lightly.models.utils import update_momentum

        global_views, local_views = torch.cat(views[:2]), torch.cat(views[2:]) if len(views) > 2 else None
        with self.autocast():
            with torch.no_grad():
                teacher_projections = self.teacher_head(self.teacher_backbone(global_views))
            features = [self.student_backbone(global_views)]
            if local_views is not None:
                features.append(self.student_backbone(local_views))
            student_projections = self.student_head(torch.cat(features))
            loss = self.criterion(
                teacher_out=list(teacher_projections.chunk(2)),
                student_out=list(student_projections.chunk(len(views))),
                teacher_temp=TEACHER_TEMPERATURE,
            )
        self.optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.trainable, CLIP_GRAD)
        self.optimizer.step()
        update_momentum(self.student_backbone, self.teacher_backbone, m=TEACHER_MOMENTUM)
        update_momentum(self.student_head, self.teacher_head, m=TEACHER_MOMENTUM)
        return loss.detach()


@torch.no_grad()
def copy_dino_hf_weights(step: LightlyTimmStep, student: nn.Module, teacher: nn.Module) -> None:
    """Load dino_hf's student and teacher (``ViTModel`` + ``DinoHead``) into the timm/lightly modules."""
    for network, backbone, head in ((student, step.student_backbone, step.student_head),
                                    (teacher, step.teacher_backbone, step.teacher_head)):
        hf = network.backbone
        backbone.cls_token.copy_(hf.embeddings.cls_token)
        backbone.pos_embed.copy_(hf.embeddings.position_embeddings)
        backbone.patch_embed.proj.load_state_dict(hf.embeddings.patch_embeddings.projection.state_dict())
        for block, layer in zip(backbone.blocks, hf.layers, strict=True):
            attention = layer.attention
            block.norm1.load_state_dict(layer.layernorm_before.state_dict())
            block.norm2.load_state_dict(layer.layernorm_after.state_dict())
            projections = (attention.q_proj, attention.k_proj, attention.v_proj)
            block.attn.qkv.weight.copy_(torch.cat([projection.weight for projection in projections]))
            block.attn.qkv.bias.copy_(torch.cat([projection.bias for projection in projections]))
            block.attn.proj.load_state_dict(attention.o_proj.state_dict())
            block.mlp.fc1.load_state_dict(layer.mlp.fc1.state_dict())
            block.mlp.fc2.load_state_dict(layer.mlp.fc2.state_dict())
        backbone.norm.load_state_dict(hf.layernorm.state_dict())
        linears = [module for module in network.head.mlp if isinstance(module, nn.Linear)]
        targets = [module for module in head.layers if isinstance(module, nn.Linear)]
        for source, target in zip(linears, targets, strict=True):
            target.load_state_dict(source.state_dict())
        head.last_layer.weight_g.copy_(network.head.last_layer.weight_g)
        head.last_layer.weight_v.copy_(network.head.last_layer.weight_v)

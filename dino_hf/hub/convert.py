"""Import checkpoints in the official facebookresearch/dino (timm-style) format.

Two inputs are understood:

* a bare backbone state dict (``cls_token``, ``pos_embed``, ``patch_embed.proj.*``,
  ``blocks.N.{norm1,attn.qkv,attn.proj,norm2,mlp.fc1,mlp.fc2}.*``, ``norm.*``), as in the released
  ``dino_vits16_pretrain.pth`` files, optionally with ``module.``/``backbone.`` prefixes;
* a full training checkpoint (``checkpoint.pth`` of ``main_dino.py``) with ``student`` and
  ``teacher`` entries whose keys carry ``module.`` and ``backbone.``/``head.`` prefixes, plus
  ``dino_loss`` (the center).

The architecture is inferred from tensor shapes. Files are read with
``torch.load(weights_only=True)``; official training checkpoints pickle their ``argparse``
arguments, so ``argparse.Namespace`` is the one extra type allowed.
"""

from __future__ import annotations

import argparse
import json
import math
import re
from pathlib import Path

import torch
from transformers import ViTConfig, ViTModel

from dino_hf.base.run_folder import PRETRAINING_PROGRESS_NAME
from dino_hf.models.backbones import save_backbone
from dino_hf.models.configuration_dino import DINO_BACKBONE_DEFAULTS, DinoConfig
from dino_hf.models.modeling_dino import DinoForPreTraining

_BLOCK_KEY = re.compile(r"^blocks\.(\d+)\.")
_PREFIXES = ("module.", "backbone.", "_orig_mod.")


def load_official_checkpoint(path: str | Path) -> dict:
    """Read a ``.pth`` file safely (``weights_only=True``) and return its top-level dict."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"--checkpoint {path} does not exist; pass the path of a DINO .pth file.")
    with torch.serialization.safe_globals([argparse.Namespace]):
        try:
            checkpoint = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as error:  # unpickling errors have many types; all mean "not a checkpoint"
            raise ValueError(
                f"--checkpoint {path} could not be read as a PyTorch checkpoint ({type(error).__name__})."
            ) from error
    if not isinstance(checkpoint, dict):
        raise ValueError(f"--checkpoint {path} holds a {type(checkpoint).__name__}, not a state dict.")
    return checkpoint


def strip_prefixes(state_dict: dict[str, torch.Tensor], prefixes: tuple[str, ...] = _PREFIXES) -> dict:
    """Remove DDP/wrapper prefixes (``module.``, ``backbone.``) from every key."""
    stripped = {}
    for key, value in state_dict.items():
        changed = True
        while changed:
            changed = False
            for prefix in prefixes:
                if key.startswith(prefix):
                    key = key[len(prefix) :]
                    changed = True
        stripped[key] = value
    return stripped


def split_backbone_and_head(state_dict: dict[str, torch.Tensor]) -> tuple[dict, dict]:
    """Split a ``MultiCropWrapper`` state dict into backbone and head parts (prefixes removed)."""
    state_dict = strip_prefixes(state_dict, ("module.", "_orig_mod."))
    head = {key[len("head.") :]: value for key, value in state_dict.items() if key.startswith("head.")}
    backbone = {key: value for key, value in state_dict.items() if not key.startswith("head.")}
    return strip_prefixes(backbone), head


def infer_backbone_config(state_dict: dict[str, torch.Tensor], num_attention_heads: int | None = None) -> ViTConfig:
    """Infer a DINO ``ViTConfig`` from the shapes of an official backbone state dict.

    The number of heads is not visible in the shapes; every official DINO ViT uses 64-dimensional
    heads, so ``hidden_size // 64`` is assumed unless ``num_attention_heads`` is given.
    """
    required = ("cls_token", "pos_embed", "patch_embed.proj.weight", "norm.weight")
    missing = [key for key in required if key not in state_dict]
    if missing:
        raise ValueError(
            f"The checkpoint is not a DINO/timm ViT backbone: keys {missing} are missing "
            f"(found e.g. {sorted(state_dict)[:5]})."
        )
    patch_weight = state_dict["patch_embed.proj.weight"]
    if patch_weight.ndim != 4 or patch_weight.shape[2] != patch_weight.shape[3]:
        raise ValueError(
            f"patch_embed.proj.weight must have shape (hidden, 3, patch, patch), got {tuple(patch_weight.shape)}."
        )
    hidden_size, num_channels, patch_size = patch_weight.shape[0], patch_weight.shape[1], patch_weight.shape[2]
    num_positions = state_dict["pos_embed"].shape[1] - 1
    grid = math.isqrt(num_positions)
    if grid * grid != num_positions or state_dict["pos_embed"].shape[-1] != hidden_size:
        raise ValueError(
            f"pos_embed of shape {tuple(state_dict['pos_embed'].shape)} matches no square ViT grid "
            f"with hidden size {hidden_size}."
        )
    layer_indices = {int(match.group(1)) for key in state_dict if (match := _BLOCK_KEY.match(key))}
    if not layer_indices or sorted(layer_indices) != list(range(len(layer_indices))):
        raise ValueError("The checkpoint's blocks.N.* keys are missing or not numbered 0..depth-1.")
    qkv_weight = state_dict.get("blocks.0.attn.qkv.weight")
    if qkv_weight is None or tuple(qkv_weight.shape) != (3 * hidden_size, hidden_size):
        raise ValueError(
            f"blocks.0.attn.qkv.weight must have shape ({3 * hidden_size}, {hidden_size}) for hidden size "
            f"{hidden_size}, got {None if qkv_weight is None else tuple(qkv_weight.shape)}."
        )
    if num_attention_heads is None:
        num_attention_heads = max(hidden_size // 64, 1)
    if hidden_size % num_attention_heads != 0:
        raise ValueError(
            f"num_attention_heads ({num_attention_heads}) must divide the hidden size {hidden_size}."
        )
    return ViTConfig(
        **{
            **DINO_BACKBONE_DEFAULTS,
            "hidden_size": hidden_size,
            "num_hidden_layers": len(layer_indices),
            "num_attention_heads": num_attention_heads,
            "intermediate_size": state_dict["blocks.0.mlp.fc1.weight"].shape[0],
            "patch_size": patch_size,
            "image_size": grid * patch_size,
            "num_channels": num_channels,
            "qkv_bias": "blocks.0.attn.qkv.bias" in state_dict,
        }
    )


def official_to_vit_state_dict(state_dict: dict[str, torch.Tensor], config: ViTConfig) -> dict[str, torch.Tensor]:
    """Rename (and split ``qkv``) official keys into this transformers version's ``ViTModel`` keys."""
    hidden = config.hidden_size
    converted = {
        "embeddings.cls_token": state_dict["cls_token"],
        "embeddings.position_embeddings": state_dict["pos_embed"],
        "embeddings.patch_embeddings.projection.weight": state_dict["patch_embed.proj.weight"],
        "embeddings.patch_embeddings.projection.bias": state_dict["patch_embed.proj.bias"],
        "layernorm.weight": state_dict["norm.weight"],
        "layernorm.bias": state_dict["norm.bias"],
    }
    renames = {
        "norm1": "layernorm_before",
        "norm2": "layernorm_after",
        "attn.proj": "attention.o_proj",
        "mlp.fc1": "mlp.fc1",
        "mlp.fc2": "mlp.fc2",
    }
    for index in range(config.num_hidden_layers):
        source, target = f"blocks.{index}.", f"layers.{index}."
        for suffix in ("weight", "bias"):
            for old, new in renames.items():
                converted[f"{target}{new}.{suffix}"] = state_dict[f"{source}{old}.{suffix}"]
            qkv_key = f"{source}attn.qkv.{suffix}"
            if qkv_key in state_dict:
                # timm packs q, k, v along the output dimension in that order.
                query, key, value = state_dict[qkv_key].split(hidden, dim=0)
                converted[f"{target}attention.q_proj.{suffix}"] = query
                converted[f"{target}attention.k_proj.{suffix}"] = key
                converted[f"{target}attention.v_proj.{suffix}"] = value
    return {key: value.float().clone() for key, value in converted.items()}


def backbone_from_official(
    state_dict: dict[str, torch.Tensor], num_attention_heads: int | None = None
) -> ViTModel:
    """Build a ``ViTModel`` (no pooler) holding the weights of an official backbone state dict."""
    state_dict = strip_prefixes(state_dict)
    config = infer_backbone_config(state_dict, num_attention_heads)
    model = ViTModel(config, add_pooling_layer=False)
    model.load_state_dict(official_to_vit_state_dict(state_dict, config), strict=True)
    return model.eval()


def infer_head_settings(head_state: dict[str, torch.Tensor]) -> dict:
    """DinoConfig head fields from an official ``DINOHead`` state dict (``mlp.*``, ``last_layer.*``)."""
    if "last_layer.weight_v" not in head_state:
        raise ValueError("The checkpoint's head has no last_layer.weight_v; it is not a DINO head.")
    linear_keys = sorted(
        (key for key in head_state if key.startswith("mlp") and key.endswith(".weight") and head_state[key].ndim == 2),
        key=lambda key: int(key.split(".")[1]) if key.count(".") == 2 else -1,
    )
    linears = [head_state[key] for key in linear_keys]
    if not linears:
        raise ValueError("The checkpoint's head has no mlp linear layers.")
    weight_g = head_state.get("last_layer.weight_g")
    return {
        "num_prototypes": head_state["last_layer.weight_v"].shape[0],
        "head_bottleneck_size": head_state["last_layer.weight_v"].shape[1],
        "head_num_layers": len(linears),
        "head_hidden_size": linears[0].shape[0] if len(linears) > 1 else 2048,
        "head_use_batch_norm": any(key.endswith("running_mean") for key in head_state),
        "norm_last_layer": bool(weight_g is not None and torch.allclose(weight_g, torch.ones_like(weight_g))),
    }


def training_model_from_official(
    checkpoint: dict, num_attention_heads: int | None = None, drop_path_rate: float = 0.1
) -> DinoForPreTraining:
    """Rebuild the full student/teacher model (and center) from an official ``checkpoint.pth``."""
    if "student" not in checkpoint or "teacher" not in checkpoint:
        raise ValueError("The checkpoint has no 'student'/'teacher' entries; it is not a DINO training checkpoint.")
    networks = {}
    for which in ("student", "teacher"):
        backbone_state, head_state = split_backbone_and_head(checkpoint[which])
        networks[which] = (backbone_from_official(backbone_state, num_attention_heads), head_state)
    head_settings = infer_head_settings(networks["teacher"][1])
    config = DinoConfig(
        backbone_config=networks["teacher"][0].config, drop_path_rate=drop_path_rate, **head_settings
    )
    model = DinoForPreTraining(config)
    for which, (backbone, head_state) in networks.items():
        network = getattr(model, which)
        network.backbone.load_state_dict(backbone.state_dict(), strict=True)
        network.head.load_state_dict(head_state, strict=True)
    center = checkpoint.get("dino_loss", {}).get("center") if isinstance(checkpoint.get("dino_loss"), dict) else None
    if center is not None:
        model.loss_fn.center.copy_(center.reshape(1, -1).float())
    return model


def convert_checkpoint(
    checkpoint_path: str | Path,
    output_dir: str | Path,
    checkpoint_key: str = "teacher",
    num_attention_heads: int | None = None,
    save_training_model: bool = False,
) -> Path:
    """Convert an official DINO checkpoint into a ``ViTModel`` backbone folder.

    Args:
        checkpoint_path: ``.pth`` file (bare backbone or full training checkpoint).
        output_dir: destination; the backbone goes to ``output_dir`` (same format as
            ``DinoForPreTraining.save_backbone``) and, with ``save_training_model``, the full
            ``DinoForPreTraining`` to ``output_dir/training_model`` (with the checkpoint's epoch in
            ``pretraining_progress.json``, so that training from that folder continues the schedules).
        checkpoint_key: for full checkpoints, which network's backbone to export (the official
            evaluation uses ``teacher``).
        num_attention_heads: override the inferred head count (``hidden // 64``).
    Returns:
        The backbone folder.
    """
    checkpoint = load_official_checkpoint(checkpoint_path)
    output_dir = Path(output_dir)
    if "student" in checkpoint and "teacher" in checkpoint:
        if checkpoint_key not in ("student", "teacher"):
            raise ValueError(f"--checkpoint_key must be 'student' or 'teacher', got {checkpoint_key!r}.")
        model = training_model_from_official(checkpoint, num_attention_heads)
        if save_training_model:
            model.save_pretrained(output_dir / "training_model")
            epoch = checkpoint.get("epoch")
            if isinstance(epoch, (int, float)) and not isinstance(epoch, bool):
                # the official loop saves the next epoch to run: a run from this folder starts there
                progress = {"epoch": float(epoch), "source": Path(checkpoint_path).name}
                (output_dir / "training_model" / PRETRAINING_PROGRESS_NAME).write_text(json.dumps(progress) + "\n")
        model.save_backbone(output_dir, which=checkpoint_key)
        return output_dir
    if save_training_model:
        raise ValueError("--save_training_model needs a full training checkpoint with 'student' and 'teacher'.")
    state_dict = checkpoint.get(checkpoint_key, checkpoint) if isinstance(checkpoint.get(checkpoint_key), dict) else checkpoint
    state_dict = {key: value for key, value in state_dict.items() if isinstance(value, torch.Tensor)}
    return save_backbone(backbone_from_official(state_dict, num_attention_heads), output_dir)


__all__ = [
    "backbone_from_official",
    "convert_checkpoint",
    "infer_backbone_config",
    "load_official_checkpoint",
    "training_model_from_official",
]

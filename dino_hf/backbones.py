"""What a backbone is to dino_hf: how it is built, loaded, run on a crop batch, regularised and exported.

Today's family is the ``transformers`` ``ViTModel`` (the backbone of the official DINO): its DINO
embedding is the CLS token of ``last_hidden_state`` after the final LayerNorm. This module owns
everything specific to it:

- :func:`embed_class_token`: ``(N, 3, H, W)`` crops -> ``(N, hidden)`` embeddings, with position
  embeddings interpolated for crops of another size and the last block run on the CLS row only
  (:func:`class_token_of_layer`);
- :func:`add_stochastic_depth`: drop-path on a stock ``ViTModel`` through forward hooks;
- :func:`save_backbone` / :func:`build_image_processor`: the export as a stock folder with the
  processor that matches the training crops;
- :func:`load_backbone` / :func:`load_image_processor` / :func:`backbone_forward`: any exported or
  Hub backbone, for evaluation and visualisation.
"""

from __future__ import annotations

import contextlib
import inspect
import json
import logging
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import AutoConfig, AutoImageProcessor, AutoModel, PreTrainedConfig, ViTImageProcessor, ViTModel
from transformers.image_utils import PILImageResampling
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.models.auto.modeling_auto import MODEL_MAPPING
from transformers.models.vit.modeling_vit import ViTLayer, eager_attention_forward

from .augmentation import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

logger = logging.getLogger(__name__)

__all__ = [
    "add_stochastic_depth",
    "backbone_forward",
    "build_image_processor",
    "class_token_of_layer",
    "config_image_size",
    "config_patch_size",
    "embed_class_token",
    "load_backbone",
    "load_image_processor",
    "resolve_backbone_source",
    "save_backbone",
]


# --------------------------------------------------------------------------------------------------
# Stochastic depth
# --------------------------------------------------------------------------------------------------
def drop_path_hook(drop_probability: float) -> Callable[[nn.Module, tuple, torch.Tensor], torch.Tensor | None]:
    """Forward hook that drops a residual branch per sample (stochastic depth, timm's ``DropPath``).

    It is attached to the ``dropout`` module every ``ViTLayer`` applies to its attention and MLP
    branch outputs just before adding the residual, so the backbone's weights and code stay a stock
    ``ViTModel`` (and exports are unaffected). Each call draws its own mask, as timm's two
    ``drop_path`` modules per block do.
    """
    keep_probability = 1.0 - drop_probability

    def hook(module: nn.Module, inputs: tuple, output: torch.Tensor) -> torch.Tensor | None:
        if not module.training or drop_probability == 0.0:
            return None
        # (batch, 1, 1): one Bernoulli draw per sample, broadcast over tokens and channels.
        mask_shape = (output.shape[0],) + (1,) * (output.ndim - 1)
        mask = output.new_empty(mask_shape).bernoulli_(keep_probability)
        return output * mask / keep_probability

    return hook


def add_stochastic_depth(backbone: ViTModel, drop_path_rate: float) -> None:
    """Drop-path rates rising linearly from 0 (first block) to ``drop_path_rate`` (last), as the official ViT."""
    if drop_path_rate <= 0.0:
        return
    num_layers = len(backbone.layers)
    for index, layer in enumerate(backbone.layers):
        rate = drop_path_rate * index / max(num_layers - 1, 1)
        layer.dropout.register_forward_hook(drop_path_hook(rate))


# --------------------------------------------------------------------------------------------------
# The DINO embedding of a crop batch
# --------------------------------------------------------------------------------------------------
def class_token_of_layer(layer: ViTLayer, hidden_states: torch.Tensor) -> torch.Tensor:
    """The CLS row of ``layer(hidden_states)``, computing only what that row depends on.

    DINO uses nothing of the last block but its CLS output, yet a full block computes (and
    back-propagates) every token's query, attention row and MLP. Here keys and values come from all
    ``T`` tokens while the query, the output projection, both residuals, the second layer norm and
    the MLP run on the CLS token alone: the same function to float rounding (tested against
    ``ViTLayer``), at about ``1/T`` of the block's MLP and query cost. It runs the layer's own modules
    (the configured attention implementation, its ``dropout`` with any drop-path hook), so the
    weights stay those of the stock ``ViTLayer``.

    Args:
        layer: a ``ViTLayer``.
        hidden_states: ``(N, T, D)`` input of the layer, CLS token first.
    Returns:
        ``(N, D)``.
    """
    attention = layer.attention
    batch, tokens, _ = hidden_states.shape
    normed = layer.layernorm_before(hidden_states)
    heads, head_dim = attention.num_attention_heads, attention.head_dim
    query = attention.q_proj(normed[:, :1]).view(batch, 1, heads, head_dim).transpose(1, 2)  # (N, H, 1, d)
    key = attention.k_proj(normed).view(batch, tokens, heads, head_dim).transpose(1, 2)  # (N, H, T, d)
    value = attention.v_proj(normed).view(batch, tokens, heads, head_dim).transpose(1, 2)
    attention_function = ALL_ATTENTION_FUNCTIONS.get_interface(
        attention.config._attn_implementation, eager_attention_forward
    )
    attended, _ = attention_function(
        attention, query, key, value, None,
        dropout=attention.attention_dropout if attention.training else 0.0, scaling=attention.scaling,
    )  # (N, 1, H, d)
    class_token = hidden_states[:, 0] + layer.dropout(attention.o_proj(attended.reshape(batch, heads * head_dim)))
    return class_token + layer.dropout(layer.mlp(layer.layernorm_after(class_token)))


def embed_class_token(backbone: ViTModel, pixel_values: torch.Tensor) -> torch.Tensor:
    """``(N, 3, H, W)`` -> ``(N, hidden)``: the normed CLS token of ``last_hidden_state``.

    Runs the backbone's own modules as ``ViTModel.forward`` does, except that the last block computes
    the CLS row only (:func:`class_token_of_layer`). Position embeddings are interpolated when
    ``H, W`` differ from the configured image size (local crops).
    """
    pixel_values = pixel_values.to(backbone.embeddings.patch_embeddings.projection.weight.dtype)
    hidden_states = backbone.embeddings(pixel_values, interpolate_pos_encoding=True)
    if len(backbone.layers) == 0:
        return backbone.layernorm(hidden_states[:, 0])
    for layer in backbone.layers[:-1]:
        hidden_states = layer(hidden_states)
    return backbone.layernorm(class_token_of_layer(backbone.layers[-1], hidden_states))


# --------------------------------------------------------------------------------------------------
# Export
# --------------------------------------------------------------------------------------------------
def build_image_processor(image_size: int | Sequence[int]) -> ViTImageProcessor:
    """The processor of an exported backbone: resize to ``image_size`` (bicubic, as DINO's crops) and
    the training crops' ImageNet mean/std (``ViTImageProcessor`` would otherwise default to 0.5/0.5)."""
    height, width = image_size if isinstance(image_size, (list, tuple)) else (image_size, image_size)
    return ViTImageProcessor(
        do_resize=True,
        size={"height": int(height), "width": int(width)},
        resample=PILImageResampling.BICUBIC,
        do_rescale=True,
        do_normalize=True,
        image_mean=list(IMAGENET_DEFAULT_MEAN),
        image_std=list(IMAGENET_DEFAULT_STD),
    )


def save_backbone(backbone: ViTModel, output_dir: str | Path, image_size: int | None = None) -> Path:
    """Write ``backbone`` with ``save_pretrained`` plus its :func:`build_image_processor` processor."""
    output_dir = Path(output_dir)
    backbone.save_pretrained(output_dir)
    build_image_processor(image_size or backbone.config.image_size).save_pretrained(output_dir)
    return output_dir


# --------------------------------------------------------------------------------------------------
# Loading any backbone, and running it
# --------------------------------------------------------------------------------------------------
#: Which network of a DINO model a tool uses: the teacher (the official evaluation's choice) or the student.
NETWORKS = ("teacher", "student")
#: ``model_type`` of a ``DinoForPreTraining`` config (``dino_hf.configuration_dino.DinoConfig``).
DINO_MODEL_TYPE = "dino_hf"


def resolve_backbone_source(model_name_or_path: str | Path, which: str = "teacher",
                            revision: str | None = None) -> tuple[str, bool]:
    """Where a tool finds the backbone it was pointed at: ``(path or Hub id, is a DinoForPreTraining)``.

    - an exported backbone folder or Hub id: itself (the teacher; ``which="student"`` is refused);
    - a training run's ``--output_dir``: its exported ``backbone/`` for the teacher, the full
      ``DinoForPreTraining`` at its root for the student;
    - a ``DinoForPreTraining`` folder or Hub id (``config.json`` of model type ``dino_hf``): itself.

    Raises:
        ValueError: unknown ``which``; a student asked of an exported backbone; a run folder without a
            model yet. OSError from transformers for a path or id that holds no model.
    """
    if which not in NETWORKS:
        raise ValueError(f"--which must be teacher or student, not {which!r}.")
    path = Path(os.path.expanduser(str(model_name_or_path)))
    if path.is_dir():
        exported = path / "backbone"
        model_type = _local_model_type(path)
        if which == "teacher" and (exported / "config.json").is_file():
            return str(exported), False
        if model_type == DINO_MODEL_TYPE:
            return str(path), True
        if model_type is None:
            hint = " (a run still training has no model until it ends)" if (path / "checkpoints").is_dir() else ""
            raise ValueError(f"{model_name_or_path} holds no config.json{hint}: pass an exported backbone, a finished "
                             "run's --output_dir or a DinoForPreTraining folder.")
        is_dino = False
    else:
        is_dino = AutoConfig.from_pretrained(str(model_name_or_path), revision=revision).model_type == DINO_MODEL_TYPE
    if which == "student" and not is_dino:
        raise ValueError(f"{model_name_or_path} is an exported backbone (the teacher only): --which student needs a "
                         "run's --output_dir or a DinoForPreTraining folder.")
    return str(model_name_or_path), is_dino


def _local_model_type(folder: Path) -> str | None:
    config_file = folder / "config.json"
    if not config_file.is_file():
        return None
    try:
        return str(json.loads(config_file.read_text(encoding="utf-8")).get("model_type", ""))
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise ValueError(f"{config_file} is not valid JSON.") from None


def load_backbone(
    model_name_or_path: str | Path,
    *,
    attn_implementation: str | None = None,
    revision: str | None = None,
    which: str = "teacher",
) -> nn.Module:
    """Load a ViT-style backbone with ``transformers.AutoModel`` (in eval mode).

    ``add_pooling_layer=False`` is passed to model classes that accept it (``ViTModel`` and friends), so
    no randomly initialised pooler is created; the DINO embedding is the CLS token anyway.

    Args:
        model_name_or_path: a folder written by ``save_backbone`` / ``save_pretrained``, a Hub id, a
            training run's ``--output_dir`` or a ``DinoForPreTraining`` folder
            (:func:`resolve_backbone_source`).
        attn_implementation: e.g. ``"eager"`` to be able to return attention weights.
        revision: Hub revision (branch, tag or commit).
        which: ``"teacher"`` or ``"student"`` network of a DINO model.
    Raises:
        OSError / ValueError from transformers when the path or id does not hold a model.
    """
    model_name_or_path, is_dino = resolve_backbone_source(model_name_or_path, which, revision)
    if is_dino:
        from .modeling_dino import DinoForPreTraining

        backbone = getattr(DinoForPreTraining.from_pretrained(model_name_or_path, revision=revision), which).backbone
        if attn_implementation is not None:
            backbone.set_attn_implementation(attn_implementation)
        return backbone.eval()
    config = AutoConfig.from_pretrained(model_name_or_path, revision=revision)
    kwargs: dict[str, Any] = {"revision": revision}
    if attn_implementation is not None:
        kwargs["attn_implementation"] = attn_implementation
    model_class = MODEL_MAPPING[type(config)] if type(config) in MODEL_MAPPING else None
    if model_class is not None and "add_pooling_layer" in inspect.signature(model_class.__init__).parameters:
        kwargs["add_pooling_layer"] = False
    model = AutoModel.from_pretrained(model_name_or_path, config=config, **kwargs)
    return model.eval()


def config_patch_size(config: PreTrainedConfig) -> tuple[int, int]:
    """``config.patch_size`` as (height, width)."""
    patch_size = getattr(config, "patch_size", 16)
    if isinstance(patch_size, Sequence):
        return int(patch_size[0]), int(patch_size[1])
    return int(patch_size), int(patch_size)


def config_image_size(config: PreTrainedConfig) -> int:
    """``config.image_size`` (its first side when it is a pair)."""
    image_size = getattr(config, "image_size", 224)
    return int(image_size[0] if isinstance(image_size, Sequence) else image_size)


def load_image_processor(
    model_name_or_path: str | Path | None,
    backbone_config: PreTrainedConfig,
    image_size: int | None = None,
    *,
    revision: str | None = None,
) -> Any:
    """The image processor that evaluation feeds the backbone with.

    The model's own ``AutoImageProcessor`` when it has one (:func:`save_backbone` writes one); otherwise
    (or for ``model_name_or_path=None``, e.g. a backbone in training) what :func:`save_backbone` would
    write for ``backbone_config``.

    Args:
        image_size: overrides the processor's output resolution (square ``image_size`` px; processors
            that resize the shorter side then centre-crop keep their resize / crop ratio).
    """
    processor = None
    if model_name_or_path is not None:
        # a run folder's exported backbone/ holds the processor; a DinoForPreTraining folder has none
        with contextlib.suppress(ValueError, OSError):
            model_name_or_path = resolve_backbone_source(model_name_or_path, revision=revision)[0]
        try:
            processor = AutoImageProcessor.from_pretrained(model_name_or_path, revision=revision)
        except (OSError, ValueError, KeyError) as error:
            logger.info("No image processor with %s (%s); using ImageNet mean/std.", model_name_or_path, error)
    if processor is None:
        return build_image_processor(image_size or config_image_size(backbone_config))
    if image_size is not None:
        _set_processor_size(processor, image_size)
    return processor


def _set_processor_size(processor: Any, image_size: int) -> None:
    """Make ``processor`` output ``image_size`` x ``image_size`` images (in place)."""
    size = processor.size
    get = size.get if isinstance(size, Mapping) else lambda key: getattr(size, key, None)
    crop_size = getattr(processor, "crop_size", None)
    shortest_edge = get("shortest_edge")
    if get("height") is not None:
        processor.size = {"height": image_size, "width": image_size}
    elif shortest_edge is not None:
        ratio = 1.0
        if crop_size is not None and getattr(processor, "do_center_crop", False):
            crop_get = crop_size.get if isinstance(crop_size, Mapping) else lambda key: getattr(crop_size, key)
            ratio = shortest_edge / crop_get("height")
        processor.size = {"shortest_edge": round(image_size * ratio)}
    else:
        processor.size = {"height": image_size, "width": image_size}
    if crop_size is not None:
        processor.crop_size = {"height": image_size, "width": image_size}


def _accepts_keyword(module: nn.Module, name: str) -> bool:
    try:
        return name in inspect.signature(module.forward).parameters
    except (TypeError, ValueError):
        return False


def backbone_forward(backbone: nn.Module, pixel_values: torch.Tensor, **kwargs: Any) -> Any:
    """``backbone(pixel_values=..., **kwargs)``, asking for position-embedding interpolation when the
    input resolution differs from ``backbone.config.image_size`` and the model supports it."""
    config = getattr(backbone, "config", None)
    if (
        config is not None
        and tuple(pixel_values.shape[-2:]) != (config_image_size(config),) * 2
        and _accepts_keyword(backbone, "interpolate_pos_encoding")
    ):
        kwargs.setdefault("interpolate_pos_encoding", True)
    return backbone(pixel_values=pixel_values, **kwargs)

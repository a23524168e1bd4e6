"""The fast DINO forward of transformers' ViT-style backbones (``ViTModel``, ``DeiTModel``).

DINO uses only the CLS token of the last block, and a CPU (or a small GPU batch) is bound by the
backbone's matrix products. These functions run the backbone's own modules, so the weights, the
state-dict names and the exports stay those of the stock ``transformers`` model:

- :func:`embed_class_token`: ``(N, 3, H, W)`` crops -> ``(N, hidden)`` embeddings, with position
  embeddings interpolated for crops of another size;
- :func:`encode_tokens`: the same forward for every token (the iBOT loss needs the patch tokens of
  the last block, so that block runs in full), masked patches replaced by the mask token;
- :func:`vit_layer_forward`: a block with the query, key and value in one product;
- :func:`class_token_of_layer`: the last block computing only the CLS row;
- :func:`add_stochastic_depth`: drop-path through forward hooks on each block's ``dropout``.

Each is tested against the stock modules to float rounding (tests/test_vit_forward.py).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.models.vit.modeling_vit import ViTLayer, eager_attention_forward

__all__ = [
    "add_stochastic_depth",
    "class_token_of_layer",
    "drop_path_hook",
    "embed_class_token",
    "encode_tokens",
    "vit_layer_forward",
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
        mask = output.new_empty(mask_shape).bernoulli_(keep_probability).div_(keep_probability)
        return output * mask  # one pass over the activations, as timm's drop_path

    return hook


def add_stochastic_depth(backbone: PreTrainedModel, drop_path_rate: float) -> None:
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
def _stacked_projection(
    hidden_states: torch.Tensor, projections: Sequence[nn.Linear], heads: int, head_dim: int
) -> tuple[torch.Tensor, ...]:
    """``(N, T, D)`` through several stock projections in one matrix product: ``(N, H, T, d)`` each.

    The weights are concatenated at every call from the layer's own ``q_proj``/``k_proj``/``v_proj``
    (so the state dict stays a stock ``ViTModel``'s, and the concatenation's backward splits the
    gradient back); one ``(N T, D) @ (D, n D)`` product reads the normed tokens once instead of n times.
    """
    weight = torch.cat([projection.weight for projection in projections])
    biases = [projection.bias for projection in projections]
    bias = None if any(value is None for value in biases) else torch.cat(biases)
    batch, tokens, _ = hidden_states.shape
    stacked = F.linear(hidden_states, weight, bias).view(batch, tokens, len(projections), heads, head_dim)
    return stacked.permute(2, 0, 3, 1, 4).unbind(0)


def _attend(attention: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """The configured attention implementation (sdpa, eager...) of a ``ViTAttention``: ``(N, Tq, H, d)``."""
    attention_function = ALL_ATTENTION_FUNCTIONS.get_interface(
        attention.config._attn_implementation, eager_attention_forward
    )
    attended, _ = attention_function(
        attention, query, key, value, None,
        dropout=attention.attention_dropout if attention.training else 0.0, scaling=attention.scaling,
    )
    return attended


def vit_layer_forward(layer: ViTLayer, hidden_states: torch.Tensor) -> torch.Tensor:
    """``layer(hidden_states)`` for a ``ViTLayer``, with the query, key and value in one product.

    The same function as ``ViTLayer.forward`` to float rounding (tested): pre-norm attention and MLP
    residual branches, each through the layer's ``dropout`` (so drop-path hooks fire), its configured
    attention implementation and, when enabled in training, its gradient checkpointing.

    Args:
        layer: a ``ViTLayer``.
        hidden_states: ``(N, T, D)``.
    Returns:
        ``(N, T, D)``.
    """
    if getattr(layer, "gradient_checkpointing", False) and layer.training:
        return layer._gradient_checkpointing_func(functools.partial(_vit_layer_forward, layer), hidden_states)
    return _vit_layer_forward(layer, hidden_states)


def _vit_layer_forward(layer: ViTLayer, hidden_states: torch.Tensor) -> torch.Tensor:
    attention = layer.attention
    batch, tokens, _ = hidden_states.shape
    heads, head_dim = attention.num_attention_heads, attention.head_dim
    normed = layer.layernorm_before(hidden_states)
    query, key, value = _stacked_projection(normed, (attention.q_proj, attention.k_proj, attention.v_proj),
                                            heads, head_dim)
    attended = _attend(attention, query, key, value)  # (N, T, H, d)
    hidden_states = hidden_states + layer.dropout(attention.o_proj(attended.reshape(batch, tokens, heads * head_dim)))
    return hidden_states + layer.dropout(layer.mlp(layer.layernorm_after(hidden_states)))


def class_token_of_layer(layer: ViTLayer, hidden_states: torch.Tensor) -> torch.Tensor:
    """The CLS row of ``layer(hidden_states)``, computing only what that row depends on.

    DINO uses nothing of the last block but its CLS output, yet a full block computes (and
    back-propagates) every token's query, attention row and MLP. Here keys and values come from all
    ``T`` tokens (in one product) while the query, the output projection, both residuals, the second
    layer norm and the MLP run on the CLS token alone: the same function to float rounding (tested
    against ``ViTLayer``), at about ``1/T`` of the block's MLP and query cost. It runs the layer's own
    modules (the configured attention implementation, its ``dropout`` with any drop-path hook), so the
    weights stay those of the stock ``ViTLayer``.

    Args:
        layer: a ``ViTLayer``.
        hidden_states: ``(N, T, D)`` input of the layer, CLS token first.
    Returns:
        ``(N, D)``.
    """
    attention = layer.attention
    batch = hidden_states.shape[0]
    heads, head_dim = attention.num_attention_heads, attention.head_dim
    normed = layer.layernorm_before(hidden_states)
    query = attention.q_proj(normed[:, :1]).view(batch, 1, heads, head_dim).transpose(1, 2)  # (N, H, 1, d)
    key, value = _stacked_projection(normed, (attention.k_proj, attention.v_proj), heads, head_dim)  # (N, H, T, d)
    attended = _attend(attention, query, key, value)  # (N, 1, H, d)
    class_token = hidden_states[:, 0] + layer.dropout(attention.o_proj(attended.reshape(batch, heads * head_dim)))
    return class_token + layer.dropout(layer.mlp(layer.layernorm_after(class_token)))


def embed_class_token(backbone: PreTrainedModel, pixel_values: torch.Tensor) -> torch.Tensor:
    """``(N, 3, H, W)`` -> ``(N, hidden)``: the normed CLS token of ``last_hidden_state``.

    Runs the backbone's own modules as ``ViTModel.forward`` does, except that each block projects the
    query, key and value in one product (:func:`vit_layer_forward`) and the last block computes the
    CLS row only (:func:`class_token_of_layer`). Position embeddings are interpolated when
    ``H, W`` differ from the configured image size (local crops).
    """
    pixel_values = pixel_values.to(backbone.embeddings.patch_embeddings.projection.weight.dtype)
    hidden_states = backbone.embeddings(pixel_values, interpolate_pos_encoding=True)
    if len(backbone.layers) == 0:
        return backbone.layernorm(hidden_states[:, 0])
    for layer in backbone.layers[:-1]:
        hidden_states = vit_layer_forward(layer, hidden_states)
    return backbone.layernorm(class_token_of_layer(backbone.layers[-1], hidden_states))


def encode_tokens(
    backbone: PreTrainedModel, pixel_values: torch.Tensor, bool_masked_pos: torch.Tensor | None = None
) -> torch.Tensor:
    """``(N, 3, H, W)`` -> ``(N, T, hidden)``: the normed ``last_hidden_state`` of every token.

    :func:`embed_class_token` with the last block computed in full (the iBOT loss reads the patch
    tokens). ``bool_masked_pos`` ``(N, P)`` replaces masked patch embeddings by the backbone's
    ``embeddings.mask_token`` (a ``ViTModel`` built with ``use_mask_token=True``), before the position
    embeddings are added, as ``ViTModel.forward`` does.
    """
    pixel_values = pixel_values.to(backbone.embeddings.patch_embeddings.projection.weight.dtype)
    hidden_states = backbone.embeddings(pixel_values, bool_masked_pos=bool_masked_pos, interpolate_pos_encoding=True)
    for layer in backbone.layers:
        hidden_states = vit_layer_forward(layer, hidden_states)
    return backbone.layernorm(hidden_states)

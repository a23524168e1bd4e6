"""Tests of dino_hf.models.vit_forward, the fast DINO forward of ViT-style backbones: the one-product
q/k/v block, the CLS-only last block and stochastic depth through hooks, each against the stock
transformers modules."""

from __future__ import annotations

import pytest
import torch
from tiny_models import tiny_dino_config

from dino_hf import DinoForPreTraining
from dino_hf.models.vit_forward import encode_tokens, vit_layer_forward


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
@pytest.mark.parametrize("size", [32, 16])  # configured size and interpolated position embeddings
def test_class_token_only_last_block_matches_the_full_backbone(attention, size):
    """embed() computes only the CLS row of the last block: same values and gradients as ViTModel."""
    torch.manual_seed(0)
    model = DinoForPreTraining(tiny_dino_config(drop_path_rate=0.0)).to(torch.float64)
    network = model.student
    network.backbone.set_attn_implementation(attention)
    images = torch.randn(5, 3, size, size, dtype=torch.float64)
    ours = network.embed(images)
    full = network.backbone(pixel_values=images, interpolate_pos_encoding=True).last_hidden_state[:, 0]
    torch.testing.assert_close(ours, full, rtol=1e-10, atol=1e-10)
    weights = torch.randn_like(ours)
    parameters = [p for p in network.backbone.parameters() if p.requires_grad]
    ours_gradients = torch.autograd.grad((ours * weights).sum(), parameters, allow_unused=True)
    full_gradients = torch.autograd.grad((full * weights).sum(), parameters, allow_unused=True)
    for ours_gradient, full_gradient in zip(ours_gradients, full_gradients, strict=True):
        if full_gradient is None:
            assert ours_gradient is None
        else:
            torch.testing.assert_close(ours_gradient, full_gradient, rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("size", [32, 16])
def test_every_token_with_masked_patches_matches_the_full_backbone(size):
    """encode_tokens() (the iBOT path: the last block in full, masked patches replaced by the mask
    token) is ViTModel(..., bool_masked_pos): values and gradients, the mask token's included."""
    torch.manual_seed(0)
    model = DinoForPreTraining(tiny_dino_config(drop_path_rate=0.0, ibot_loss_weight=1.0)).to(torch.float64)
    backbone = model.student.backbone
    with torch.no_grad():
        backbone.embeddings.mask_token.normal_()
    images = torch.randn(5, 3, size, size, dtype=torch.float64)
    masks = torch.rand(5, (size // 8) ** 2) < 0.5
    ours = encode_tokens(backbone, images, masks)
    full = backbone(pixel_values=images, bool_masked_pos=masks, interpolate_pos_encoding=True).last_hidden_state
    torch.testing.assert_close(ours, full, rtol=1e-10, atol=1e-10)
    weights = torch.randn_like(ours)
    parameters = [p for p in backbone.parameters() if p.requires_grad]
    ours_gradients = torch.autograd.grad((ours * weights).sum(), parameters)
    full_gradients = torch.autograd.grad((full * weights).sum(), parameters)
    for ours_gradient, full_gradient in zip(ours_gradients, full_gradients, strict=True):
        torch.testing.assert_close(ours_gradient, full_gradient, rtol=1e-9, atol=1e-10)
    assert ours_gradients[[id(p) for p in parameters].index(id(backbone.embeddings.mask_token))].abs().sum() > 0


@pytest.mark.parametrize("checkpointing", [False, True])
def test_one_product_qkv_layer_matches_the_stock_layer(checkpointing):
    """vit_layer_forward (q, k, v in one product) is ViTLayer.forward: values and gradients, with drop
    path firing through the layer's dropout and gradient checkpointing honoured."""
    torch.manual_seed(0)
    model = DinoForPreTraining(tiny_dino_config(drop_path_rate=0.5)).to(torch.float64)
    backbone = model.student.backbone.train()
    if checkpointing:
        backbone.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    layer = backbone.layers[1]  # drop rate 0.5 (the last of two layers)
    hidden_states = torch.randn(4, 5, 32, dtype=torch.float64, requires_grad=True)
    torch.manual_seed(3)
    ours = vit_layer_forward(layer, hidden_states)
    torch.manual_seed(3)  # the same drop-path masks
    stock = layer(hidden_states)
    torch.testing.assert_close(ours, stock, rtol=1e-12, atol=1e-12)
    weights = torch.randn_like(ours)
    parameters = [hidden_states, *layer.parameters()]
    torch.manual_seed(3)
    ours_gradients = torch.autograd.grad((vit_layer_forward(layer, hidden_states) * weights).sum(), parameters)
    torch.manual_seed(3)
    stock_gradients = torch.autograd.grad((layer(hidden_states) * weights).sum(), parameters)
    for ours_gradient, stock_gradient in zip(ours_gradients, stock_gradients, strict=True):
        torch.testing.assert_close(ours_gradient, stock_gradient, rtol=1e-10, atol=1e-12)
    # some samples' branches were dropped: the hooks fired
    torch.manual_seed(3)
    assert not torch.allclose(vit_layer_forward(layer, hidden_states), layer.eval()(hidden_states))


def test_stochastic_depth_on_the_student_only(model):
    images = torch.randn(4, 3, 32, 32)
    model.train()
    assert not torch.allclose(model.embed(images, "student"), model.embed(images, "student"))
    assert torch.equal(model.embed(images, "teacher"), model.embed(images, "teacher"))
    model.eval()
    assert torch.equal(model.embed(images, "student"), model.embed(images, "student"))
    # the exported student has the plain ViT weights: stochastic depth lives in hooks, not weights
    assert set(model.student.backbone.state_dict()) == set(model.teacher.backbone.state_dict())

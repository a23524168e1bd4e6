"""Tiny model configurations shared by the tests (hidden 32, 2 layers, 32 px, patch 8)."""

from __future__ import annotations

from dino_hf.configuration_dino import DinoConfig, dino_backbone_config


def tiny_dino_config(**overrides) -> DinoConfig:
    """A DinoConfig small enough for CPU tests: ViT hidden 32 / 2 layers / 2 heads / 32 px / patch 8.

    ``overrides`` replace DinoConfig fields (e.g. ``num_prototypes=32``).
    """
    backbone = dino_backbone_config(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        image_size=32,
        patch_size=8,
    )
    settings = {
        "num_prototypes": 64,
        "head_hidden_size": 48,
        "head_bottleneck_size": 16,
        "drop_path_rate": 0.1,
        **overrides,
    }
    return DinoConfig(backbone_config=backbone, **settings)

import json

import pytest
from transformers import AutoConfig, ViTConfig

from dino_hf import DinoConfig

EXPECTED_PRESETS = {
    "vit_tiny_patch16": (192, 3, 16),
    "vit_small_patch16": (384, 6, 16),
    "vit_small_patch8": (384, 6, 8),
    "vit_base_patch16": (768, 12, 16),
    "vit_base_patch8": (768, 12, 8),
}


def test_defaults_are_the_official_dino_vit_small():
    config = DinoConfig()
    backbone = config.backbone_config
    assert isinstance(backbone, ViTConfig)
    assert (backbone.hidden_size, backbone.num_hidden_layers, backbone.num_attention_heads) == (384, 12, 6)
    assert backbone.layer_norm_eps == 1e-6
    assert backbone.qkv_bias is True
    assert backbone.intermediate_size == 4 * 384
    assert config.num_prototypes == 65536
    assert (config.head_hidden_size, config.head_bottleneck_size, config.head_num_layers) == (2048, 256, 3)
    assert config.head_use_batch_norm is False
    assert config.norm_last_layer is True
    assert config.drop_path_rate == 0.1


@pytest.mark.parametrize("name", sorted(EXPECTED_PRESETS))
def test_presets(name):
    config = DinoConfig.from_preset(name)
    hidden, heads, patch = EXPECTED_PRESETS[name]
    backbone = config.backbone_config
    assert (backbone.hidden_size, backbone.num_attention_heads, backbone.patch_size) == (hidden, heads, patch)
    assert backbone.intermediate_size == 4 * hidden
    assert backbone.layer_norm_eps == 1e-6
    assert DinoConfig.preset_names() == sorted([*EXPECTED_PRESETS, *FAMILY_PRESETS])


FAMILY_PRESETS = ("dinov2_small_patch14", "resnet50", "resnet_tiny")


def test_presets_of_the_other_families():
    dinov2 = DinoConfig.from_preset("dinov2_small_patch14").backbone_config
    assert dinov2.model_type == "dinov2_with_registers" and dinov2.num_register_tokens == 4
    assert (dinov2.hidden_size, dinov2.num_attention_heads, dinov2.patch_size) == (384, 6, 14)
    assert dinov2.layerscale_value == 1e-5 and dinov2.layer_norm_eps == 1e-6
    resnet = DinoConfig.from_preset("resnet50")
    assert resnet.backbone_config.model_type == "resnet" and resnet.backbone_config.hidden_sizes[-1] == 2048
    assert list(resnet.backbone_config.depths) == [3, 4, 6, 3] and resnet.drop_path_rate == 0.0
    tiny = DinoConfig.from_preset("resnet_tiny").backbone_config
    assert (tiny.layer_type, list(tiny.hidden_sizes), list(tiny.depths)) == ("basic", [32, 64, 128], [1, 1, 1])


def test_preset_stays_editable_and_round_trips(tmp_path):
    config = DinoConfig.from_preset("vit_base_patch8", head_num_layers=2)
    config.backbone_config.hidden_size = 64
    config.backbone_config.num_attention_heads = 2
    config.num_prototypes = 256
    config.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["model_type"] == "dino_hf"
    assert saved["backbone_config"]["hidden_size"] == 64

    loaded = DinoConfig.from_pretrained(tmp_path)
    assert isinstance(loaded.backbone_config, ViTConfig)
    assert loaded.backbone_config.hidden_size == 64
    assert loaded.backbone_config.patch_size == 8
    assert loaded.backbone_config.layer_norm_eps == 1e-6
    assert loaded.num_prototypes == 256
    assert loaded.head_num_layers == 2
    # registered with the Auto classes once the modeling module is imported
    import dino_hf.models.modeling_dino  # noqa: F401

    assert isinstance(AutoConfig.from_pretrained(tmp_path), DinoConfig)


def test_unknown_preset_names_the_choices():
    with pytest.raises(ValueError, match="vit_small_patch16"):
        DinoConfig.from_preset("vit_huge_patch14")


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("num_prototypes", 0, "num_prototypes"),
        ("drop_path_rate", 1.5, "drop_path_rate"),
        ("student_temperature", 0.0, "student_temperature"),
        ("center_momentum", 2.0, "center_momentum"),
    ],
)
def test_impossible_values_raise_one_sentence(field, value, message):
    config = DinoConfig()
    setattr(config, field, value)
    with pytest.raises(ValueError, match=message):
        config.check_architecture()


def test_heads_must_divide_hidden_size():
    config = DinoConfig()
    config.backbone_config.hidden_size = 100
    with pytest.raises(ValueError, match="num_attention_heads"):
        config.check_architecture()

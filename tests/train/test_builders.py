"""Building a run from its arguments (dino_hf.train.builders): config overrides, the model's starting point
and size, and the in-training k-NN monitor."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from tiny_models import tiny_args, tiny_dino_config
from transformers import ViTModel

from dino_hf.models.modeling_dino import DinoForPreTraining
from dino_hf.train.argument_parsing import parse_training_args
from dino_hf.train.arguments import DinoTrainingArguments
from dino_hf.train.builders import (
    apply_config_overrides,
    build_knn_monitor,
    build_mask_sampler,
    build_model,
    build_model_config,
)

pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")


def test_config_overrides_nested_and_typed():
    config = tiny_dino_config()
    apply_config_overrides(config, "backbone_config.hidden_size=64, num_prototypes=128,norm_last_layer=false,"
                                   "drop_path_rate=0.2")
    assert config.backbone_config.hidden_size == 64 and config.num_prototypes == 128
    assert config.norm_last_layer is False and config.drop_path_rate == 0.2
    for bad, fragment in (("nonsense", "key=value"), ("no_such_key=1", "does not name"),
                          ("backbone_config.nope=1", "does not name"), ("num_prototypes=many", "not a valid")):
        with pytest.raises(ValueError, match="--config_overrides") as error:
            apply_config_overrides(config, bad)
        assert fragment in str(error.value)


def test_model_name_or_path_from_a_dino_folder_or_an_exported_backbone(dataset, tiny_config_file, tmp_path):
    source = DinoForPreTraining(tiny_dino_config())
    source.save_pretrained(tmp_path / "dino")
    source.save_backbone(tmp_path / "backbone")

    resumed = build_model(tiny_args(dataset, tmp_path / "a", tiny_config_file, model_name_or_path=str(tmp_path / "dino"),
                                    student_temperature=0.2))
    torch.testing.assert_close(resumed.state_dict(), source.state_dict(), rtol=0, atol=0)
    assert resumed.loss_fn.student_temperature == 0.2

    from_backbone = build_model(tiny_args(dataset, tmp_path / "b", tiny_config_file,
                                          model_name_or_path=str(tmp_path / "backbone")))
    backbone = ViTModel.from_pretrained(tmp_path / "backbone", add_pooling_layer=False)  # compared without the pooler
    for network in (from_backbone.student, from_backbone.teacher):
        torch.testing.assert_close(network.backbone.state_dict(), backbone.state_dict(), rtol=0, atol=0)

    with pytest.raises(ValueError, match="--model_name_or_path"):
        build_model(tiny_args(dataset, tmp_path / "c", tiny_config_file, model_name_or_path=str(tmp_path / "nothing")))
    # a trained head keeps its K; a backbone gets a new head of the K asked for
    with pytest.raises(ValueError, match="--num_prototypes 32 differs from the 64 trained prototypes"):
        build_model(tiny_args(dataset, tmp_path / "d", tiny_config_file, model_name_or_path=str(tmp_path / "dino"),
                              num_prototypes=32))
    new_head = build_model(tiny_args(dataset, tmp_path / "e", tiny_config_file,
                                     model_name_or_path=str(tmp_path / "backbone"), num_prototypes=32))
    assert new_head.config.num_prototypes == 32 and new_head.student.head.last_layer.weight_v.shape[0] == 32


def test_num_prototypes_is_a_flag_that_sets_the_config_after_the_overrides(dataset, tiny_config_file, tmp_path):
    args = parse_training_args(["--dataset_name", str(dataset), "--output_dir", str(tmp_path / "run"),
                                "--model_config", str(tiny_config_file), "--config_overrides", "num_prototypes=16",
                                "--num_prototypes", "48"])
    assert build_model_config(args).num_prototypes == 48
    with pytest.raises(ValueError, match="--num_prototypes must be a positive integer"):
        tiny_args(dataset, tmp_path / "x", tiny_config_file, num_prototypes=0)


def test_model_config_as_a_folder_and_preset_sizes(dataset, tiny_config_file, tmp_path):
    model = build_model(tiny_args(dataset, tmp_path / "a", tiny_config_file.parent,
                                  config_overrides="num_prototypes=32,backbone_config.num_hidden_layers=1"))
    assert model.config.num_prototypes == 32 and model.config.backbone_config.num_hidden_layers == 1
    assert model.config.backbone_config.image_size == 32  # follows --global_crop_size


def test_knn_monitor_from_training_args(tiny_backbone, labelled_parquet):
    args = DinoTrainingArguments(
        dataset_name=str(labelled_parquet),
        output_dir=str(labelled_parquet / "unused"),
        eval_dataset_name=str(labelled_parquet),
        eval_split="train",
        eval_max_samples=6,
        dataloader_num_workers=0,
    )
    monitor = build_knn_monitor(args)
    assert monitor.ks == (20,) and len(monitor.datasets["train"]) == 6  # local: map-style, not streamed
    metrics = monitor.evaluate(ViTModel.from_pretrained(tiny_backbone, add_pooling_layer=False))
    assert set(metrics) == {"knn_top1_k20"} and 0.0 <= metrics["knn_top1_k20"] <= 1.0


def test_a_width_override_carries_the_pooler_size_along(dataset, tiny_config_file, tmp_path):
    from dino_hf.train.builders import build_model_config

    config = build_model_config(tiny_args(dataset, tmp_path, tiny_config_file, model_config="vit_small_patch16",
                                          config_overrides="backbone_config.hidden_size=192"))
    assert config.backbone_config.hidden_size == config.backbone_config.pooler_output_size == 192


# ------------------------------------------------------------------------------ DINOv2's objective
CONFIGS = Path(__file__).resolve().parents[2] / "scripts" / "configs"
DINOV2_KEYS = {"ibot_loss_weight", "ibot_separate_head", "koleo_loss_weight", "mask_ratio_min_max",
               "mask_sample_probability"}


def test_the_dinov2_recipe_builds_dinov2s_vit_s14_with_registers_and_its_objective():
    args = parse_training_args(["--config", str(CONFIGS / "dinov2_vit_small_patch14_reg4.yaml")])
    config = build_model_config(args)
    backbone = config.backbone_config
    assert backbone.model_type == "dinov2_with_registers" and backbone.num_register_tokens == 4
    assert (backbone.patch_size, backbone.hidden_size, backbone.layerscale_value) == (14, 384, 1e-5)
    assert (config.ibot_loss_weight, config.koleo_loss_weight, config.teacher_centering) == (1.0, 0.1, "sinkhorn_knopp")
    assert config.ibot_separate_head and config.ibot_head_num_prototypes == config.num_prototypes == 65536
    assert (args.teacher_momentum, args.warmup_teacher_temperature, args.teacher_temperature) == (0.992, 0.04, 0.07)
    assert args.warmup_teacher_temperature_epochs == 30 and config.drop_path_rate == 0.3
    sampler = build_mask_sampler(args, config, process_index=0)
    assert sampler.masking_generator.num_patches == 16 * 16 and sampler.mask_ratio_min_max == (0.1, 0.5)


def test_the_dinov2_cpu_recipe_is_the_demo_recipe_plus_dinov2s_terms():
    """So that benchmarks/dinov2_fashion_mnist.py compares objectives, not models or schedules."""
    def values(name):
        return {key: value for key, value in vars(parse_training_args(["--config", str(CONFIGS / name)])).items()
                if key not in ("config", "output_dir")}

    demo, dinov2 = values("fashion_mnist_cpu.yaml"), values("fashion_mnist_dinov2_cpu.yaml")
    changed = {key for key in demo if demo[key] != dinov2[key]}
    assert changed == DINOV2_KEYS - {"mask_ratio_min_max", "mask_sample_probability"}  # those two: DINOv2's defaults
    args = parse_training_args(["--config", str(CONFIGS / "fashion_mnist_dinov2_cpu.yaml")])
    config = build_model_config(args)
    assert config.uses_ibot and config.ibot_separate_head and config.koleo_loss_weight == 0.1
    assert build_mask_sampler(args, config, 0).masking_generator.num_patches == 2 * 2  # 28 px / patch 14


def test_the_resnet_demo_recipe_is_the_dino_recipe_on_a_small_resnet():
    """make demo's recipe changes the network, not the objective, the crops or the schedules."""
    def values(name):
        return {key: value for key, value in vars(parse_training_args(["--config", str(CONFIGS / name)])).items()
                if key not in ("config", "output_dir")}

    vit, resnet = values("fashion_mnist_cpu.yaml"), values("fashion_mnist_resnet_cpu.yaml")
    assert {key for key in vit if vit[key] != resnet[key]} == {"model_config", "config_overrides"}
    vit_config = build_model_config(parse_training_args(["--config", str(CONFIGS / "fashion_mnist_cpu.yaml")]))
    config = build_model_config(parse_training_args(["--config", str(CONFIGS / "fashion_mnist_resnet_cpu.yaml")]))
    assert config.backbone_config.model_type == "resnet" and list(config.backbone_config.hidden_sizes) == [32, 64, 128]
    head = ("num_prototypes", "head_hidden_size", "head_bottleneck_size", "head_use_batch_norm", "drop_path_rate")
    assert [getattr(config, name) for name in head] == [getattr(vit_config, name) for name in head]


def test_auto_precision_keeps_the_one_a_resumed_run_chose(dataset, tiny_config_file, tmp_path):
    """A probe near its threshold may decide otherwise on resume: the run's recorded choice is kept."""
    from dino_hf.train.builders import choose_precision

    args = tiny_args(dataset, tmp_path / "run", tiny_config_file, mixed_precision="auto")
    for recorded in ("no", "bf16"):
        assert choose_precision(args, torch.device("cpu"), recorded).mixed_precision == recorded
    explicit = tiny_args(dataset, tmp_path / "run", tiny_config_file, mixed_precision="no")
    assert choose_precision(explicit, torch.device("cpu"), "bf16").mixed_precision == "no"  # a flag is obeyed

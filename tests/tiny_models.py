"""Tiny models and runs shared by the tests: a DinoConfig and a bare ViT (hidden 32, 2 layers, 32 px,
patch 8), a small multi-crop recipe, the training arguments of a 4-step CPU run, and a fake run
output folder.

Import from any test module (pytest puts ``tests/`` on ``sys.path``; a subprocess started in the
repository root imports ``tests.tiny_models``)::

    from tiny_models import tiny_args, tiny_dino_config
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from PIL import Image
from safetensors.torch import save_file
from transformers import (
    ConvNextConfig,
    DeiTConfig,
    Dinov2Config,
    Dinov2WithRegistersConfig,
    DINOv3ConvNextConfig,
    DINOv3ViTConfig,
    PreTrainedConfig,
    ResNetConfig,
    ViTConfig,
    ViTImageProcessor,
    ViTModel,
)

from dino_hf.data.augmentation import MultiCropAugmentation
from dino_hf.models.backbones import build_image_processor
from dino_hf.models.configuration_dino import DinoConfig, dino_backbone_config
from dino_hf.train.arguments import DinoTrainingArguments

#: A Hub token written into the fake run's training_args.json: it must never reach the Hub or a log.
TOKEN = "hf_LoopbackSecretToken0123456789abcdef"
#: The accuracies written into the fake run's eval_results.json.
KNN_ACCURACY = 0.8123
RAW_PIXELS_ACCURACY = 0.841


# ------------------------------------------------------------------------------ models
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


def tiny_backbone_config(model_type: str) -> PreTrainedConfig:
    """A backbone config of each family dino_hf trains, small enough for CPU tests (hidden 32 / 2
    layers / 2 heads / 32 px / patch 8 for the ViTs; widths 16 and 32 in 2 stages for the ConvNets,
    which then take crops of at least 8 pixels)."""
    vit = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "image_size": 32, "patch_size": 8}
    convnet = {"hidden_sizes": [16, 32], "depths": [1, 1]}
    builders = {
        "vit": lambda: dino_backbone_config(**vit, intermediate_size=64),
        "deit": lambda: DeiTConfig(**vit, intermediate_size=64, layer_norm_eps=1e-6),
        "dinov2": lambda: Dinov2Config(**vit, mlp_ratio=2),
        "dinov2_with_registers": lambda: Dinov2WithRegistersConfig(**vit, mlp_ratio=2, num_register_tokens=2),
        "dinov3_vit": lambda: DINOv3ViTConfig(**vit, intermediate_size=64, num_register_tokens=2),
        "convnext": lambda: ConvNextConfig(**convnet, num_stages=2, image_size=32),
        "dinov3_convnext": lambda: DINOv3ConvNextConfig(**convnet, image_size=32),
        "resnet": lambda: ResNetConfig(embedding_size=8, **convnet, layer_type="basic"),
    }
    return builders[model_type]()


#: Every family of dino_hf.models.backbones, by model_type.
FAMILY_MODEL_TYPES = ("vit", "deit", "dinov2", "dinov2_with_registers", "dinov3_vit", "convnext", "dinov3_convnext",
                      "resnet")


def tiny_family_config(model_type: str, **overrides) -> DinoConfig:
    """:func:`tiny_dino_config`'s head and loss on :func:`tiny_backbone_config`'s backbone."""
    settings = {"num_prototypes": 64, "head_hidden_size": 48, "head_bottleneck_size": 16, "drop_path_rate": 0.1,
                **overrides}
    return DinoConfig(backbone_config=tiny_backbone_config(model_type), **settings)


def tiny_vit_config(**overrides) -> ViTConfig:
    settings = {
        "hidden_size": 32,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "intermediate_size": 64,
        "image_size": 32,
        "patch_size": 8,
        "layer_norm_eps": 1e-6,
    }
    return ViTConfig(**{**settings, **overrides})


def tiny_vit(attn_implementation: str | None = None, seed: int = 0) -> ViTModel:
    torch.manual_seed(seed)
    config = tiny_vit_config()
    if attn_implementation is not None:
        config._attn_implementation = attn_implementation
    return ViTModel(config, add_pooling_layer=False).eval()


def save_tiny_backbone(directory: Path) -> Path:
    """The folder format ``DinoForPreTraining.save_backbone`` writes."""
    tiny_vit().save_pretrained(directory)
    build_image_processor(32).save_pretrained(directory)
    return directory


# ------------------------------------------------------------------------------ augmentation
#: A small multi-crop recipe for fast augmentation tests: 2 global 32 px crops and 3 local 16 px ones.
SMALL_MULTI_CROP = dict(global_crop_size=32, local_crop_size=16, num_local_crops=3)


#: A smaller one for loader tests: 2 global 16 px crops and 2 local 8 px ones.
SMALL_AUGMENTATION = MultiCropAugmentation(global_crop_size=16, local_crop_size=8, num_local_crops=2)


def seeded_generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ------------------------------------------------------------------------------ training runs
def tiny_args(dataset: Path, output_dir: Path, config_file: Path, **overrides) -> DinoTrainingArguments:
    """A 4-step run of the tiny model on 32 px / 16 px crops, batch 8, no loader workers."""
    values = {
        "dataset_name": str(dataset),
        "output_dir": str(output_dir),
        "model_config": str(config_file),
        "global_crop_size": 32,
        "local_crop_size": 16,
        "num_local_crops": 2,
        "per_device_train_batch_size": 8,
        "max_steps": 4,
        "logging_steps": 2,
        "checkpointing_steps": 2,
        "dataloader_num_workers": 0,
        "warmup_steps": 1,
        "freeze_last_layer_steps": 1,
        "shuffle_buffer_size": 16,
    }
    values.update(overrides)
    return DinoTrainingArguments(**values)


def read_rows(output_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]


# ------------------------------------------------------------------------------ run output folders
def write_training_output(output_dir: Path, *, eval_results: bool = True, **arg_overrides) -> Path:
    """A tiny training output directory with the layout dino_hf/base/run_folder.py names (random weights)."""
    torch.manual_seed(0)
    backbone_dir = output_dir / "backbone"
    ViTModel(tiny_vit_config(), add_pooling_layer=False).save_pretrained(backbone_dir)
    ViTImageProcessor(
        image_mean=[0.485, 0.456, 0.406],
        image_std=[0.229, 0.224, 0.225],
        size={"height": 32, "width": 32},
        resample=3,
    ).save_pretrained(backbone_dir)
    # The full DinoForPreTraining, as far as pushing is concerned: a config and safetensors weights.
    (output_dir / "config.json").write_text(
        json.dumps(
            {
                "model_type": "dino",
                "num_prototypes": 128,
                "head_hidden_size": 48,
                "head_bottleneck_size": 16,
                "head_num_layers": 3,
            }
        )
    )
    save_file({"student.head.last_layer.weight": torch.randn(128, 16)}, output_dir / "model.safetensors")
    training_args = {
        "dataset_name": "zalando-datasets/fashion_mnist",
        "model_config": "vit_tiny_patch16",
        "model_name_or_path": None,
        "num_local_crops": 6,
        "global_crop_size": 32,
        "local_crop_size": 16,
        "global_crop_scale": [0.4, 1.0],
        "local_crop_scale": [0.05, 0.4],
        "teacher_temperature": 0.07,
        "warmup_teacher_temperature": 0.04,
        "warmup_teacher_temperature_steps": 30,
        "teacher_momentum": 0.996,
        "per_device_train_batch_size": 64,
        "gradient_accumulation_steps": 1,
        "max_steps": 100,
        "learning_rate": 0.0005,
        "seed": 0,
        # run facts that training adds to the resolved arguments
        "num_processes": 2,
        "global_batch_size": 128,
        "scaled_learning_rate": 0.00025,
        "hardware": "2 x CPU",
        "train_runtime": 611.4,
        "output_dir": str(output_dir),
        # a secret that must never reach the Hub
        "hub_token": TOKEN,
        "report_to": f"none {TOKEN}",
        **arg_overrides,
    }
    (output_dir / "training_args.json").write_text(json.dumps(training_args, indent=2))
    (output_dir / "metrics.jsonl").write_text(
        "".join(json.dumps({"step": step, "loss": 5.0 - step / 100}) + "\n" for step in (10, 50, 100))
    )
    if eval_results:
        (output_dir / "eval_results.json").write_text(
            json.dumps(
                {
                    "step": 100,
                    "knn_top1_k20": KNN_ACCURACY,
                    "raw_pixels_knn_top1_k20": RAW_PIXELS_ACCURACY,
                    "eval_dataset_name": "zalando-datasets/fashion_mnist",
                    "eval_split": "test",
                    "eval_train_split": "train",
                }
            )
        )
    Image.new("RGB", (8, 8), "white").save(output_dir / "training_curves.png")
    return output_dir

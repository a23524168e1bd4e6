"""Tests of dino_hf.models.backbones: every backbone family trains, exports as its own stock transformers
class and loads without dino_hf; continued pre-training from a saved backbone; the ViT export format."""

from __future__ import annotations

import json
import math
import subprocess
import sys
import textwrap

import pytest
import torch
from tiny_models import FAMILY_MODEL_TYPES, read_rows, tiny_args, tiny_dino_config, tiny_family_config
from transformers import AutoConfig, ViTModel

from dino_hf import DinoForPreTraining
from dino_hf.models.backbones import family_of
from dino_hf.train.loop import train


def test_exported_backbone_loads_with_plain_transformers(model, tmp_path):
    """In a process that never imports dino_hf: AutoModel, AutoImageProcessor and the pipeline."""
    with torch.no_grad():
        for parameter in model.teacher.parameters():
            parameter.add_(0.01 * torch.randn_like(parameter))  # teacher != student
    backbone_dir = model.save_backbone(tmp_path / "backbone")
    processor_config = json.loads((backbone_dir / "preprocessor_config.json").read_text())
    assert processor_config["image_mean"] == [0.485, 0.456, 0.406]
    assert processor_config["size"] == {"height": 32, "width": 32}

    pixel_values = torch.randn(2, 3, 32, 32)
    torch.save(pixel_values, tmp_path / "pixels.pt")
    model.eval()
    with torch.no_grad():
        expected = model.embed(pixel_values, "teacher")
    script = textwrap.dedent(
        f"""
        import sys
        import numpy as np
        import torch
        from PIL import Image
        from transformers import AutoImageProcessor, AutoModel, pipeline
        backbone = AutoModel.from_pretrained({str(backbone_dir)!r}).eval()
        assert type(backbone).__name__ == "ViTModel"
        pixels = torch.load({str(tmp_path / "pixels.pt")!r}, weights_only=True)
        with torch.no_grad():
            cls = backbone(pixel_values=pixels).last_hidden_state[:, 0]
        torch.save(cls, {str(tmp_path / "cls.pt")!r})
        processor = AutoImageProcessor.from_pretrained({str(backbone_dir)!r})
        picture = Image.fromarray(np.random.default_rng(0).integers(0, 255, (50, 70, 3), dtype=np.uint8))
        assert processor(picture, return_tensors="pt")["pixel_values"].shape == (1, 3, 32, 32)
        extractor = pipeline("image-feature-extraction", model={str(backbone_dir)!r})
        features = np.asarray(extractor(picture))
        assert features.shape[-1] == 32, features.shape
        assert "dino_hf" not in sys.modules
        print("ok")
        """
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    assert torch.allclose(torch.load(tmp_path / "cls.pt", weights_only=True), expected, atol=1e-5)


def test_exported_vit_has_the_identity_pooler_and_loads_without_a_report(model, tmp_path, caplog):
    """No random pooler and no LOAD REPORT on a plain from_pretrained: the export's pooler is the identity
    (``pooler_act="linear"``), so ``pooler_output`` is the CLS token; the model in training keeps none."""
    import logging

    from safetensors.torch import load_file

    model.save_backbone(tmp_path)
    assert model.teacher.backbone.pooler is None and model.teacher.backbone.config.pooler_act == "tanh"  # unchanged
    weights = load_file(tmp_path / "model.safetensors")
    torch.testing.assert_close(weights["pooler.dense.weight"], torch.eye(32))
    assert not weights["pooler.dense.bias"].any()
    with caplog.at_level(logging.WARNING):
        loaded = ViTModel.from_pretrained(tmp_path)
    assert "LOAD REPORT" not in caplog.text and loaded.config.pooler_act == "linear"
    assert loaded.config.layer_norm_eps == 1e-6
    pixels = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        output = loaded.eval()(pixel_values=pixels)
    torch.testing.assert_close(output.pooler_output, output.last_hidden_state[:, 0])
    # an export without the pooler (an earlier dino_hf) still loads without a random one, and trains on
    family = family_of(loaded.config)
    assert family.from_pretrained_kwargs(loaded.config) == {}
    model.teacher.backbone.save_pretrained(tmp_path / "old")
    old = AutoConfig.from_pretrained(tmp_path / "old")
    assert family.from_pretrained_kwargs(old) == {"add_pooling_layer": False}
    assert family.load(tmp_path / "old").pooler is None
    continued = DinoForPreTraining.from_backbone(tmp_path, config=tiny_dino_config())
    assert continued.teacher.backbone.pooler is None


# ------------------------------------------------------------------------------ every family
_EMBEDDING_IN_A_FRESH_PROCESS = textwrap.dedent(
    """
    import sys
    import numpy as np
    import torch
    from PIL import Image
    from transformers import AutoConfig, AutoImageProcessor, AutoModel, pipeline
    folder, pixels_path, output_path, expected_type = sys.argv[1:5]
    config = AutoConfig.from_pretrained(folder)
    assert config.model_type == expected_type, (config.model_type, expected_type)
    backbone = AutoModel.from_pretrained(folder).eval()  # no argument: nothing missing or random in any family
    pixels = torch.load(pixels_path, weights_only=True)
    with torch.no_grad():
        output = backbone(pixel_values=pixels)
    hidden = output.last_hidden_state
    # the DINO embedding, by the rule a user of each family applies: CLS token, or the pooled output
    embedding = hidden[:, 0] if hidden.ndim == 3 else output.pooler_output.flatten(1)
    torch.save(embedding, output_path)
    processor = AutoImageProcessor.from_pretrained(folder)
    picture = Image.fromarray(np.random.default_rng(0).integers(0, 255, (50, 70, 3), dtype=np.uint8))
    assert processor(picture, return_tensors="pt")["pixel_values"].shape[:2] == (1, 3)
    features = np.asarray(pipeline("image-feature-extraction", model=folder)(picture, pool=True))
    assert features.reshape(1, -1).shape == (1, embedding.shape[1])  # pool=True: the DINO embedding's width
    assert "dino_hf" not in sys.modules
    print(type(backbone).__name__)
    """
)


@pytest.mark.usefixtures("fresh_accelerate_state")
@pytest.mark.parametrize("model_type", FAMILY_MODEL_TYPES)
def test_each_family_trains_and_exports_its_own_class_that_plain_transformers_loads(
    model_type, dataset, tmp_path
):
    """3 steps on parquet images, then the export loads in a process without dino_hf as the same
    model_type and gives the teacher's embedding (fp32, max abs difference < 1e-5)."""
    config_dir = tmp_path / "config"
    tiny_family_config(model_type).save_pretrained(config_dir)
    result = train(tiny_args(dataset, tmp_path / "run", config_dir / "config.json", max_steps=3, logging_steps=1,
                             checkpointing_steps=3, mixed_precision="no"))
    assert result.step == 3 and type(result.model.teacher.backbone).__name__ == MODEL_CLASSES[model_type]
    rows = [row for row in read_rows(tmp_path / "run") if "loss" in row]
    assert len(rows) == 3 and all(math.isfinite(row["loss"]) for row in rows)
    # the teacher moved: it is the EMA of a trained student
    assert not torch.equal(result.model.teacher.head.mlp[0].weight, DinoForPreTraining(tiny_family_config(model_type))
                           .teacher.head.mlp[0].weight)

    pixels = torch.randn(2, 3, 32, 32)
    torch.save(pixels, tmp_path / "pixels.pt")
    result.model.eval()
    with torch.no_grad():
        expected = result.model.embed(pixels, "teacher")
    folder = tmp_path / "run" / "backbone"
    completed = subprocess.run(
        [sys.executable, "-c", _EMBEDDING_IN_A_FRESH_PROCESS, str(folder), str(tmp_path / "pixels.pt"),
         str(tmp_path / "embedding.pt"), model_type],
        capture_output=True, text=True, timeout=180,
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    assert completed.stdout.strip().splitlines()[-1] == MODEL_CLASSES[model_type]
    actual = torch.load(tmp_path / "embedding.pt", weights_only=True)
    assert actual.shape == expected.shape
    assert (actual - expected).abs().max() < 1e-5


MODEL_CLASSES = {
    "vit": "ViTModel", "deit": "DeiTModel", "dinov2": "Dinov2Model", "dinov2_with_registers": "Dinov2WithRegistersModel",
    "dinov3_vit": "DINOv3ViTModel", "convnext": "ConvNextModel", "dinov3_convnext": "DINOv3ConvNextModel",
    "resnet": "ResNetModel",
}


def test_registers_are_excluded_from_the_embedding():
    """Dinov2 with registers: the embedding is the CLS token (position 0), not a register."""
    torch.manual_seed(0)
    model = DinoForPreTraining(tiny_family_config("dinov2_with_registers")).eval()
    pixels = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        output = model.teacher.backbone(pixel_values=pixels)
        embedding = model.embed(pixels)
    assert output.last_hidden_state.shape[1] == 1 + 2 + 16  # CLS, 2 registers, 4x4 patches
    torch.testing.assert_close(embedding, output.last_hidden_state[:, 0])
    assert family_of(model.config.backbone_config).num_prefix_tokens(model.config.backbone_config) == 3


@pytest.mark.parametrize("model_type", ["resnet", "convnext"])
def test_a_resnet_takes_its_crops_channels_last_and_embeds_them_as_the_stock_model_does(model_type):
    """The ResNet family feeds NHWC crops (oneDNN's faster path); its embedding is the stock model's on NCHW
    input, gradients reach the weights in their own order, and the weights stay stock (ConvNeXt keeps NCHW)."""
    torch.manual_seed(0)
    model = DinoForPreTraining(tiny_family_config(model_type))
    backbone = model.student.backbone
    first_convolution = next(module for module in backbone.modules() if isinstance(module, torch.nn.Conv2d))
    seen = []
    first_convolution.register_forward_pre_hook(lambda module, inputs: seen.append(inputs[0]))
    pixels = torch.randn(4, 3, 32, 32)
    embedding = model.student.embed(pixels)
    assert seen[0].is_contiguous(memory_format=torch.channels_last) == (model_type == "resnet")
    assert pixels.is_contiguous()  # the caller's tensor is not changed
    backbone.eval()
    with torch.no_grad():
        stock = backbone(pixel_values=pixels).pooler_output.flatten(1)
        torch.testing.assert_close(model.student.embed(pixels), stock, rtol=1e-4, atol=1e-5)
    embedding.sum().backward()
    assert first_convolution.weight.grad is not None
    assert first_convolution.weight.grad.stride() == first_convolution.weight.stride()
    assert all(parameter.is_contiguous() for parameter in backbone.parameters())


# ------------------------------------------------------------------------------ iBOT: mask token, patch tokens
MASKABLE_MODEL_TYPES = ("vit", "deit", "dinov2", "dinov2_with_registers", "dinov3_vit")


@pytest.mark.parametrize("model_type", MASKABLE_MODEL_TYPES)
def test_the_students_masked_positions_receive_the_backbones_mask_token(model_type):
    """Through the model's own forward and the backbone's embedding module (a forward hook on it, no
    mock): at masked positions of the student's global crops the tokens are the mask token plus what
    depends only on the position (they no longer depend on the image, and move with the mask token);
    unmasked positions and the teacher's crops keep the image's patches."""
    torch.manual_seed(0)
    model = DinoForPreTraining(tiny_family_config(model_type, ibot_loss_weight=1.0)).eval()
    embeddings = {"student": [], "teacher": []}
    for name in embeddings:
        getattr(model, name).backbone.embeddings.register_forward_hook(
            lambda module, args, output, name=name: embeddings[name].append(output.detach().clone()))
    num_prefix = family_of(model.config.backbone_config).num_prefix_tokens(model.config.backbone_config)
    masks = torch.zeros(2, 3, 4, 4, dtype=torch.bool)
    masks[0, 1, 1:3, 0:2] = True  # 4 patches of the first global crop of image 1
    masks[1, 2, 3, 3] = True
    flat = masks.flatten(2).reshape(6, 16)
    crops = torch.randn(2, 3, 3, 32, 32)

    def student_patch_embeddings(global_crops):
        embeddings["student"].clear()
        embeddings["teacher"].clear()
        with torch.no_grad():
            model(global_crops, masks=masks)
        return embeddings["student"][0][:, num_prefix:], embeddings["teacher"][0][:, num_prefix:]

    student, teacher = student_patch_embeddings(crops)
    assert student.shape == teacher.shape == (6, 16, 32)
    other_student, other_teacher = student_patch_embeddings(torch.randn(2, 3, 3, 32, 32))
    # masked positions: independent of the image; unmasked ones and the teacher's: the image's
    torch.testing.assert_close(student[flat], other_student[flat])
    assert not torch.allclose(student[~flat], other_student[~flat])
    torch.testing.assert_close(student[~flat], teacher[~flat])
    assert not torch.allclose(teacher[flat], other_teacher[flat])
    assert not torch.allclose(student[flat], teacher[flat])
    # moving the mask token moves exactly the masked positions, by the same amount
    with torch.no_grad():
        model.student.backbone.embeddings.mask_token.add_(0.5)
    shifted, _ = student_patch_embeddings(crops)
    torch.testing.assert_close(shifted[flat] - student[flat], torch.full_like(student[flat], 0.5))
    torch.testing.assert_close(shifted[~flat], student[~flat])


@pytest.mark.parametrize("model_type", MASKABLE_MODEL_TYPES)
def test_patch_tokens_exclude_cls_distillation_token_and_registers(model_type):
    torch.manual_seed(0)
    model = DinoForPreTraining(tiny_family_config(model_type, ibot_loss_weight=1.0)).eval()
    family = family_of(model.config.backbone_config)
    pixels = torch.randn(2, 3, 32, 32)
    masks = torch.rand(2, 16) < 0.5
    with torch.no_grad():
        class_token, patch_tokens = model.student.embed_tokens(pixels, masks)
        stock = model.student.backbone(pixel_values=pixels, bool_masked_pos=masks).last_hidden_state
    prefix = family.num_prefix_tokens(model.config.backbone_config)
    assert prefix == {"vit": 1, "deit": 2, "dinov2": 1, "dinov2_with_registers": 3, "dinov3_vit": 3}[model_type]
    assert patch_tokens.shape == (2, 16, 32)
    torch.testing.assert_close(patch_tokens, stock[:, prefix:], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(class_token, stock[:, 0], rtol=1e-5, atol=1e-5)
    with torch.no_grad():  # unmasked, the full last block gives the CLS-only fast path's embedding
        unmasked_class_token, _ = model.student.embed_tokens(pixels)
        torch.testing.assert_close(unmasked_class_token, model.student.embed(pixels), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("model_type", ["vit", "deit"])
def test_a_vit_trained_with_a_mask_token_exports_the_stock_model(model_type, tmp_path):
    """ViT and DeiT get a mask token only when built for iBOT: the export drops it and gets the identity
    pooler, so plain transformers loads it with no missing or unexpected key, and the export continues
    iBOT training."""
    torch.manual_seed(0)
    model = DinoForPreTraining(tiny_family_config(model_type, ibot_loss_weight=1.0))
    assert model.student.backbone.embeddings.mask_token is not None
    folder = model.save_backbone(tmp_path / "backbone")
    from safetensors.torch import load_file
    from transformers import AutoModel

    assert not any("mask_token" in key for key in load_file(folder / "model.safetensors"))
    loaded, info = AutoModel.from_pretrained(folder, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    pixels = torch.randn(2, 3, 32, 32)
    model.eval()
    with torch.no_grad():
        output = loaded.eval()(pixel_values=pixels)
        torch.testing.assert_close(output.last_hidden_state[:, 0], model.embed(pixels))
        torch.testing.assert_close(output.pooler_output, model.embed(pixels))  # the identity pooler
    continued = DinoForPreTraining.from_backbone(folder, config=tiny_family_config(model_type, ibot_loss_weight=1.0))
    assert torch.count_nonzero(continued.student.backbone.embeddings.mask_token) == 0  # fresh, as transformers inits it


@pytest.mark.parametrize("model_type", ["convnext", "resnet"])
def test_ibot_on_a_convnet_is_refused_in_one_sentence(model_type):
    with pytest.raises(ValueError, match="ibot_loss_weight: iBOT masks patch tokens") as error:
        DinoForPreTraining(tiny_family_config(model_type, ibot_loss_weight=1.0))
    assert "\n" not in str(error.value)


def test_dinov2_without_a_mask_token_is_refused():
    config = tiny_family_config("dinov2", ibot_loss_weight=1.0)
    config.backbone_config.use_mask_token = False
    with pytest.raises(ValueError, match="use_mask_token"):
        DinoForPreTraining(config)


# ------------------------------------------------------------------------------ continued pre-training
@pytest.mark.usefixtures("fresh_accelerate_state")
def test_continuing_from_a_saved_backbone_keeps_its_embedding_processor_and_warm_up(dataset, tmp_path, monkeypatch):
    """The teacher's embedding at step 0 is the backbone's own; the export keeps the backbone's own
    processor; with --freeze_backbone_steps the backbone is unchanged through the warm-up and moves after."""
    from transformers import AutoModel, BitImageProcessor

    from dino_hf.train.builders import build_model

    torch.manual_seed(1)
    source = tiny_family_config("dinov2").backbone_config
    backbone = AutoModel.from_config(source).eval()
    backbone.save_pretrained(tmp_path / "pretrained")
    processor = BitImageProcessor(image_mean=[0.1, 0.2, 0.3], image_std=[0.5, 0.5, 0.5], size={"shortest_edge": 36},
                                  crop_size={"height": 32, "width": 32})
    processor.save_pretrained(tmp_path / "pretrained")
    config_dir = tmp_path / "config"
    tiny_dino_config().save_pretrained(config_dir)  # the heads' settings; the backbone comes from the folder

    args = tiny_args(dataset, tmp_path / "run", config_dir / "config.json", model_name_or_path=str(tmp_path / "pretrained"),
                     max_steps=4, logging_steps=1, checkpointing_steps=4, freeze_backbone_steps=2, mixed_precision="no")
    model = build_model(args).eval()
    pixels = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model.embed(pixels, "teacher"), backbone(pixel_values=pixels).pooler_output,
                                   rtol=0, atol=1e-6)

    from dino_hf.train.step import DinoTrainStep

    snapshots = []
    call = DinoTrainStep.__call__

    def recording(self, next_batch, values, full_backward=False):
        statistics = call(self, next_batch, values, full_backward)
        snapshots.append({name: tensor.clone() for name, tensor in self.unwrapped.student.backbone.state_dict().items()})
        return statistics

    monkeypatch.setattr(DinoTrainStep, "__call__", recording)
    result = train(args)
    start = backbone.state_dict()
    for step in (0, 1):  # steps 1 and 2: frozen
        assert all(torch.equal(snapshots[step][name], start[name]) for name in start), step
    assert any(not torch.equal(snapshots[3][name], start[name]) for name in start)  # step 4 moved it
    # the teacher got the warmed-up student head at the end of the warm-up, then followed by EMA
    recorded = json.loads((tmp_path / "run" / "training_args.json").read_text())
    assert recorded["freeze_backbone_steps"] == 2
    exported = json.loads((tmp_path / "run" / "backbone" / "preprocessor_config.json").read_text())
    assert exported["image_mean"] == [0.1, 0.2, 0.3] and exported["image_processor_type"] == "BitImageProcessor"
    assert result.step == 4


def test_continued_pre_training_defaults_warm_up_the_heads_at_a_lower_backbone_rate(dataset, tmp_path):
    from dino_hf.train.builders import backbone_learning_rate_scale, build_optimizer
    from dino_hf.train.step_plan import CONTINUED_FREEZE_BACKBONE_FRACTION, plan_steps

    folder = tmp_path / "pretrained"
    DinoForPreTraining(tiny_dino_config()).save_backbone(folder)
    continued = tiny_args(dataset, tmp_path / "a", tmp_path / "unused.json", model_name_or_path=str(folder),
                          max_steps=100, freeze_backbone_steps=None)
    scratch = tiny_args(dataset, tmp_path / "b", tmp_path / "unused.json", max_steps=100, freeze_backbone_steps=None)
    assert backbone_learning_rate_scale(continued) < 1.0 == backbone_learning_rate_scale(scratch)
    assert plan_steps(continued.run_length(), 480, 1, continued=True).freeze_backbone_steps == round(100 * CONTINUED_FREEZE_BACKBONE_FRACTION)
    assert plan_steps(scratch.run_length(), 480, 1).freeze_backbone_steps == 0
    model = DinoForPreTraining.from_backbone(folder, config=tiny_dino_config())
    groups = build_optimizer(model, torch.device("cpu"), continued).param_groups
    backbone_ids = {id(parameter) for parameter in model.student.backbone.parameters()}
    for group in groups:
        in_backbone = {id(parameter) in backbone_ids for parameter in group["params"]}
        assert len(in_backbone) == 1  # a group is all backbone or all head
        assert group["lr_scale"] == (backbone_learning_rate_scale(continued) if in_backbone == {True} else 1.0)


def test_layerwise_learning_rate_decay_scales_blocks_from_the_top():
    model = DinoForPreTraining(tiny_dino_config())
    groups = model.get_parameter_groups(0.04, backbone_learning_rate_scale=1.0, layerwise_learning_rate_decay=0.5)
    scale_of = {id(parameter): group["lr_scale"] for group in groups for parameter in group["params"]}
    backbone = model.student.backbone
    assert scale_of[id(backbone.embeddings.cls_token)] == 0.5**3  # 2 blocks: embeddings at depth 0
    assert scale_of[id(backbone.layers[0].mlp.fc1.weight)] == 0.5**2
    assert scale_of[id(backbone.layers[1].mlp.fc1.weight)] == 0.5
    assert scale_of[id(backbone.layernorm.weight)] == 1.0
    assert scale_of[id(model.student.head.mlp[0].weight)] == 1.0


# ------------------------------------------------------------------------------ bad input
def test_a_backbone_outside_the_families_or_crops_it_cannot_take_are_refused(dataset, tmp_path):
    from transformers import BertConfig, BertModel

    from dino_hf.train.builders import build_model

    BertModel(BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64)).save_pretrained(
        tmp_path / "bert"
    )
    with pytest.raises(ValueError, match="--model_name_or_path.*'bert'.*vit, deit, dinov2"):
        build_model(tiny_args(dataset, tmp_path / "a", tmp_path / "none.json", model_name_or_path=str(tmp_path / "bert")))
    tiny_dino_config().save_pretrained(tmp_path / "vit")
    with pytest.raises(ValueError, match="--local_crop_size 12 is not a multiple of the backbone's patch size 8"):
        build_model(tiny_args(dataset, tmp_path / "b", tmp_path / "vit" / "config.json", local_crop_size=12))
    tiny_family_config("convnext").save_pretrained(tmp_path / "convnext")
    with pytest.raises(ValueError, match="--local_crop_size 4 is smaller than the backbone's total stride 8"):
        build_model(tiny_args(dataset, tmp_path / "c", tmp_path / "convnext" / "config.json", local_crop_size=4))
    with pytest.raises(ValueError, match="dino_hf does not train 'bert'"):
        family_of("bert")


def test_a_warm_up_beyond_the_run_is_refused():
    from dino_hf.train.arguments import DinoTrainingArguments
    from dino_hf.train.step_plan import plan_steps

    args = DinoTrainingArguments(dataset_name="d", output_dir="o", max_steps=10, freeze_backbone_steps=10)
    with pytest.raises(ValueError, match="--freeze_backbone_steps freezes the backbone for 10 of the run's 10"):
        plan_steps(args.run_length(), 6400, 1)

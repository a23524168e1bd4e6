"""Distillation from a frozen foundation model (issue 23): the teacher stays frozen and out of the optimiser and
the checkpoints, sees the crops through its own image processor, a changed teacher is refused on resume, a
ConvNet teacher cannot give the dense term, the student exports as its own stock class and resumes exactly."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from accelerate import Accelerator
from image_datasets import make_image
from safetensors.torch import load_file, save_file
from tiny_models import read_rows, tiny_args, tiny_family_config
from transformers import AutoModel, ViTImageProcessor

from dino_hf import DinoTrainer
from dino_hf.data.augmentation import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from dino_hf.models.distillation import teacher_input_size, weights_sha256
from dino_hf.models.modeling_dino import DinoForPreTraining
from dino_hf.train.distillation import load_distillation_teacher
from dino_hf.train.loop import train
from dino_hf.train.schedules import ScheduleValues
from dino_hf.train.step import DinoTrainStep

pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")

#: The teacher's own processor: another resolution (48 px, a 6 x 6 grid of its 8 px patches) and mean/std.
TEACHER_PROCESSOR = ViTImageProcessor(size={"height": 48, "width": 48}, image_mean=[0.5, 0.5, 0.5],
                                      image_std=[0.25, 0.25, 0.25])


def _save_teacher(folder: Path, model_type: str = "vit", seed: int = 1) -> Path:
    torch.manual_seed(seed)
    DinoForPreTraining(tiny_family_config(model_type)).save_backbone(folder, image_size=48)
    TEACHER_PROCESSOR.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def teacher_folder(tmp_path_factory) -> Path:
    return _save_teacher(tmp_path_factory.mktemp("teacher") / "vit")


@pytest.fixture(scope="module")
def resnet_config(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("resnet_student")
    tiny_family_config("resnet").save_pretrained(folder)
    return folder / "config.json"


DISTILLATION = dict(dino_loss_weight=0.5, distillation_soft_weight=1.0, distillation_dense_weight=1.0,
                    distillation_queue_size=32, mixed_precision="no", logging_steps=1)


def test_the_teacher_sees_the_crops_through_its_own_processor(teacher_folder):
    teacher, _ = load_distillation_teacher(str(teacher_folder), None)
    assert teacher.input_size == (48, 48)
    image = make_image(3, 48).convert("RGB")
    expected = TEACHER_PROCESSOR(images=image, return_tensors="pt")["pixel_values"]
    pixels = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1)[None]
    student_crop = (pixels - torch.tensor(IMAGENET_DEFAULT_MEAN).view(1, 3, 1, 1)) / torch.tensor(
        IMAGENET_DEFAULT_STD).view(1, 3, 1, 1)
    torch.testing.assert_close(teacher.preprocess(student_crop), expected, rtol=1e-4, atol=1e-4)
    # a 32 px student crop reaches the teacher at its 48 px; a patch-14 DINOv2 keeps 224, 50 px rounds to 48
    assert teacher.preprocess(torch.zeros(2, 3, 32, 32)).shape == (2, 3, 48, 48)
    targets = teacher(torch.zeros(2, 3, 32, 32))
    assert targets.embedding.shape == (2, 32) and targets.feature_map is None
    teacher.enable_dense()
    assert teacher(torch.zeros(2, 3, 32, 32)).feature_map.shape == (2, 32, 6, 6)
    dinov2 = tiny_family_config("dinov2").backbone_config
    dinov2.patch_size = 14
    assert teacher_input_size({"do_center_crop": True, "crop_size": {"height": 224, "width": 224},
                               "size": {"shortest_edge": 256}}, dinov2) == (224, 224)
    assert teacher_input_size({"size": {"height": 50, "width": 50}}, tiny_family_config("vit").backbone_config) == (48, 48)


def test_the_frozen_teacher_never_changes_and_never_reaches_the_optimiser(teacher_folder):
    teacher, sha256 = load_distillation_teacher(str(teacher_folder), None)
    teacher.enable_dense()
    before = {name: tensor.clone() for name, tensor in teacher.state_dict().items()}
    torch.manual_seed(0)
    model = DinoForPreTraining(tiny_family_config("resnet", distillation_embedding_size=teacher.embedding_size,
                                                  dino_loss_weight=0.0, distillation_dense_weight=1.0))
    projector = model.distillation.global_projector.weight.detach().clone()
    accelerator = Accelerator(cpu=True)
    optimizer = torch.optim.AdamW(model.get_parameter_groups(0.04), lr=1e-3)
    prepared, optimizer = accelerator.prepare(model, optimizer)
    step = DinoTrainStep(accelerator, prepared, optimizer, distillation_teacher=teacher.train())
    batch = {"global_crops": torch.randn(2, 4, 3, 32, 32), "local_crops": None}
    values = ScheduleValues(learning_rate=1e-3, weight_decay=0.04, teacher_momentum=0.9, teacher_temperature=0.04,
                            freeze_last_layer=False)
    for _ in range(3):
        statistics = step(lambda: batch, values)
    assert set(statistics.loss_statistics) == {"distillation_loss", "distillation_cosine_loss", "distillation_dense_loss"}
    assert step.take_teacher_seconds() > 0 and step.take_teacher_seconds() == 0.0
    assert not teacher.training and not any(parameter.requires_grad or parameter.grad is not None
                                            for parameter in teacher.parameters())
    for name, tensor in teacher.state_dict().items():
        assert torch.equal(tensor, before[name]), name  # byte for byte
    assert weights_sha256(teacher.backbone) == sha256
    optimised = {id(parameter) for group in optimizer.param_groups for parameter in group["params"]}
    assert not optimised & {id(parameter) for parameter in teacher.parameters()}
    assert id(model.distillation.global_projector.weight) in optimised
    assert not torch.equal(model.distillation.global_projector.weight, projector)  # the projector learns
    assert not any(key.startswith("backbone.") or "teacher_backbone" in key for key in model.state_dict())


def test_a_distilled_student_exports_alone_and_resumes_exactly(dataset, teacher_folder, resnet_config, tmp_path):
    flags = dict(DISTILLATION, max_steps=4, checkpointing_steps=2, distillation_teacher=str(teacher_folder))
    train(tiny_args(dataset, tmp_path / "reference", resnet_config, **flags))
    reference = tmp_path / "reference"
    rows = [row for row in read_rows(reference) if "loss" in row]
    for key in ("dino_loss", "distillation_loss", "distillation_cosine_loss", "distillation_soft_loss",
                "distillation_dense_loss", "teacher_forward_share"):
        assert all(np.isfinite(row[key]) for row in rows), key
    assert 0 < rows[-1]["teacher_forward_share"] < 1
    recorded = json.loads((reference / "training_args.json").read_text())
    assert recorded["distillation_teacher_sha256"] == weights_sha256(AutoModel.from_pretrained(teacher_folder))
    # the export is the student's stock ResNet alone: no projector, no queue, no teacher
    exported = load_file(reference / "backbone" / "model.safetensors")
    plain = tmp_path / "plain"
    DinoForPreTraining(tiny_family_config("resnet")).save_backbone(plain, image_size=32)
    assert set(exported) == set(load_file(plain / "model.safetensors"))
    assert type(AutoModel.from_pretrained(reference / "backbone")).__name__ == "ResNetModel"
    assert "distillation of a frozen teacher of width 32" in (reference / "backbone" / "README.md").read_text()
    # nothing of the frozen teacher in a checkpoint: the same keys as the model's own state
    checkpoint_keys = set(load_file(next((reference / "checkpoints" / "step_2").rglob("model.safetensors"))))
    assert checkpoint_keys == set(DinoForPreTraining.from_pretrained(reference).state_dict())
    # stopped at step 2 and resumed: the same weights (the projectors and the queue included) and rows
    resumed = tmp_path / "resumed"
    shutil.copytree(reference / "checkpoints" / "step_2", resumed / "checkpoints" / "step_2")
    for name in ("metrics.jsonl", "training_args.json"):
        shutil.copy(reference / name, resumed / name)
    train(tiny_args(dataset, resumed, resnet_config, **flags, resume_from_checkpoint="latest"))
    expected, actual = load_file(reference / "model.safetensors"), load_file(resumed / "model.safetensors")
    assert any(key.startswith("distillation.loss_fn.queue") for key in expected)
    for name in expected:
        assert torch.equal(expected[name], actual[name]), name
    timing = ("images_per_second", "data_wait_fraction", "elapsed_seconds", "teacher_forward_share")
    assert [{k: v for k, v in row.items() if k not in timing} for row in read_rows(resumed)] == \
        [{k: v for k, v in row.items() if k not in timing} for row in read_rows(reference)]


def test_a_teacher_that_changed_on_disk_is_refused_on_resume(dataset, resnet_config, tmp_path):
    teacher = _save_teacher(tmp_path / "teacher")
    flags = dict(DISTILLATION, max_steps=2, checkpointing_steps=2, distillation_teacher=str(teacher))
    train(tiny_args(dataset, tmp_path / "run", resnet_config, **flags))
    weights = load_file(teacher / "model.safetensors")
    name = next(iter(weights))
    weights[name] = weights[name] + 0.01
    save_file(weights, teacher / "model.safetensors", metadata={"format": "pt"})
    checkpoint = sorted((tmp_path / "run" / "checkpoints").iterdir())
    with pytest.raises(ValueError, match="is not the teacher this run started with"):
        train(tiny_args(dataset, tmp_path / "run", resnet_config, **{**flags, "max_steps": 4},
                        resume_from_checkpoint="latest"))
    assert sorted((tmp_path / "run" / "checkpoints").iterdir()) == checkpoint  # nothing lost


def test_a_convnet_teacher_cannot_give_the_dense_term(dataset, resnet_config, tmp_path):
    teacher = _save_teacher(tmp_path / "convnext", model_type="convnext")
    args = tiny_args(dataset, tmp_path / "run", resnet_config, **DISTILLATION, max_steps=2,
                     distillation_teacher=str(teacher))
    with pytest.raises(ValueError, match="--distillation_dense_weight: the dense term .* ConvNeXt teacher has none"):
        train(args)
    assert not (tmp_path / "run" / "checkpoints").exists()
    missing = tiny_args(dataset, tmp_path / "missing", resnet_config, **DISTILLATION, max_steps=2,
                        distillation_teacher=str(tmp_path / "no_such_teacher"))
    with pytest.raises(ValueError, match="no_such_teacher does not exist .* not looked up on the Hub"):
        train(missing)
    # without the dense term a ConvNet teaches (its pooled embedding)
    global_only = {**DISTILLATION, "distillation_dense_weight": 0.0}
    result = train(tiny_args(dataset, tmp_path / "global", resnet_config, **global_only, max_steps=2,
                             distillation_teacher=str(teacher)))
    assert result.step == 2


def test_dino_trainer_takes_a_teacher_object(dataset, resnet_config, tmp_path):
    torch.manual_seed(2)
    teacher = DinoForPreTraining(tiny_family_config("vit"))  # its teacher network is the one distilled
    args = tiny_args(dataset, tmp_path / "run", resnet_config, dino_loss_weight=0.0, mixed_precision="no",
                     max_steps=2)
    DinoTrainer(args=args, teacher=teacher).train()
    folder = tmp_path / "run" / "distillation_teacher"
    recorded = json.loads((tmp_path / "run" / "training_args.json").read_text())
    assert recorded["distillation_teacher"].endswith("distillation_teacher") and (folder / "config.json").is_file()
    assert recorded["distillation_teacher_sha256"] == weights_sha256(teacher.teacher.backbone)
    with pytest.raises(ValueError, match="teacher must be"):
        DinoTrainer(args=args, teacher=3)

"""One optimiser step (dino_hf.train.step.DinoTrainStep) on the tiny model: gradient accumulation, the
last-layer freeze, clipping, and non-finite steps that change nothing (DINO, and DINOv2's objective
with its iBOT head and center)."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from tiny_models import tiny_dino_config

from dino_hf.models.modeling_dino import DinoForPreTraining
from dino_hf.train.builders import build_optimizer
from dino_hf.train.schedules import ScheduleValues
from dino_hf.train.step import DinoTrainStep

pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")


#: DINOv2's objective on the tiny model: iBOT with its own head (and center), KoLeo.
DINOV2 = {"ibot_loss_weight": 1.0, "ibot_separate_head": True, "koleo_loss_weight": 0.1}


def _prepared_step(accumulation: int, clip_mode: str = "per_parameter", seed: int = 0, **config):
    from accelerate import Accelerator

    torch.manual_seed(seed)
    model = DinoForPreTraining(tiny_dino_config(drop_path_rate=0.0, **config))
    accelerator = Accelerator(cpu=True)
    optimizer = build_optimizer(model, accelerator.device)
    model, optimizer = accelerator.prepare(model, optimizer)
    return DinoTrainStep(accelerator, model, optimizer, accumulation, 3.0, clip_mode), accelerator.unwrap_model(model)


def _values(freeze_last_layer: bool = False) -> ScheduleValues:
    return ScheduleValues(learning_rate=1e-3, weight_decay=0.04, teacher_momentum=0.9,
                          teacher_temperature=0.04, freeze_last_layer=freeze_last_layer)


def _crops(batch: int, seed: int, masks: bool = False) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    crops = {"global_crops": torch.randn(2, batch, 3, 32, 32, generator=generator),
             "local_crops": torch.randn(2, batch, 3, 16, 16, generator=generator)}
    if masks:  # the 4x4 patch grid of the 32 px crops, about a third masked
        crops["masks"] = torch.rand(2, batch, 4, 4, generator=generator) < 0.3
    return crops


def _split(batch: dict[str, torch.Tensor], parts: int) -> list[dict[str, torch.Tensor]]:
    return [{key: value.chunk(parts, dim=1)[index] for key, value in batch.items()} for index in range(parts)]


def test_gradient_accumulation_matches_the_full_batch():
    full_step, full_model = _prepared_step(accumulation=1)
    accumulated_step, accumulated_model = _prepared_step(accumulation=2)
    for step in range(3):
        batch = _crops(8, seed=step)
        full_step(iter([batch]).__next__, _values())
        accumulated_step(iter(_split(batch, 2)).__next__, _values())
    assert full_model.loss_fn.center.abs().sum() > 0
    # The attention key bias has a mathematically zero gradient (softmax ignores a shift); Adam turns
    # its rounding noise into full-size updates, so it is the one tensor that cannot match.
    def comparable(model):
        return {name: value for name, value in model.state_dict().items() if not name.endswith("k_proj.bias")}

    torch.testing.assert_close(comparable(accumulated_model), comparable(full_model), rtol=1e-4, atol=1e-5)


def test_gradient_accumulation_matches_the_full_batch_with_ibot():
    """The iBOT loss averages crops, so two half batches make the full batch's gradient; its center
    takes the mean over every masked patch of the micro-steps (sums and counts)."""
    full_step, full_model = _prepared_step(accumulation=1, ibot_loss_weight=1.0, ibot_separate_head=True)
    accumulated_step, accumulated_model = _prepared_step(accumulation=2, ibot_loss_weight=1.0, ibot_separate_head=True)
    for step in range(3):
        batch = _crops(8, seed=step, masks=True)
        full_statistics = full_step(iter([batch]).__next__, _values())
        accumulated_statistics = accumulated_step(iter(_split(batch, 2)).__next__, _values())
    assert full_model.ibot_loss_fn.center.abs().sum() > 0
    assert "ibot_loss" in full_statistics.loss_statistics and "koleo_loss" not in full_statistics.loss_statistics
    torch.testing.assert_close(accumulated_statistics.loss_statistics["ibot_loss"],
                               full_statistics.loss_statistics["ibot_loss"], rtol=1e-4, atol=1e-5)

    def comparable(model):
        return {name: value for name, value in model.state_dict().items() if not name.endswith("k_proj.bias")}

    torch.testing.assert_close(comparable(accumulated_model), comparable(full_model), rtol=1e-4, atol=1e-5)


def test_frozen_last_layer_is_not_updated():
    step, model = _prepared_step(accumulation=1)
    last_before = copy.deepcopy(model.student.head.last_layer.state_dict())
    mlp_before = model.student.head.mlp[0].weight.detach().clone()
    step(iter([_crops(4, seed=0)]).__next__, _values(freeze_last_layer=True))
    torch.testing.assert_close(model.student.head.last_layer.state_dict(), last_before, rtol=0, atol=0)
    assert not torch.equal(model.student.head.mlp[0].weight, mlp_before)


@pytest.mark.parametrize("clip_mode", ["per_parameter", "global"])
def test_clipping(clip_mode):
    step, model = _prepared_step(accumulation=1, clip_mode=clip_mode)
    step.max_grad_norm = 0.5
    for index, parameter in enumerate(step.parameters):
        parameter.grad = torch.full_like(parameter, float(index + 1))
    norm_before = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in step.parameters]))
    grad_norm, finite = step._prepare_gradients(freeze_last_layer=False)
    assert bool(finite) and grad_norm == pytest.approx(norm_before.item(), rel=1e-5)
    norms = torch.stack([p.grad.norm() for p in step.parameters])
    if clip_mode == "per_parameter":
        assert torch.all(norms <= 0.5 + 1e-5) and torch.all(norms >= 0.5 - 1e-3)
    else:
        assert torch.linalg.vector_norm(norms) == pytest.approx(0.5, rel=1e-4)


@pytest.mark.parametrize("objective", [{}, DINOV2], ids=["dino", "dinov2"])
def test_a_non_finite_step_changes_nothing(objective):
    step, model = _prepared_step(accumulation=1, **objective)
    masks = bool(objective)
    step(iter([_crops(4, seed=0, masks=masks)]).__next__, _values())  # a good step: optimiser state exists
    model_before = copy.deepcopy(model.state_dict())
    optimizer_before = copy.deepcopy(step.optimizer.state_dict())
    bad = _crops(4, seed=1, masks=masks)
    bad["global_crops"][0, 0, 0, 0, 0] = float("nan")
    statistics = step(iter([bad]).__next__, _values())
    assert not bool(statistics.finite) and not math.isfinite(statistics.grad_norm.item())
    # student, teacher, the centers (and iBOT head)
    torch.testing.assert_close(model.state_dict(), model_before, rtol=0, atol=0)
    torch.testing.assert_close(step.optimizer.state_dict()["state"], optimizer_before["state"], rtol=0, atol=0)
    assert all(p.grad is None for p in step.parameters)
    # and training goes on normally afterwards
    assert bool(step(iter([_crops(4, seed=2, masks=masks)]).__next__, _values()).finite)


def test_the_ibot_head_learns_its_last_layer_freezes_and_the_teacher_follows():
    step, model = _prepared_step(accumulation=1, **DINOV2)
    ibot_head = model.student.ibot_head
    last_before = copy.deepcopy(ibot_head.last_layer.state_dict())
    mlp_before = ibot_head.mlp[0].weight.detach().clone()
    teacher_before = model.teacher.ibot_head.mlp[0].weight.detach().clone()
    statistics = step(iter([_crops(4, seed=0, masks=True)]).__next__, _values(freeze_last_layer=True))
    assert {"dino_loss", "ibot_loss", "koleo_loss", "ibot_teacher_entropy", "ibot_teacher_mean_entropy",
            "teacher_student_kl"} <= set(statistics.loss_statistics)
    torch.testing.assert_close(ibot_head.last_layer.state_dict(), last_before, rtol=0, atol=0)  # DINOv2 freezes it too
    assert not torch.equal(ibot_head.mlp[0].weight, mlp_before)
    # the EMA covers the iBOT head: teacher = 0.9 teacher + 0.1 student
    torch.testing.assert_close(model.teacher.ibot_head.mlp[0].weight, 0.9 * teacher_before + 0.1 * ibot_head.mlp[0].weight)

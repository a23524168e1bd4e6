"""The distillation terms (dino_hf.losses.distillation) against their formulas written out, and the queue."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from dino_hf.losses.distillation import DistillationLoss


def test_the_cosine_term_is_zero_for_the_teachers_direction_and_one_for_an_orthogonal_one():
    loss = DistillationLoss(4)
    teacher = torch.tensor([[1.0, 0.0, 0.0, 0.0], [0.0, 2.0, 0.0, 0.0]])
    assert loss(3 * teacher, teacher).terms["cosine"].item() == pytest.approx(0.0, abs=1e-7)
    orthogonal = torch.tensor([[0.0, 1.0, 0.0, 0.0], [1.0, 0.0, 0.0, 0.0]])
    assert loss(orthogonal, teacher).terms["cosine"].item() == pytest.approx(1.0)


def test_the_soft_term_is_the_cross_entropy_of_the_queue_similarities_and_the_queue_is_fifo():
    torch.manual_seed(0)
    loss = DistillationLoss(8, cosine_weight=0.0, soft_weight=1.0, queue_size=5, student_temperature=0.2,
                            teacher_temperature=0.05).train()
    queue = loss.queue.clone()
    student, teacher = torch.randn(3, 8, dtype=torch.float64), torch.randn(3, 8, dtype=torch.float64)
    output = loss(student, teacher)
    targets = torch.softmax(F.normalize(teacher, dim=1) @ queue.double().T / 0.05, dim=1)
    log_predictions = torch.log_softmax(F.normalize(student, dim=1) @ queue.double().T / 0.2, dim=1)
    expected = -(targets * log_predictions).sum(dim=1).mean()
    torch.testing.assert_close(output.terms["soft"], expected)
    assert set(output.terms) == {"soft"} and output.loss == output.terms["soft"]
    # the three teacher embeddings replaced the three oldest entries; the next three wrap around
    torch.testing.assert_close(loss.queue[:3], F.normalize(teacher, dim=1).float())
    torch.testing.assert_close(loss.queue[3:], queue[3:])
    assert loss.queue_position.item() == 3
    later = torch.randn(3, 8)
    loss(torch.randn(3, 8), later)
    torch.testing.assert_close(loss.queue[[3, 4, 0]], F.normalize(later, dim=1))
    assert loss.queue_position.item() == 1
    before = loss.queue.clone()
    loss.eval()(torch.randn(3, 8), torch.randn(3, 8))  # evaluation leaves the queue alone
    assert torch.equal(loss.queue, before)


def test_the_dense_term_compares_unit_features_on_the_students_grid():
    loss = DistillationLoss(4, cosine_weight=0.0, dense_weight=1.0)
    student_map = torch.randn(2, 4, 3, 3)
    teacher_map = torch.randn(2, 4, 6, 6)
    output = loss(torch.randn(2, 4), torch.randn(2, 4), student_map, teacher_map)
    resized = F.interpolate(teacher_map, size=(3, 3), mode="bilinear", align_corners=False)
    expected = (F.normalize(student_map, dim=1) - F.normalize(resized, dim=1)).square().sum(dim=1).mean()
    torch.testing.assert_close(output.terms["dense"], expected)
    same = loss(torch.randn(2, 4), torch.randn(2, 4), 5 * student_map, student_map)
    assert same.terms["dense"].item() == pytest.approx(0.0, abs=1e-6)
    with pytest.raises(ValueError, match="feature maps"):
        loss(torch.randn(2, 4), torch.randn(2, 4))


def test_the_weights_sum_the_terms_and_bad_settings_are_one_sentence():
    loss = DistillationLoss(4, cosine_weight=0.5, soft_weight=2.0, queue_size=16)
    output = loss(torch.randn(6, 4, requires_grad=True), torch.randn(6, 4))
    assert output.loss.item() == pytest.approx(0.5 * output.terms["cosine"].item() + 2.0 * output.terms["soft"].item())
    output.loss.backward()  # the queue it compared with may change afterwards: the graph keeps its own copy
    with pytest.raises(ValueError, match="At least one distillation term"):
        DistillationLoss(4, cosine_weight=0.0)
    with pytest.raises(ValueError, match="queue_size"):
        DistillationLoss(4, soft_weight=1.0, queue_size=0)
    with pytest.raises(ValueError, match=r"\(N, D\)"):
        loss(torch.randn(6, 4), torch.randn(6, 5))


def test_autocast_does_not_lower_the_terms_precision():
    loss = DistillationLoss(8, soft_weight=1.0, queue_size=32)
    student, teacher = torch.randn(4, 8), torch.randn(4, 8)
    reference = loss.eval()(student, teacher).loss
    with torch.autocast("cpu", dtype=torch.bfloat16):
        under_autocast = loss(student.bfloat16(), teacher.bfloat16()).loss
    assert under_autocast.dtype == torch.float32
    assert math.isclose(under_autocast.item(), reference.item(), rel_tol=2e-2)

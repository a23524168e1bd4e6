"""IBOTPatchLoss against DINOv2's ``iBOTPatchLoss`` written out plainly below in float64
(``softmax_center_teacher`` / ``sinkhorn_knopp_teacher`` / ``forward_masked`` with the collate's
``masks_weight``), its statistics, its input checks and its centre and targets over processes."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from loss_references import (
    assert_close_relative,
    random_logits,
    reference_ibot_sinkhorn_knopp,
    results_of_gloo_processes,
)

from dino_hf.losses.ibot import IBOTPatchLoss


def reference_ibot_teacher(teacher_patch_logits, center, teacher_temperature):
    """DINOv2 ``iBOTPatchLoss.softmax_center_teacher``."""
    return F.softmax((teacher_patch_logits - center) / teacher_temperature, dim=-1)


def reference_ibot_loss(student_patch_logits, teacher_probabilities, masks, student_temperature):
    """DINOv2 ``forward_masked`` with ``masks_weight`` from ``collate_data_and_cast`` (in float64: the
    collate's int-to-float promotion would give float32 weights)."""
    masks_weight = (1 / masks.sum(-1).double().clamp(min=1.0)).unsqueeze(-1).expand_as(masks)[masks]
    loss = torch.sum(teacher_probabilities * F.log_softmax(student_patch_logits / student_temperature, dim=-1), dim=-1)
    return -(loss * masks_weight).sum() / masks.shape[0]


def random_masks(num_crops, num_patches, ratio, generator):
    """Bool (N, P) masks, about ``ratio`` of the patches of about half the crops (the others empty)."""
    masks = torch.rand(num_crops, num_patches, generator=generator) < ratio
    masks[torch.rand(num_crops, generator=generator) < 0.5] = False
    return masks


@pytest.mark.parametrize("centering", ["centering", "sinkhorn_knopp"])
def test_ibot_loss_matches_dinov2_reference(centering):
    """Values, gradients and centre over batch sizes, mask ratios and temperatures, 3 steps each."""
    num_prototypes, num_patches = 20, 16
    generator = torch.Generator().manual_seed(11)
    for num_crops, ratio, student_temperature, teacher_temperature in [
        (1, 0.5, 0.1, 0.04), (4, 0.1, 0.1, 0.07), (6, 0.3, 0.2, 0.5), (10, 0.9, 0.1, 0.04),
    ]:
        loss_fn = IBOTPatchLoss(num_prototypes, student_temperature=student_temperature, centering=centering).double()
        center = torch.zeros(1, num_prototypes, dtype=torch.float64)
        for _step in range(3):
            masks = random_masks(num_crops, num_patches, ratio, generator)
            masks[0, 0] = True  # at least one masked patch
            num_masked = int(masks.sum())
            student = random_logits(1, num_masked, num_prototypes, generator)[0].requires_grad_(True)
            teacher = random_logits(1, num_masked, num_prototypes, generator)[0]
            loss = loss_fn(student, teacher, masks, teacher_temperature, update_center=True)
            (gradient,) = torch.autograd.grad(loss, student)
            if centering == "centering":
                targets = reference_ibot_teacher(teacher, center, teacher_temperature)
                center = center * 0.9 + teacher.mean(0, keepdim=True) * 0.1
            else:
                targets = reference_ibot_sinkhorn_knopp(teacher, teacher_temperature)
            expected = reference_ibot_loss(student, targets, masks, student_temperature)
            (expected_gradient,) = torch.autograd.grad(expected, student)
            assert loss.dtype == torch.float64 and loss.ndim == 0
            assert_close_relative(loss.detach(), expected.detach(), 1e-10)
            assert_close_relative(gradient, expected_gradient, 1e-10)
            if centering == "centering":
                assert_close_relative(loss_fn.center, center, 1e-12)
            else:
                assert torch.count_nonzero(loss_fn.center) == 0


def test_ibot_loss_statistics_masks_shapes_and_float32():
    generator = torch.Generator().manual_seed(12)
    masks = torch.zeros(3, 2, 2, dtype=torch.bool)
    masks[0, 0, 0] = masks[0, 1, 1] = masks[2, 1, 0] = True  # crop 1 unmasked
    student = torch.randn(3, 8, generator=generator, requires_grad=True)
    teacher = torch.randn(3, 8, generator=generator)
    loss_fn = IBOTPatchLoss(8)
    output = loss_fn(student, teacher, masks, 0.04, update_center=False, return_statistics=True)
    assert output.loss.dtype == torch.float32
    expected = reference_ibot_loss(student.double(), reference_ibot_teacher(teacher.double(), 0.0, 0.04),
                                   masks.flatten(1), 0.1)
    assert_close_relative(output.loss.double(), expected.detach(), 1e-6)
    probabilities = reference_ibot_teacher(teacher.double(), 0.0, 0.04)
    entropy = torch.special.entr(probabilities).sum(-1).mean()
    assert math.isclose(output.teacher_entropy.item(), entropy.item(), rel_tol=1e-5)
    torch.testing.assert_close(output.teacher_logits_sum, teacher.sum(0, keepdim=True))
    assert output.num_masked_patches.item() == 3.0
    assert torch.count_nonzero(loss_fn.center) == 0  # update_center=False


def test_ibot_loss_without_masked_patches_is_zero_and_keeps_the_centre():
    loss_fn = IBOTPatchLoss(8)
    loss_fn.center.fill_(0.5)
    student = torch.zeros(0, 8, requires_grad=True)
    output = loss_fn(student, torch.zeros(0, 8), torch.zeros(4, 16, dtype=torch.bool), 0.04,
                     update_center=True, return_statistics=True)
    assert output.loss.item() == 0.0 and output.num_masked_patches.item() == 0
    output.loss.backward()  # still connected to the student
    assert torch.equal(loss_fn.center, torch.full((1, 8), 0.5))
    # a skipped step (apply False) keeps the centre as well
    loss_fn.update_center(torch.ones(1, 8), torch.tensor(2.0), apply=torch.tensor(False))
    assert torch.equal(loss_fn.center, torch.full((1, 8), 0.5))


def test_ibot_loss_refuses_rows_that_do_not_match_the_masks():
    loss_fn = IBOTPatchLoss(8)
    masks = torch.zeros(2, 4, dtype=torch.bool)
    masks[0, :3] = True
    with pytest.raises(ValueError, match="one row per masked patch"):
        loss_fn(torch.zeros(2, 8), torch.zeros(2, 8), masks, 0.04)
    with pytest.raises(ValueError, match="bool tensor"):
        loss_fn(torch.zeros(3, 8), torch.zeros(3, 8), masks.float(), 0.04)


def _distributed_results(rank: int, world_size: int) -> dict:
    generator = torch.Generator().manual_seed(0)
    # 5 masked patches on process 0, 2 on process 1 (unequal counts)
    patches = random_logits(1, 7, 12, generator)[0]
    local_patches = patches[:5] if rank == 0 else patches[5:]
    ibot = IBOTPatchLoss(12).double()
    ibot.update_center(local_patches.sum(0, keepdim=True), torch.tensor(float(len(local_patches))))
    ibot_sinkhorn = IBOTPatchLoss(12, centering="sinkhorn_knopp").double().teacher_probabilities(local_patches, 0.5)
    return {"patches": patches, "ibot_center": ibot.center, "ibot_sinkhorn": ibot_sinkhorn}


def test_ibot_distributed_center_and_sinkhorn_use_the_masked_patches_of_all_processes(tmp_path):
    """Two gloo processes with different numbers of masked patches match one process with all of them."""
    results = results_of_gloo_processes(_distributed_results, tmp_path)
    patches = results[0]["patches"]
    expected_ibot_center = 0.1 * patches.mean(0, keepdim=True)
    expected_ibot_sinkhorn = reference_ibot_sinkhorn_knopp(patches, 0.5)
    for rank, result in enumerate(results):
        assert_close_relative(result["ibot_center"], expected_ibot_center, 1e-12)
        rows = slice(0, 5) if rank == 0 else slice(5, 7)
        assert_close_relative(result["ibot_sinkhorn"], expected_ibot_sinkhorn[rows], 1e-10)

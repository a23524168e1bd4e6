"""DinoLoss against an independent reference written out plainly below in float64: the official
pairwise double loop of facebookresearch/dino (``DINOLoss.forward``) and its centre update; also
its Sinkhorn-Knopp teacher, the collapse statistics, the input checks and the distributed centre."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from loss_references import assert_close_relative, random_logits, reference_sinkhorn_knopp, results_of_gloo_processes

import dino_hf.losses.cross_entropy as cross_entropy_module
from dino_hf.losses.dino import DinoLoss

STUDENT_TEMPERATURE = 0.1
CENTER_MOMENTUM = 0.9


def reference_dino_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    center: torch.Tensor,
    student_temperature: float,
    teacher_temperature: float,
) -> torch.Tensor:
    """The official formulation: every teacher crop against every student crop of another view."""
    student_crops = (student_logits / student_temperature).unbind(0)
    teacher_crops = F.softmax((teacher_logits - center) / teacher_temperature, dim=-1).detach()
    total_loss = 0.0
    num_loss_terms = 0
    for teacher_index, teacher_probabilities in enumerate(teacher_crops.unbind(0)):
        for student_index, student_crop in enumerate(student_crops):
            if student_index == teacher_index:
                continue
            loss = torch.sum(-teacher_probabilities * F.log_softmax(student_crop, dim=-1), dim=-1)
            total_loss = total_loss + loss.mean()
            num_loss_terms += 1
    return total_loss / num_loss_terms


def reference_center_update(center: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """Official ``update_center`` on one process: EMA of the batch-mean teacher logit."""
    flat = teacher_logits.reshape(-1, teacher_logits.shape[-1])
    batch_center = torch.sum(flat, dim=0, keepdim=True) / len(flat)
    return center * CENTER_MOMENTUM + batch_center * (1 - CENTER_MOMENTUM)


@pytest.mark.parametrize("chunk_bytes", [None, 3 * 24 * 8], ids=["whole", "chunked"])
@pytest.mark.parametrize("num_global_crops", [1, 2])
def test_matches_official_pairwise_loop(num_global_crops, chunk_bytes, monkeypatch):
    """Loss, gradients and centre over crops 2..12, batch sizes, temperatures, 3 steps each."""
    if chunk_bytes is not None:  # 3 rows per chunk: exercises full chunks and a remainder
        monkeypatch.setattr(cross_entropy_module, "_CPU_CHUNK_BYTES", chunk_bytes)
    num_prototypes = 24
    generator = torch.Generator().manual_seed(num_global_crops)
    for num_crops in range(max(2, num_global_crops), 13):
        for batch_size, student_temperature, teacher_temperature in [
            (1, 0.1, 0.04),
            (4, 0.1, 0.07),
            (7, 0.2, 0.5),
        ]:
            loss_fn = DinoLoss(
                num_prototypes, student_temperature=student_temperature, center_momentum=0.9
            ).double()
            center = torch.zeros(1, num_prototypes, dtype=torch.float64)
            for _step in range(3):
                student = random_logits(num_crops, batch_size, num_prototypes, generator)
                teacher = random_logits(num_global_crops, batch_size, num_prototypes, generator)
                student.requires_grad_(True)
                loss = loss_fn(student, teacher, teacher_temperature)
                (gradient,) = torch.autograd.grad(loss, student)
                expected = reference_dino_loss(
                    student, teacher, center, student_temperature, teacher_temperature
                )
                (expected_gradient,) = torch.autograd.grad(expected, student)
                center = reference_center_update(center, teacher)

                assert loss.dtype == torch.float64 and loss.ndim == 0
                assert_close_relative(loss.detach(), expected.detach(), 1e-6)
                assert_close_relative(gradient, expected_gradient, 1e-6)
                assert_close_relative(loss_fn.center, center, 1e-6)


def test_float32_and_no_grad_paths_agree_with_reference():
    generator = torch.Generator().manual_seed(0)
    student = random_logits(6, 5, 40, generator)
    teacher = random_logits(2, 5, 40, generator)
    expected = reference_dino_loss(student, teacher, torch.zeros(1, 40), 0.1, 0.04)
    loss_fn = DinoLoss(40)
    with torch.no_grad():
        no_grad_loss = loss_fn(student.float(), teacher.float(), 0.04, update_center=False)
    grad_loss = loss_fn(student.float().requires_grad_(), teacher.float(), 0.04)
    assert no_grad_loss.dtype == grad_loss.dtype == torch.float32
    assert_close_relative(no_grad_loss.double(), expected, 1e-5)
    assert_close_relative(grad_loss.detach().double(), expected, 1e-5)


def test_bf16_autocast_inputs_give_float32_loss_and_bf16_gradient():
    generator = torch.Generator().manual_seed(1)
    student = random_logits(4, 3, 32, generator).bfloat16().requires_grad_(True)
    teacher = random_logits(2, 3, 32, generator).bfloat16()
    loss_fn = DinoLoss(32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = loss_fn(student, teacher, 0.04)
        (gradient,) = torch.autograd.grad(loss, student)
    assert loss.dtype == torch.float32
    assert gradient.dtype == torch.bfloat16
    assert loss_fn.center.dtype == torch.float32
    # the bf16 inputs are upcast exactly, so the float64 reference on the same values agrees
    student64 = student.detach().double().requires_grad_(True)
    expected = reference_dino_loss(student64, teacher.double(), torch.zeros(1, 32), 0.1, 0.04)
    (expected_gradient,) = torch.autograd.grad(expected, student64)
    assert_close_relative(loss.double(), expected, 1e-5)
    assert_close_relative(gradient.double(), expected_gradient, 1e-2)  # bf16 rounding


def test_gradcheck_and_teacher_gets_no_gradient():
    generator = torch.Generator().manual_seed(2)
    student = random_logits(4, 2, 6, generator).requires_grad_(True)
    teacher = random_logits(2, 2, 6, generator).requires_grad_(True)
    loss_fn = DinoLoss(6).double()
    assert torch.autograd.gradcheck(
        lambda s: loss_fn(s, teacher.detach(), 0.07, update_center=False), (student,)
    )
    loss = loss_fn(student, teacher, 0.07)
    student_gradient, teacher_gradient = torch.autograd.grad(
        loss, (student, teacher), allow_unused=True
    )
    assert teacher_gradient is None
    assert student_gradient is not None


def test_backward_twice_with_retain_graph_gives_the_same_gradient():
    generator = torch.Generator().manual_seed(3)
    student = random_logits(5, 3, 16, generator).requires_grad_(True)
    teacher = random_logits(2, 3, 16, generator)
    loss = DinoLoss(16).double()(student, teacher, 0.04)
    (first,) = torch.autograd.grad(2 * loss, student, retain_graph=True)
    (second,) = torch.autograd.grad(3 * loss, student)
    torch.testing.assert_close(second, 1.5 * first)


def test_tensor_temperature_matches_float():
    generator = torch.Generator().manual_seed(4)
    student = random_logits(4, 3, 16, generator)
    teacher = random_logits(2, 3, 16, generator)
    loss_fn = DinoLoss(16).double().eval()
    as_float = loss_fn(student, teacher, 0.05)
    as_tensor = loss_fn(student, teacher, torch.tensor(0.05, dtype=torch.float64))
    torch.testing.assert_close(as_tensor, as_float)


def test_center_update_modes():
    generator = torch.Generator().manual_seed(5)
    student = random_logits(4, 3, 8, generator).float()
    teacher = random_logits(2, 3, 8, generator).float()
    loss_fn = DinoLoss(8)
    assert loss_fn.center.shape == (1, 8) and loss_fn.center.dtype == torch.float32
    assert "center" in loss_fn.state_dict()
    assert torch.count_nonzero(loss_fn.center) == 0

    loss_fn(student, teacher, 0.04, update_center=False)
    assert torch.count_nonzero(loss_fn.center) == 0
    loss_fn.eval()
    loss_fn(student, teacher, 0.04)
    assert torch.count_nonzero(loss_fn.center) == 0
    loss_fn(student, teacher, 0.04, update_center=True)
    expected = reference_center_update(torch.zeros(1, 8), teacher)
    torch.testing.assert_close(loss_fn.center, expected)

    # gradient accumulation: explicit update from the mean over micro-steps
    loss_fn.center.zero_()
    mean = DinoLoss.teacher_logits_mean(teacher)
    assert mean.shape == (1, 8) and not mean.requires_grad
    loss_fn.update_center(mean)
    torch.testing.assert_close(loss_fn.center, expected)


def test_sinkhorn_knopp_teacher():
    generator = torch.Generator().manual_seed(6)
    num_global_crops, batch_size, num_prototypes = 2, 6, 10
    teacher = random_logits(num_global_crops, batch_size, num_prototypes, generator)
    loss_fn = DinoLoss(num_prototypes, centering="sinkhorn_knopp").double()
    probabilities = loss_fn.teacher_probabilities(teacher, 0.5)
    assert probabilities.shape == teacher.shape and probabilities.dtype == torch.float64
    # every sample's row is a distribution
    torch.testing.assert_close(
        probabilities.sum(-1), torch.ones(num_global_crops, batch_size, dtype=torch.float64)
    )
    assert_close_relative(probabilities, reference_sinkhorn_knopp(teacher, 0.5), 1e-6)

    # with many iterations the prototypes share the mass equally: each gets N / K
    converged = DinoLoss(num_prototypes, centering="sinkhorn_knopp", sinkhorn_iterations=500)
    probabilities = converged.double().teacher_probabilities(teacher, 0.5)
    num_samples = num_global_crops * batch_size
    torch.testing.assert_close(
        probabilities.sum(dim=(0, 1)),
        torch.full((num_prototypes,), num_samples / num_prototypes, dtype=torch.float64),
    )

    # large logits at a low temperature must not overflow
    sharp = loss_fn.teacher_probabilities(100 * teacher, 0.04)
    assert torch.isfinite(sharp).all()

    # the loss uses these targets; the centre is neither used nor updated
    student = random_logits(5, batch_size, num_prototypes, generator).requires_grad_(True)
    loss = loss_fn(student, teacher, 0.5)
    targets = reference_sinkhorn_knopp(teacher, 0.5)
    expected = 0.0
    for t in range(num_global_crops):
        for s in range(5):
            if s != t:
                log_p = F.log_softmax(student[s] / 0.1, dim=-1)
                expected = expected + (-targets[t] * log_p).sum(-1).mean()
    expected = expected / (num_global_crops * 4)
    assert_close_relative(loss.detach(), expected.detach(), 1e-6)
    assert torch.count_nonzero(loss_fn.center) == 0


def test_teacher_statistics():
    num_prototypes = 16
    uniform = torch.full((2, 3, num_prototypes), 1 / num_prototypes)
    entropy, mean_entropy = DinoLoss.teacher_statistics(uniform)
    assert entropy.ndim == mean_entropy.ndim == 0
    assert math.isclose(entropy.item(), math.log(num_prototypes), rel_tol=1e-6)
    assert math.isclose(mean_entropy.item(), math.log(num_prototypes), rel_tol=1e-6)

    one_hot = F.one_hot(torch.tensor([[0, 1, 2], [3, 0, 1]]), num_prototypes).float()
    entropy, mean_entropy = DinoLoss.teacher_statistics(one_hot)
    assert entropy.item() == 0.0
    # six samples spread over four prototypes with counts (2, 2, 1, 1)
    expected = -(2 * (1 / 3) * math.log(1 / 3) + 2 * (1 / 6) * math.log(1 / 6))
    assert math.isclose(mean_entropy.item(), expected, rel_tol=1e-6)


def _bad_calls():
    good_student = torch.zeros(4, 2, 8)
    good_teacher = torch.zeros(2, 2, 8)
    loss_fn = DinoLoss(8)
    return [
        ("student_logits", lambda: loss_fn(torch.zeros(8, 8), good_teacher, 0.04)),
        ("teacher_logits", lambda: loss_fn(good_student, torch.zeros(1, 2, 2, 8), 0.04)),
        ("student_logits", lambda: loss_fn(torch.zeros(4, 2, 7), good_teacher, 0.04)),
        ("teacher_logits", lambda: loss_fn(good_student, torch.zeros(2, 2, 9), 0.04)),
        ("teacher_logits", lambda: loss_fn(good_student, torch.zeros(2, 3, 8), 0.04)),
        ("at least 2 crops", lambda: loss_fn(torch.zeros(1, 2, 8), torch.zeros(1, 2, 8), 0.04)),
        ("more crops", lambda: loss_fn(torch.zeros(2, 2, 8), torch.zeros(3, 2, 8), 0.04)),
        (
            "student_logits",
            lambda: loss_fn(torch.zeros(4, 2, 8, dtype=torch.long), good_teacher, 1),
        ),
        ("teacher_temperature", lambda: loss_fn(good_student, good_teacher, 0.0)),
        ("teacher_temperature", lambda: loss_fn(good_student, good_teacher, -0.04)),
        ("teacher_temperature", lambda: loss_fn(good_student, good_teacher, float("nan"))),
        ("teacher_temperature", lambda: loss_fn(good_student, good_teacher, torch.tensor(0.0))),
        ("teacher_temperature", lambda: loss_fn(good_student, good_teacher, torch.ones(1))),
        ("teacher_logits_mean", lambda: loss_fn.update_center(torch.zeros(1, 9))),
    ]


@pytest.mark.parametrize("index", range(len(_bad_calls())))
def test_bad_input_raises_one_sentence_value_error(index):
    expected_text, call = _bad_calls()[index]
    with pytest.raises(ValueError, match=expected_text) as error:
        call()
    message = str(error.value)
    assert "\n" not in message and message.endswith(".")

def _distributed_results(rank: int, world_size: int) -> dict:
    generator = torch.Generator().manual_seed(0)
    teacher = random_logits(2, 3 * world_size, 10, generator)  # the global batch
    local = teacher[:, 3 * rank : 3 * (rank + 1)]
    loss_fn = DinoLoss(10).double()
    loss_fn.update_center(DinoLoss.teacher_logits_mean(local))
    sinkhorn = DinoLoss(10, centering="sinkhorn_knopp").double()
    probabilities = sinkhorn.teacher_probabilities(local, 0.5)
    return {"center": loss_fn.center, "sinkhorn": probabilities, "teacher": teacher}


def test_distributed_center_and_sinkhorn_use_the_global_batch(tmp_path):
    """Two gloo processes, each with half of the batch, match one process with all of it."""
    results = results_of_gloo_processes(_distributed_results, tmp_path)
    teacher = results[0]["teacher"]
    expected_center = reference_center_update(torch.zeros(1, 10, dtype=torch.float64), teacher)
    expected_sinkhorn = reference_sinkhorn_knopp(teacher, 0.5)
    for rank, result in enumerate(results):
        assert_close_relative(result["center"], expected_center, 1e-12)
        assert_close_relative(
            result["sinkhorn"], expected_sinkhorn[:, 3 * rank : 3 * (rank + 1)], 1e-10
        )


def test_teacher_student_kl_is_the_loss_minus_the_teacher_entropy_on_a_fixed_batch():
    """KL(q_t || p_s) averaged over the loss's (t, s != t) pairs, computed pair by pair, equals
    loss - teacher_entropy; the student entropy is the mean entropy of every student row. Both with
    and without gradients (the two code paths of the fused loss)."""
    generator = torch.Generator().manual_seed(3)
    num_prototypes, num_crops, num_global, batch = 40, 5, 2, 6
    loss_fn = DinoLoss(num_prototypes, student_temperature=0.1)
    loss_fn.center.copy_(torch.randn(1, num_prototypes, generator=generator))
    student = torch.randn(num_crops, batch, num_prototypes, generator=generator) * 3
    teacher = torch.randn(num_global, batch, num_prototypes, generator=generator) * 3
    q = torch.softmax((teacher.double() - loss_fn.center.double()) / 0.05, dim=-1)
    log_p = torch.log_softmax(student.double() / 0.1, dim=-1)
    pairs = [(t, s) for t in range(num_global) for s in range(num_crops) if s != t]
    kl = torch.stack([(torch.special.xlogy(q[t], q[t]) - q[t] * log_p[s]).sum(-1).mean() for t, s in pairs]).mean()
    student_entropy = -(log_p.exp() * log_p).sum(-1).mean()
    for requires_grad in (True, False):
        logits = student.clone().requires_grad_(requires_grad)
        output = loss_fn(logits, teacher, 0.05, update_center=False, return_statistics=True)
        statistics = output.statistics
        assert set(statistics) == {"teacher_entropy", "teacher_mean_entropy", "student_entropy", "teacher_student_kl"}
        assert kl.item() > 0.5  # not vacuous: the student is far from the teacher
        assert statistics["teacher_student_kl"].item() == pytest.approx(kl.item(), rel=1e-5)
        assert statistics["teacher_student_kl"].item() == pytest.approx(
            (output.loss - statistics["teacher_entropy"]).item(), rel=1e-6)
        # with gradients it is logsumexp(z) - <p, z> in float32: a cancellation of terms ~ |z|, hence abs=
        assert statistics["student_entropy"].item() == pytest.approx(student_entropy.item(), abs=1e-4)
        if requires_grad:  # the statistics do not change the gradient
            output.loss.backward()
            reference = student.clone().requires_grad_(True)
            loss_fn(reference, teacher, 0.05, update_center=False).backward()
            torch.testing.assert_close(logits.grad, reference.grad)

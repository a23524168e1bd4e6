"""KoLeoLoss against DINOv2's ``KoLeoLoss`` (dinov2/loss/koleo_loss.py) written out plainly below in
float64; the duplicate guard and the float32 floor under half precision."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from loss_references import assert_close_relative

from dino_hf.losses.koleo import KoLeoLoss


def reference_koleo(student_output, eps=1e-8):
    """DINOv2 ``KoLeoLoss.forward`` (dinov2/loss/koleo_loss.py)."""
    student_output = F.normalize(student_output, eps=eps, p=2, dim=-1)
    dots = torch.mm(student_output, student_output.t())
    n = student_output.shape[0]
    dots.view(-1)[:: (n + 1)].fill_(-1)
    _, nearest = torch.max(dots, dim=1)
    distances = torch.nn.PairwiseDistance(2, eps=eps)(student_output, student_output[nearest])
    return -torch.log(distances + eps).mean()


@pytest.mark.parametrize("batch_size", [2, 3, 8, 64])
@pytest.mark.parametrize("dimension", [2, 16, 384])
def test_koleo_matches_dinov2_reference(batch_size, dimension):
    generator = torch.Generator().manual_seed(batch_size * 1000 + dimension)
    features = (5 * torch.randn(batch_size, dimension, generator=generator, dtype=torch.float64)).requires_grad_(True)
    loss = KoLeoLoss()(features)
    (gradient,) = torch.autograd.grad(loss, features)
    expected = reference_koleo(features)
    (expected_gradient,) = torch.autograd.grad(expected, features)
    assert loss.dtype == torch.float64 and loss.ndim == 0
    assert_close_relative(loss.detach(), expected.detach(), 1e-10)
    assert_close_relative(gradient, expected_gradient, 1e-10)


def test_koleo_guards_duplicates_and_single_samples():
    generator = torch.Generator().manual_seed(5)
    distinct = torch.randn(5, 8, generator=generator, dtype=torch.float64)
    with_duplicates = torch.cat([distinct, distinct[:2], 3 * distinct[:1]]).requires_grad_(True)  # 3 duplicates
    loss = KoLeoLoss()(with_duplicates)
    (gradient,) = torch.autograd.grad(loss, with_duplicates)
    assert torch.isfinite(loss) and torch.isfinite(gradient).all() and gradient.abs().max() < 100
    # DINOv2's value would be dominated by -log(~1e-8) terms; ours: each duplicate's neighbour is the
    # nearest *other* feature, i.e. the same value as for the batch without duplicates, sample by sample
    normalised = F.normalize(distinct, dim=-1)
    distances = torch.cdist(normalised, normalised).fill_diagonal_(math.inf)
    per_sample = -torch.log(distances.min(1).values + 1e-8)
    expected = torch.cat([per_sample, per_sample[:2], per_sample[:1]]).mean()
    torch.testing.assert_close(loss.detach(), expected, rtol=0, atol=1e-6)  # (DINOv2's eps inside the distance)
    assert reference_koleo(with_duplicates.detach()) > loss + 3

    single = torch.randn(1, 8, requires_grad=True)
    assert KoLeoLoss()(single).item() == 0.0
    same = torch.ones(4, 8, requires_grad=True)
    value = KoLeoLoss()(same)
    value.backward()
    assert value.item() == 0.0 and torch.count_nonzero(same.grad) == 0


def test_koleo_runs_in_float32_under_half_precision_inputs():
    """fp16 features with a duplicate: DINOv2's eps underflows there (inf); here the loss is float32."""
    features = torch.randn(6, 32, dtype=torch.float16)
    features = torch.cat([features, features[:1]])
    loss = KoLeoLoss()(features)
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    expected = KoLeoLoss()(features.float())
    assert math.isclose(loss.item(), expected.item(), rel_tol=1e-6)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert KoLeoLoss()(features.float()).dtype == torch.float32


@pytest.mark.parametrize(
    ("expected_text", "call"),
    [
        ("eps", lambda: KoLeoLoss(eps=0)),
        ("eps", lambda: KoLeoLoss(eps=float("nan"))),
        ("duplicate_tolerance", lambda: KoLeoLoss(duplicate_tolerance=-1e-6)),
        ("duplicate_tolerance", lambda: KoLeoLoss(duplicate_tolerance=True)),
        ("features", lambda: KoLeoLoss()(torch.zeros(2, 3, 4))),
        ("features", lambda: KoLeoLoss()(torch.zeros(4, 8, dtype=torch.long))),
    ],
    ids=["eps_zero", "eps_nan", "negative_tolerance", "bool_tolerance", "features_3d", "integer_features"],
)
def test_koleo_bad_input_raises_one_sentence_value_error(expected_text, call):
    with pytest.raises(ValueError, match=expected_text) as error:
        call()
    message = str(error.value)
    assert "\n" not in message and message.endswith(".")

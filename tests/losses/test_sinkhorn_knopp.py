"""``sinkhorn_knopp`` on one process against DINOv2's ``sinkhorn_knopp_teacher`` written out plainly
in float64 (the distributed case is tested through the losses, in test_dino.py and test_ibot.py)."""

from __future__ import annotations

import pytest
import torch
from loss_references import assert_close_relative, random_logits, reference_ibot_sinkhorn_knopp

from dino_hf.losses.sinkhorn_knopp import distributed_world_size, sinkhorn_knopp


@pytest.mark.parametrize("iterations", [1, 3, 10])
@pytest.mark.parametrize(("num_samples", "num_prototypes"), [(1, 4), (12, 10), (7, 64)])
def test_matches_dinov2_reference(num_samples, num_prototypes, iterations):
    generator = torch.Generator().manual_seed(num_samples * 100 + num_prototypes + iterations)
    scaled = random_logits(1, num_samples, num_prototypes, generator)[0]
    assignment = sinkhorn_knopp(scaled, iterations)
    assert assignment.shape == scaled.shape and assignment.dtype == torch.float64
    assert_close_relative(assignment, reference_ibot_sinkhorn_knopp(scaled, 1.0, iterations), 1e-10)
    # every sample's row is a distribution
    torch.testing.assert_close(assignment.sum(-1), torch.ones(num_samples, dtype=torch.float64))
    # an explicit count equal to the rows is the default on one process
    assert torch.equal(sinkhorn_knopp(scaled, iterations, num_samples), assignment)
    assert torch.equal(sinkhorn_knopp(scaled, iterations, torch.tensor(float(num_samples), dtype=torch.float64)),
                       assignment)


def test_converges_to_equipartition_and_does_not_overflow():
    generator = torch.Generator().manual_seed(0)
    num_samples, num_prototypes = 12, 10
    scaled = random_logits(1, num_samples, num_prototypes, generator)[0]
    converged = sinkhorn_knopp(scaled, 500)
    torch.testing.assert_close(
        converged.sum(dim=0), torch.full((num_prototypes,), num_samples / num_prototypes, dtype=torch.float64)
    )
    # logits that exp() alone would overflow (float32: above ~88) stay finite: the shared shift
    sharp = sinkhorn_knopp(100 * scaled.float() / 0.04, 3)
    assert sharp.dtype == torch.float32 and torch.isfinite(sharp).all()
    shifted = sinkhorn_knopp(scaled + 1000, 3)  # the shift cancels: the same assignment
    torch.testing.assert_close(shifted, sinkhorn_knopp(scaled, 3), rtol=1e-12, atol=1e-12)


def test_no_rows_and_no_gradient():
    empty = sinkhorn_knopp(torch.zeros(0, 6), 3)  # a process without masked patches
    assert empty.shape == (0, 6)
    scaled = torch.randn(4, 6, requires_grad=True)
    assert not sinkhorn_knopp(scaled, 3).requires_grad
    assert distributed_world_size() == 1  # no process group here

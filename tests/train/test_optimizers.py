"""dino_hf.train.optimizers: LARS against the official update rule, on-device step skipping, the choice of optimiser."""

from __future__ import annotations

import pytest
import torch

from dino_hf.train.optimizers import LARS, build_optimizer_for_groups


def official_lars_step(parameters, gradients, buffers, lr, weight_decay, momentum=0.9, eta=0.001):
    """facebookresearch/dino utils.LARS.step, one parameter at a time, on plain tensors."""
    results = []
    for parameter, gradient, buffer in zip(parameters, gradients, buffers, strict=True):
        update = gradient
        if parameter.ndim != 1:
            update = update.add(parameter, alpha=weight_decay)
            parameter_norm, update_norm = torch.norm(parameter), torch.norm(update)
            one = torch.ones_like(parameter_norm)
            q = torch.where(parameter_norm > 0.0, torch.where(update_norm > 0, (eta * parameter_norm / update_norm), one), one)
            update = update.mul(q)
        buffer = buffer.mul(momentum).add(update)
        results.append((parameter - lr * buffer, buffer))
    return results


def test_lars_follows_the_official_update_over_steps():
    generator = torch.Generator().manual_seed(0)
    shapes = [(4, 3), (5,), (2, 2, 3)]
    parameters = [torch.nn.Parameter(torch.randn(*shape, generator=generator, dtype=torch.float64)) for shape in shapes]
    optimizer = LARS([{"params": parameters, "weight_decay": 1e-4}], lr=0.3)
    reference = [parameter.detach().clone() for parameter in parameters]
    buffers = [torch.zeros_like(parameter) for parameter in reference]
    for _ in range(3):
        gradients = [torch.randn(*shape, generator=generator, dtype=torch.float64) for shape in shapes]
        for parameter, gradient in zip(parameters, gradients, strict=True):
            parameter.grad = gradient.clone()
        optimizer.step()
        updated = official_lars_step(reference, gradients, buffers, lr=0.3, weight_decay=1e-4)
        reference, buffers = [value for value, _ in updated], [buffer for _, buffer in updated]
        for parameter, expected in zip(parameters, reference, strict=True):
            torch.testing.assert_close(parameter.detach(), expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("name", ["adamw", "lars"])
def test_the_fused_adamw_and_lars_skip_a_step_on_the_device_through_found_inf(name):
    """A non-finite step leaves parameters and optimiser state as they were (found_inf, no host sync)."""
    parameter = torch.nn.Parameter(torch.ones(3, 2))
    optimizer = build_optimizer_for_groups(name, [{"params": [parameter], "weight_decay": 0.0}], torch.device("cpu"))
    for group in optimizer.param_groups:
        group["lr"] = 0.1
    parameter.grad = torch.ones(3, 2)
    optimizer.step()
    after_one = parameter.detach().clone()
    assert not torch.equal(after_one, torch.ones(3, 2))
    parameter.grad = torch.full((3, 2), 5.0)
    optimizer.found_inf = torch.ones(())
    optimizer.step()
    del optimizer.found_inf
    assert torch.equal(parameter.detach(), after_one)


def test_an_unknown_optimiser_is_named_in_one_sentence():
    with pytest.raises(ValueError, match="--optimizer must be one of adamw, sgd, lars"):
        build_optimizer_for_groups("adam", [], torch.device("cpu"))

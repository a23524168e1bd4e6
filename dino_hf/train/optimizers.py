"""The optimisers of DINO training: AdamW (the official ViT recipe), SGD with momentum (the official
ResNet-50 recipe) and LARS (SGD with layer-wise adaptive rate scaling, for large ConvNet batches).

Learning rate and weight decay are set per step by the training step from the schedules (each group's
``lr_scale`` times the scheduled rate). Every optimiser here can skip a step on the device, without a
host sync, when told through ``found_inf`` (the mechanism ``torch.amp.GradScaler`` uses): the fused
AdamW kernel reads it and :class:`LARS` implements it; SGD runs foreach (see below), and the training
step then decides on the host.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor
from torch.utils._foreach_utils import _get_fused_kernels_supported_devices

__all__ = ["LARS", "OPTIMIZER_NAMES", "build_optimizer_for_groups"]

OPTIMIZER_NAMES = ("adamw", "sgd", "lars")
SGD_MOMENTUM = 0.9  # the official main_dino.py SGD and LARS


class LARS(torch.optim.Optimizer):
    """SGD with momentum and layer-wise adaptive rate scaling (You et al. 2017), as the official DINO
    (``utils.LARS``, from Barlow Twins): for every parameter of more than one dimension the update
    ``g + weight_decay * p`` is rescaled by ``eta * ||p|| / ||update||``; biases and norms (1-D) keep a
    plain momentum update without weight decay.

    Args:
        params: parameters or parameter groups.
        lr, weight_decay, momentum, eta: as above (the official defaults: momentum 0.9, eta 0.001).

    Attribute ``found_inf``: set it to a 0-dim float tensor before :meth:`step` to skip the step where
    it is non-zero, decided on the device (momentum buffers and parameters keep their values).
    """

    accepts_found_inf = True

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        lr: float = 0.0,
        weight_decay: float = 0.0,
        momentum: float = SGD_MOMENTUM,
        eta: float = 0.001,
    ) -> None:
        super().__init__(params, {"lr": lr, "weight_decay": weight_decay, "momentum": momentum, "eta": eta})

    @torch.no_grad()
    def step(self, closure: Any = None) -> None:  # type: ignore[override]
        if closure is not None:
            raise ValueError("LARS does not take a closure.")
        found_inf = getattr(self, "found_inf", None)
        for group in self.param_groups:
            for parameter in group["params"]:
                gradient = parameter.grad
                if gradient is None:
                    continue
                update = gradient
                if parameter.ndim != 1:
                    update = gradient.add(parameter, alpha=group["weight_decay"])
                    parameter_norm = torch.linalg.vector_norm(parameter)
                    update_norm = torch.linalg.vector_norm(update)
                    ratio = torch.where(
                        (parameter_norm > 0) & (update_norm > 0),
                        group["eta"] * parameter_norm / update_norm.clamp_min(torch.finfo(update.dtype).tiny),
                        torch.ones_like(parameter_norm),
                    )
                    update = update * ratio
                state = self.state[parameter]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(parameter)
                buffer = state["momentum_buffer"]
                new_buffer = buffer * group["momentum"] + update
                new_parameter = parameter - group["lr"] * new_buffer
                if found_inf is None:
                    buffer.copy_(new_buffer)
                    parameter.copy_(new_parameter)
                else:  # keep everything on a skipped step, without reading found_inf on the host
                    keep = found_inf.to(parameter.device) > 0
                    buffer.copy_(torch.where(keep, buffer, new_buffer))
                    parameter.copy_(torch.where(keep, parameter, new_parameter))


def build_optimizer_for_groups(name: str, groups: list[dict[str, Any]], device: torch.device) -> torch.optim.Optimizer:
    """``adamw``, ``sgd`` or ``lars`` over ``groups`` (learning rate and weight decay set each step).

    AdamW is fused where torch has fused kernels for ``device`` (so that a non-finite step can be
    skipped on the device through ``found_inf``), foreach elsewhere; SGD is foreach.
    """
    if name not in OPTIMIZER_NAMES:
        raise ValueError(f"--optimizer must be one of {', '.join(OPTIMIZER_NAMES)}, not {name!r}.")
    fused = device.type in _get_fused_kernels_supported_devices()
    if name == "adamw":
        return torch.optim.AdamW(groups, lr=0.0, betas=(0.9, 0.999), fused=fused, foreach=None if fused else True)
    if name == "sgd":
        # foreach, not fused: torch's fused SGD fails once a parameter starts receiving gradients after
        # the first step (the frozen last layer, a head warm-up); a skipped step then costs a host sync.
        return torch.optim.SGD(groups, lr=0.0, momentum=SGD_MOMENTUM, foreach=True)
    return LARS(groups)

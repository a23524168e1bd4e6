"""The argument and tensor checks of the losses, written once.

Every check raises a one-sentence ``ValueError`` that names the argument, what it must be and what it
got, before any computation: a bad setting fails when the loss is built, a bad tensor before it
reaches an all-reduce. :data:`CENTERING_METHODS` is the one list of teacher centerings, for the
losses and for the model config and the training arguments that choose one.
"""

from __future__ import annotations

import math
import numbers

from torch import Tensor

from dino_hf.base.official_recipe import DEFAULT_TEACHER_CENTERING

#: How a teacher (DINO's and iBOT's alike) avoids collapse: ``"centering"`` (DINO: subtract an EMA
#: centre, then sharpen) or ``"sinkhorn_knopp"`` (DINOv2: :func:`dino_hf.losses.sinkhorn_knopp.sinkhorn_knopp`).
CENTERING_METHODS = (DEFAULT_TEACHER_CENTERING, "sinkhorn_knopp")


def is_real(value: object) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def is_positive_integer(value: object) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool) and value >= 1


def check_positive_integer(name: str, value: object) -> None:
    if not is_positive_integer(value):
        raise ValueError(f"{name} must be a positive integer, got {value!r}.")


def check_positive_number(name: str, value: object) -> None:
    if not is_real(value) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a positive finite number, got {value!r}.")


def check_fraction(name: str, value: object) -> None:
    """``value`` must be a number in [0, 1] (a momentum)."""
    if not is_real(value) or not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} must be a number in [0, 1], got {value!r}.")


def check_centering(centering: object, name: str = "centering") -> None:
    """``centering`` must be one of :data:`CENTERING_METHODS`."""
    if centering not in CENTERING_METHODS:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, CENTERING_METHODS))}, got {centering!r}.")


def check_loss_settings(
    num_prototypes: object,
    student_temperature: object,
    center_momentum: object,
    centering: object,
    sinkhorn_iterations: object,
) -> None:
    """The settings :class:`~dino_hf.losses.dino.DinoLoss` and :class:`~dino_hf.losses.ibot.IBOTPatchLoss`
    share (one rule for both heads, and for the ``DinoConfig`` fields and training flags that set
    them), checked in this order."""
    check_positive_integer("num_prototypes", num_prototypes)
    check_positive_number("student_temperature", student_temperature)
    check_fraction("center_momentum", center_momentum)
    check_centering(centering)
    check_positive_integer("sinkhorn_iterations", sinkhorn_iterations)


def check_temperature(teacher_temperature: float | Tensor) -> float | Tensor:
    """Validate ``tau_t``; a CPU tensor is checked, an accelerator tensor is not (no host sync)."""
    if isinstance(teacher_temperature, Tensor):
        if teacher_temperature.ndim != 0 or not teacher_temperature.is_floating_point():
            raise ValueError(
                "teacher_temperature must be a positive number or a 0-dim floating-point tensor, "
                f"got a {teacher_temperature.dtype} tensor of shape {tuple(teacher_temperature.shape)}."
            )
        if teacher_temperature.device.type == "cpu":
            check_positive_number("teacher_temperature", teacher_temperature.item())
        return teacher_temperature
    check_positive_number("teacher_temperature", teacher_temperature)
    return float(teacher_temperature)


def check_logits_tensor(name: str, logits: object, num_prototypes: int) -> None:
    """``logits`` must be a floating-point ``(crops >= 1, batch >= 1, num_prototypes)`` tensor."""
    expected = f"(num_crops, batch_size, {num_prototypes})"
    if not isinstance(logits, Tensor) or logits.ndim != 3 or logits.shape[-1] != num_prototypes:
        got = tuple(logits.shape) if isinstance(logits, Tensor) else type(logits).__name__
        raise ValueError(f"{name} must be a tensor of shape {expected}, got {got}.")
    if logits.shape[0] < 1 or logits.shape[1] < 1:
        raise ValueError(
            f"{name} must have at least one crop and one sample, got shape {tuple(logits.shape)}."
        )
    if not logits.is_floating_point():
        raise ValueError(f"{name} must be a floating-point tensor, got {logits.dtype}.")


def check_multi_crop_logits(
    student_logits: Tensor, teacher_logits: Tensor, num_prototypes: int, teacher_name: str = "teacher_logits"
) -> None:
    """``(S, B, K)`` student and ``(G, B, K)`` teacher tensors that form a multi-crop batch: the same
    ``B``, ``S >= 2`` and ``G <= S``."""
    check_logits_tensor("student_logits", student_logits, num_prototypes)
    check_logits_tensor(teacher_name, teacher_logits, num_prototypes)
    num_crops, batch_size, _ = student_logits.shape
    num_global_crops, teacher_batch_size, _ = teacher_logits.shape
    if teacher_batch_size != batch_size:
        raise ValueError(
            f"{teacher_name} must have the batch size of student_logits ({batch_size}) in "
            f"dimension 1, got {teacher_batch_size}."
        )
    if num_crops < 2:
        raise ValueError(
            "student_logits must hold at least 2 crops in total (dimension 0 >= 2), "
            f"got {num_crops}."
        )
    if num_global_crops > num_crops:
        raise ValueError(
            f"{teacher_name} must not hold more crops than student_logits ({num_crops}) in "
            f"dimension 0, got {num_global_crops}."
        )

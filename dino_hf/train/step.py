"""One DINO optimiser step: micro-step forward/backward with gradient accumulation, gradient clipping,
AdamW, the teacher EMA and the center updates (DINO's, and the iBOT teacher's with DINOv2's
objective), all without reading anything back to the host.

Non-finite steps are skipped on the device, without a host sync: the step's gradient norm (taken
after the gradients were all-reduced, so identical on every process) decides; a non-finite loss is
made to poison the gradients so that it always shows in that norm. The fused AdamW kernel skips its
update when told through `found_inf` (the mechanism `GradScaler` uses), the center update is undone
by the loss (``update_center(..., apply=finite)``), and the teacher EMA momentum becomes 1.

With a frozen distillation teacher (:class:`~dino_hf.models.distillation.FrozenTeacher`) the step first runs
it on the global crops, under the run's autocast and without gradients, and hands its targets to the model;
the time it took is summed (:meth:`DinoTrainStep.take_teacher_seconds`: on a GPU through CUDA events, read
when the loop logs, so that no step waits for the device), for the teacher's share of the step.

Under FSDP the gradients are shards (``DTensor``): the per-parameter norms are then those of the whole
parameters (the shards' squared norms summed over the processes in one all-reduce) and the clipping
scales each process's shard by them, so that clipping and skipping decide as without sharding.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from accelerate import Accelerator
from torch import Tensor
from torch.distributed.tensor import DTensor

from dino_hf.models.distillation import DistillationTargets, FrozenTeacher
from dino_hf.models.modeling_dino import DinoForPreTraining
from dino_hf.train.schedules import ScheduleValues

__all__ = ["DinoTrainStep", "StepStatistics"]


#: DINOv2's per-micro-step outputs averaged into ``StepStatistics.loss_statistics`` (those the model gives:
#: ``None`` where the objective has no such term).
DINOV2_OUTPUTS = ("dino_loss", "ibot_loss", "koleo_loss", "ibot_teacher_entropy", "ibot_teacher_mean_entropy",
                  "distillation_loss")


@dataclass
class StepStatistics:
    """Device tensors (0-dim) of one optimiser step; nothing here has been read by the host.

    ``loss_statistics`` holds the means of every statistic the DINO loss reports
    (:data:`dino_hf.losses.dino.LOSS_STATISTICS`) and, with DINOv2's terms, of :data:`DINOV2_OUTPUTS` that the
    model gives.
    """

    loss: Tensor  # mean over micro-steps of this process's loss (the whole objective)
    grad_norm: Tensor  # global L2 norm of the (all-reduced, unscaled) gradients before clipping
    finite: Tensor  # bool: the step was applied (identical on every process)
    loss_statistics: dict[str, Tensor] = field(default_factory=dict)


class DinoTrainStep:
    """Runs optimiser steps: micro-step forward/backward, clipping, AdamW, EMA and center update.

    Args:
        accelerator: the run's `Accelerator`.
        model: the prepared (possibly DDP-wrapped) `DinoForPreTraining`.
        optimizer: the prepared optimiser (`dino_hf.train.optimizers`: fused AdamW or SGD where the device
            supports it, or LARS), whose groups carry ``lr_scale`` and ``apply_weight_decay``.
        gradient_accumulation_steps: micro-steps per optimiser step.
        max_grad_norm: clipping threshold (0 disables clipping).
        clip_mode: ``"per_parameter"`` (official) or ``"global"``.
        distillation_teacher: the frozen teacher of a distilling model (on the training device), else ``None``.
    """

    def __init__(self, accelerator: Accelerator, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                 gradient_accumulation_steps: int = 1, max_grad_norm: float = 3.0,
                 clip_mode: str = "per_parameter", distillation_teacher: FrozenTeacher | None = None) -> None:
        self.accelerator = accelerator
        self.distillation_teacher = distillation_teacher
        self._teacher_seconds = 0.0  # host-timed frozen-teacher forwards (CPU) since the last take
        self._teacher_events: list[tuple[torch.cuda.Event, torch.cuda.Event]] = []  # the same on a GPU
        self.model = model
        self.optimizer = optimizer
        self.unwrapped: DinoForPreTraining = accelerator.unwrap_model(model)
        self.gradient_accumulation_steps = gradient_accumulation_steps
        self.max_grad_norm = max_grad_norm
        self.clip_mode = clip_mode
        self.parameters = [p for group in optimizer.param_groups for p in group["params"]]
        inner = getattr(optimizer, "optimizer", optimizer)
        self._inner_optimizer = inner
        # fused kernels (and LARS) read found_inf: a non-finite step is skipped without a host sync
        self._skips_on_device = bool(inner.defaults.get("fused")) or getattr(inner, "accepts_found_inf", False)
        self._uses_scaler = getattr(accelerator, "scaler", None) is not None

    def __call__(
        self,
        next_batch: Callable[[], dict[str, Tensor | None]],
        values: ScheduleValues,
        full_backward: bool = False,
    ) -> StepStatistics:
        """One optimiser step with the schedule ``values`` (a `ScheduleValues`).

        During a head warm-up (``values.freeze_backbone``) the student's backbone runs without
        gradients; ``full_backward`` computes them anyway (and drops them), so that a time budget's
        calibration measures what an unfrozen step costs.
        """
        no_backbone_gradients = values.freeze_backbone and not full_backward
        sums, center_sums = self._accumulate_gradients(next_batch, values.teacher_temperature, no_backbone_gradients)
        scale = 1.0 / self.gradient_accumulation_steps
        grad_norm, finite = self._prepare_gradients(values.freeze_last_layer, values.freeze_backbone)
        self._optimizer_step(values, finite)
        self._update_teacher(values.teacher_momentum, finite)
        self._update_centers(center_sums, scale, finite)
        loss = sums.pop("loss")
        return StepStatistics(loss=loss * scale, grad_norm=grad_norm, finite=finite,
                              loss_statistics={key: value * scale for key, value in sums.items()})

    def _accumulate_gradients(self, next_batch: Callable[[], dict[str, Tensor | None]], teacher_temperature: float,
                              freeze_backbone: bool) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        """Forward/backward of every micro-step; gradients are all-reduced on the last one only.

        Returns:
            (sums over micro-steps of the loss, of the loss statistics and of the :data:`DINOV2_OUTPUTS`
            the model gives; sums of what the centers consume: ``teacher_logits_mean`` and, with iBOT,
            the patch logits' sum and count).
        """
        device = self.accelerator.device
        sums: dict[str, Tensor] = {}
        center_sums: dict[str, Tensor] = {}
        for index in range(self.gradient_accumulation_steps):
            batch = next_batch()
            global_crops = batch["global_crops"].to(device, non_blocking=True)
            local_crops = batch.get("local_crops")
            if local_crops is not None:
                local_crops = local_crops.to(device, non_blocking=True)
            last = index == self.gradient_accumulation_steps - 1
            targets = self._teacher_targets(global_crops)
            with contextlib.nullcontext() if last else self.accelerator.no_sync(self.model):
                # the masks stay on the CPU: the model finds the masked rows there, without a device sync
                output = self.model(global_crops, local_crops, teacher_temperature=teacher_temperature,
                                    update_center=False, freeze_backbone=freeze_backbone, masks=batch.get("masks"),
                                    **({} if targets is None else {"distillation_targets": targets}))
                loss = output.loss
                # A non-finite loss must show in the all-reduced gradient norm on every process, even
                # when its gradient happens to be finite: scale the backward pass by NaN (else by 1).
                poison = torch.where(torch.isfinite(loss.detach()), 1.0, float("nan"))
                self.accelerator.backward(loss * poison / self.gradient_accumulation_steps)
            values = {"loss": loss, **(output.loss_statistics or {}),
                      **{key: getattr(output, key) for key in DINOV2_OUTPUTS},
                      **{f"distillation_{name}_loss": value for name, value in (output.distillation_terms or {}).items()}}
            for key, value in values.items():
                if value is not None:
                    value = value.detach().float()
                    sums[key] = value if key not in sums else sums[key] + value
            for key in ("teacher_logits_mean", "ibot_teacher_logits_sum", "ibot_num_masked_patches"):
                value = getattr(output, key)
                if value is not None:
                    value = value.detach().float()
                    center_sums[key] = value if key not in center_sums else center_sums[key] + value
        return sums, center_sums

    def _teacher_targets(self, global_crops: Tensor) -> DistillationTargets | None:
        """The frozen teacher's targets for ``(G, B, 3, H, W)`` global crops (``None`` without a teacher), timed."""
        if self.distillation_teacher is None:
            return None
        on_gpu = global_crops.device.type == "cuda"
        if on_gpu:
            events = (torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
            events[0].record()
        started = time.perf_counter()
        with torch.no_grad(), self.accelerator.autocast():
            targets = self.distillation_teacher(global_crops.flatten(0, 1))
        if on_gpu:
            events[1].record()
            self._teacher_events.append(events)
        else:
            self._teacher_seconds += time.perf_counter() - started
        return targets

    def take_teacher_seconds(self) -> float:
        """Seconds the frozen teacher's forward passes took since the last call (0 without a teacher). On a GPU
        this waits for the recorded events: call it where the loop reads the device anyway (logging)."""
        seconds = self._teacher_seconds
        for start, end in self._teacher_events:
            end.synchronize()
            seconds += start.elapsed_time(end) / 1000.0
        self._teacher_seconds, self._teacher_events = 0.0, []
        return seconds

    def _prepare_gradients(self, freeze_last_layer: bool, freeze_backbone: bool = False) -> tuple[Tensor, Tensor]:
        """Unscale (fp16), drop frozen last-layer (and backbone) gradients, measure and clip; no host sync.

        Returns:
            (global gradient norm before clipping, bool "all gradients finite").
        """
        if self._uses_scaler:
            self.accelerator.unscale_gradients(self.optimizer)
        if freeze_last_layer:
            self.unwrapped.cancel_last_layer_gradients()
        if freeze_backbone:
            for parameter in self.unwrapped.backbone_parameters():
                parameter.grad = None
        gradients = [p.grad for p in self.parameters if p.grad is not None]
        if not gradients:
            zero = torch.zeros((), device=self.accelerator.device)
            return zero, torch.ones((), dtype=torch.bool, device=zero.device)
        gradients, norms = _local_gradients_and_norms(gradients)
        grad_norm = torch.linalg.vector_norm(torch.stack(norms).float())
        if self.max_grad_norm > 0:
            if self.clip_mode == "per_parameter":
                # Official DINO: each parameter's gradient clipped to max_grad_norm separately.
                coefficients = torch._foreach_add(norms, 1e-6)
                torch._foreach_reciprocal_(coefficients)
                torch._foreach_mul_(coefficients, self.max_grad_norm)
                torch._foreach_clamp_max_(coefficients, 1.0)
                torch._foreach_mul_(gradients, coefficients)
            else:
                coefficient = torch.clamp(self.max_grad_norm / (grad_norm + 1e-6), max=1.0)
                torch._foreach_mul_(gradients, coefficient.to(gradients[0].dtype))
        return grad_norm, torch.isfinite(grad_norm)

    def _optimizer_step(self, values: ScheduleValues, finite: Tensor) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = values.learning_rate * group.get("lr_scale", 1.0)
            group["weight_decay"] = values.weight_decay if group.get("apply_weight_decay", True) else 0.0
        if self._uses_scaler:
            # GradScaler hands its own found_inf (from the unscale above) to the fused kernel.
            self.optimizer.step()
        elif self._skips_on_device:
            self._inner_optimizer.found_inf = (~finite).float()
            self.optimizer.step()
            del self._inner_optimizer.found_inf
        elif bool(finite):  # non-fused optimiser (unusual device): one host sync per step
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def _update_teacher(self, momentum: float, finite: Tensor) -> None:
        """EMA of the student into the teacher; momentum 1 (no change) on a skipped step."""
        if finite.device.type == "cpu":
            if bool(finite):  # reading a CPU tensor is not a device synchronisation
                self.unwrapped.update_teacher(momentum)
        else:
            self.unwrapped.update_teacher(torch.where(finite, momentum, 1.0))

    @torch.no_grad()
    def _update_centers(self, center_sums: dict[str, Tensor], scale: float, finite: Tensor) -> None:
        """Center EMAs (all-reduced by the losses), kept on a skipped step: DINO's from the mean over
        micro-steps of the batch-mean teacher logit, iBOT's from the sum and count of its patch logits; none
        without DINO's own term (pure distillation)."""
        if "teacher_logits_mean" not in center_sums:
            return
        self.unwrapped.loss_fn.update_center(center_sums["teacher_logits_mean"] * scale, apply=finite)
        ibot_loss_fn = self.unwrapped.ibot_loss_fn
        if ibot_loss_fn is not None:
            if "ibot_teacher_logits_sum" in center_sums:
                ibot_loss_fn.update_center(center_sums["ibot_teacher_logits_sum"],
                                           center_sums["ibot_num_masked_patches"], apply=finite)
            else:  # no masks this step, on this process: it still joins the other processes' all-reduce
                zeros = torch.zeros(1, ibot_loss_fn.num_prototypes, device=self.accelerator.device)
                ibot_loss_fn.update_center(zeros, zeros.new_zeros(()), apply=finite)


def _local_gradients_and_norms(gradients: list[Tensor]) -> tuple[list[Tensor], list[Tensor]]:
    """The gradients as plain tensors and each parameter's gradient norm.

    Without sharding these are the gradients themselves. Under FSDP (``DTensor`` shards of each
    parameter over the processes) they are this process's shards, and the norms those of the whole
    gradients: the shards' squared norms summed over the processes, in one all-reduce.
    """
    if not isinstance(gradients[0], DTensor):
        return gradients, list(torch._foreach_norm(gradients))
    local = [gradient.to_local() for gradient in gradients]
    squares = torch.stack(torch._foreach_norm(local)).float().square()
    dist.all_reduce(squares, group=gradients[0].device_mesh.get_group())
    return local, list(squares.sqrt().unbind())

"""What a run measures and reports: step statistics summed on the device, ``metrics.jsonl`` and the
trackers, throughput, and the collapse monitors.

`MetricsAccumulator.flush` at a logging step is the one place the loop reads values back from the
device; everything between logging steps stays there.
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator

from .data import BatchStream
from .train_step import StepStatistics

__all__ = ["BASE_METRIC_KEYS", "CollapseMonitor", "MetricsAccumulator", "MetricsLog", "ThroughputWindow", "metric_keys"]


#: The step statistics of every run (``loss`` is the whole objective).
BASE_METRIC_KEYS = ("loss", "teacher_entropy", "teacher_mean_entropy", "grad_norm")


def metric_keys(ibot: bool = False, koleo: bool = False) -> tuple[str, ...]:
    """The step statistics a run logs: :data:`BASE_METRIC_KEYS`, plus with DINOv2's terms each loss term
    (``dino_loss``, ``ibot_loss``, ``koleo_loss``) and the iBOT teacher's entropies."""
    keys = BASE_METRIC_KEYS
    if ibot or koleo:
        keys += ("dino_loss",)
    if ibot:
        keys += ("ibot_loss", "ibot_teacher_entropy", "ibot_teacher_mean_entropy")
    if koleo:
        keys += ("koleo_loss",)
    return keys


class MetricsAccumulator:
    """Sums step statistics on the device between logging steps; `flush` is the one host sync.

    Also tracks, on the device, the current and longest runs of consecutive skipped steps.

    Args:
        device: where the sums live.
        keys: the `StepStatistics` fields to average (:func:`metric_keys`).
    """

    def __init__(self, device: torch.device, keys: tuple[str, ...] = BASE_METRIC_KEYS) -> None:
        self.device = device
        self.keys = tuple(keys)
        self.current_run = torch.zeros((), dtype=torch.long, device=device)
        self._reset()

    def _reset(self) -> None:
        self.sums = torch.zeros(len(self.keys), device=self.device)
        self.finite_steps = torch.zeros((), device=self.device)
        self.steps = 0
        self.longest_run = self.current_run.clone()

    def add(self, statistics: StepStatistics) -> None:
        values = torch.stack([getattr(statistics, key).float() for key in self.keys])
        finite = statistics.finite
        self.sums += torch.where(finite & torch.isfinite(values), values, torch.zeros_like(values))
        self.finite_steps += finite.float()
        self.steps += 1
        self.current_run = torch.where(finite, torch.zeros_like(self.current_run), self.current_run + 1)
        self.longest_run = torch.maximum(self.longest_run, self.current_run)

    def flush(self, accelerator: Accelerator) -> dict[str, float]:
        """Means since the last flush over steps and processes; resets the sums."""
        packed = torch.cat([self.sums, self.finite_steps.reshape(1)])
        packed = accelerator.reduce(packed, reduction="sum") if accelerator.num_processes > 1 else packed
        values = packed.tolist()
        processes = accelerator.num_processes
        finite_steps = values[-1] / processes
        row: dict[str, float] = {}
        for index, key in enumerate(self.keys):
            row[key] = values[index] / max(values[-1], 1.0) if finite_steps > 0 else float("nan")
        row["nonfinite_steps"] = round(self.steps - finite_steps)
        row["longest_nonfinite_run"] = int(self.longest_run.item())
        self._reset()
        return row

    def state_dict(self) -> dict[str, Any]:
        """The sums since the last logging step (so that a resumed run logs the same rows)."""
        return {"sums": self.sums.cpu(), "finite_steps": self.finite_steps.cpu(), "steps": self.steps,
                "current_run": self.current_run.cpu(), "longest_run": self.longest_run.cpu()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state["sums"].numel() != len(self.keys):
            raise ValueError(
                "The checkpoint was written with other loss terms (--ibot_loss_weight / --koleo_loss_weight): resume "
                "with the settings it was trained with."
            )
        self.sums = state["sums"].to(self.device)
        self.finite_steps = state["finite_steps"].to(self.device)
        self.steps = int(state["steps"])
        self.current_run = state["current_run"].to(self.device)
        self.longest_run = state["longest_run"].to(self.device)

    def nonfinite_run_lengths(self) -> tuple[int, int]:
        """(current run, longest run since last flush) of skipped steps; a host sync."""
        return int(self.current_run.item()), int(self.longest_run.item())


class MetricsLog:
    """``output_dir/metrics.jsonl`` (main process) plus the accelerate trackers."""

    def __init__(self, path: Path, accelerator: Accelerator, resume_step: int | None) -> None:
        self.path = path
        self.accelerator = accelerator
        if accelerator.is_main_process:
            self._truncate(resume_step)

    def _truncate(self, resume_step: int | None) -> None:
        """Fresh run: empty the file. Resumed run: drop rows after the checkpoint's step."""
        kept: list[str] = []
        if resume_step is not None and self.path.is_file():
            for line in self.path.read_text(encoding="utf-8").splitlines():
                with contextlib.suppress(json.JSONDecodeError, TypeError):
                    if json.loads(line).get("step", math.inf) <= resume_step:
                        kept.append(line)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.write_text("".join(line + "\n" for line in kept), encoding="utf-8")

    def write(self, row: dict[str, Any]) -> None:
        """Append ``row`` (non-finite numbers become null, so that every line is strict JSON)."""
        row = {key: None if isinstance(value, float) and not math.isfinite(value) else value
               for key, value in row.items()}
        if self.accelerator.is_main_process:
            with self.path.open("a", encoding="utf-8") as handle:
                handle.write(json.dumps(row, allow_nan=False) + "\n")
        numbers = {key: value for key, value in row.items()
                   if isinstance(value, (int, float)) and not isinstance(value, bool) and key != "step"}
        if self.accelerator.trackers:
            self.accelerator.log(numbers, step=int(row["step"]))


class CollapseMonitor:
    """Warns once per episode when the logged statistics show a collapse for ``patience_steps``.

    Uniform collapse: the teacher's per-sample entropy stays near ln(K) (so does the loss).
    One-hot collapse: the entropy of the batch-mean teacher distribution stays near 0 (every image
    goes to the same prototype). With ``ibot_num_prototypes`` the iBOT teacher's masked-patch
    distributions are watched the same way (``ibot_teacher_entropy``, ``ibot_teacher_mean_entropy``).
    """

    def __init__(self, num_prototypes: int, patience_steps: int, ibot_num_prototypes: int | None = None) -> None:
        self.log_k = math.log(num_prototypes)
        self.ibot_log_k = math.log(ibot_num_prototypes) if ibot_num_prototypes else None
        self.patience_steps = patience_steps
        self._since: dict[str, int] = {}
        self._warned: set[str] = set()

    def update(self, step: int, row: dict[str, float]) -> str | None:
        """Return a warning sentence when a collapse has lasted ``patience_steps``, else None."""
        conditions = {
            "uniform": row.get("teacher_entropy", 0.0) > 0.9 * self.log_k,
            "one-hot": row.get("teacher_mean_entropy", math.inf) < 0.1,
        }
        if self.ibot_log_k is not None:
            conditions["uniform, iBOT head"] = (row.get("ibot_teacher_entropy") or 0.0) > 0.9 * self.ibot_log_k
            ibot_mean_entropy = row.get("ibot_teacher_mean_entropy")
            conditions["one-hot, iBOT head"] = ibot_mean_entropy is not None and ibot_mean_entropy < 0.1
        message = None
        for kind, holds in conditions.items():
            if not holds:
                self._since.pop(kind, None)
                self._warned.discard(kind)
                continue
            start = self._since.setdefault(kind, step)
            if step - start >= self.patience_steps and kind not in self._warned:
                self._warned.add(kind)
                message = self._message(kind, step - start, row)
        return message

    def _message(self, kind: str, steps: int, row: dict[str, float]) -> str:
        if kind == "uniform":
            detail = (f"the teacher entropy has stayed at {row['teacher_entropy']:.2f} nats, near ln(K) = "
                      f"{self.log_k:.2f}, and the loss at {row.get('loss', float('nan')):.2f}")
        elif kind == "uniform, iBOT head":
            detail = (f"the iBOT teacher's patch entropy has stayed at {row['ibot_teacher_entropy']:.2f} nats, near "
                      f"ln(K) = {self.ibot_log_k:.2f}")
        elif kind == "one-hot, iBOT head":
            detail = (f"the entropy of the iBOT teacher's mean patch distribution has stayed at "
                      f"{row['ibot_teacher_mean_entropy']:.3f} nats (every masked patch goes to the same prototype)")
        else:
            detail = (f"the entropy of the mean teacher distribution has stayed at {row['teacher_mean_entropy']:.3f} "
                      "nats (every image goes to the same prototype)")
        return (f"Training looks collapsed ({kind}) for {steps} steps: {detail}. Usual remedies: a lower "
                "--teacher_temperature / --warmup_teacher_temperature, fewer prototypes "
                "(--config_overrides num_prototypes=4096), a lower --teacher_momentum, or checking the augmentations.")


class ThroughputWindow:
    """Images per second and the fraction of time spent waiting for data since the last call."""

    def __init__(self, stream: BatchStream, images_per_micro_batch: int) -> None:
        self.stream = stream
        self.images_per_micro_batch = images_per_micro_batch
        self._reset()

    def _reset(self) -> None:
        self.started, self.wait, self.batches = time.perf_counter(), self.stream.wait_seconds, self.stream.micro_batches

    def measure(self) -> dict[str, float]:
        seconds = max(time.perf_counter() - self.started, 1e-9)
        values = {
            "images_per_second": (self.stream.micro_batches - self.batches) * self.images_per_micro_batch / seconds,
            "data_wait_fraction": (self.stream.wait_seconds - self.wait) / seconds,
        }
        self._reset()
        return values

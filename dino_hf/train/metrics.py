"""What a run measures and reports: step statistics summed on the device, ``metrics.jsonl`` and the
trackers, throughput, and the collapse monitors.

`MetricsAccumulator.flush` at a logging step is the one place the loop reads values back from the
device; everything between logging steps stays there.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator

from dino_hf.base.errors import RunError, describe_os_error
from dino_hf.base.official_recipe import (
    OFFICIAL_CENTER_MOMENTUM,
    OFFICIAL_LEARNING_RATE,
    OFFICIAL_MAX_GRAD_NORM,
    OFFICIAL_STUDENT_TEMPERATURE,
    OFFICIAL_TEACHER_MOMENTUM,
    OFFICIAL_TEACHER_TEMPERATURE,
)
from dino_hf.data.loader import BatchStream
from dino_hf.losses.dino import LOSS_STATISTICS
from dino_hf.train.step import StepStatistics

__all__ = ["BASE_METRIC_KEYS", "CollapseMonitor", "GradientSpikeMonitor", "MetricsAccumulator", "MetricsLog",
           "ThroughputWindow", "metric_keys"]


#: The step statistics of every run: the loss (the whole objective), the gradient norm and every
#: statistic the DINO loss reports (:data:`dino_hf.losses.dino.LOSS_STATISTICS`).
BASE_METRIC_KEYS = ("loss", "grad_norm", *LOSS_STATISTICS)


def metric_keys(ibot: bool = False, koleo: bool = False, distillation_terms: tuple[str, ...] = (),
                dino: bool = True) -> tuple[str, ...]:
    """The step statistics a run logs: :data:`BASE_METRIC_KEYS` (without DINO's teacher and student
    statistics when its term is off, ``dino`` false), plus each loss term when there are several
    (``dino_loss``, ``ibot_loss``, ``koleo_loss``), the iBOT teacher's entropies, and with a distillation
    teacher ``distillation_loss`` and each of its ``distillation_terms`` (``distillation_cosine_loss``...)."""
    keys = BASE_METRIC_KEYS if dino else ("loss", "grad_norm")
    if dino and (ibot or koleo or distillation_terms):
        keys += ("dino_loss",)
    if ibot:
        keys += ("ibot_loss", "ibot_teacher_entropy", "ibot_teacher_mean_entropy")
    if koleo:
        keys += ("koleo_loss",)
    if distillation_terms:
        keys += ("distillation_loss", *(f"distillation_{term}_loss" for term in distillation_terms))
    return keys


class MetricsAccumulator:
    """Sums step statistics on the device between logging steps; `flush` is the one host sync.

    Averages ``keys``; keeps the largest gradient norm of the window (``grad_norm_max``: a spike
    averaged over a logging window would hide); tracks the current and longest runs of consecutive
    skipped steps.

    Args:
        device: where the sums live.
        keys: what to average (:func:`metric_keys`): ``loss`` and ``grad_norm`` are `StepStatistics`
            fields, the others entries of its ``loss_statistics``. Each key is averaged over the
            applied steps that gave it a finite value (e.g. the iBOT teacher's entropies skip a step
            without masked patches), so an absent value neither counts nor lowers the mean.
    """

    def __init__(self, device: torch.device, keys: tuple[str, ...] = BASE_METRIC_KEYS) -> None:
        self.device = device
        self.keys = tuple(keys)
        self.current_run = torch.zeros((), dtype=torch.long, device=device)
        self._reset()

    def _reset(self) -> None:
        self.sums = torch.zeros(len(self.keys), device=self.device)
        self.counts = torch.zeros(len(self.keys), device=self.device)  # steps that gave each key a value
        self.finite_steps = torch.zeros((), device=self.device)
        self.grad_norm_max = torch.zeros((), device=self.device)
        self.steps = 0
        self.longest_run = self.current_run.clone()

    def add(self, statistics: StepStatistics) -> None:
        nan = torch.full((), float("nan"), device=self.device)
        values = torch.stack([
            (getattr(statistics, key) if key in ("loss", "grad_norm") else statistics.loss_statistics.get(key, nan)).float()
            for key in self.keys
        ])
        finite = statistics.finite
        valid = finite & torch.isfinite(values)
        self.sums += torch.where(valid, values, torch.zeros_like(values))
        self.counts += valid.float()
        self.finite_steps += finite.float()
        grad_norm = statistics.grad_norm.float()
        self.grad_norm_max = torch.maximum(self.grad_norm_max, torch.where(finite, grad_norm, torch.zeros_like(grad_norm)))
        self.steps += 1
        self.current_run = torch.where(finite, torch.zeros_like(self.current_run), self.current_run + 1)
        self.longest_run = torch.maximum(self.longest_run, self.current_run)

    def flush(self, accelerator: Accelerator) -> dict[str, float]:
        """Means since the last flush over steps and processes; resets the sums."""
        packed = torch.cat([self.sums, self.counts, self.grad_norm_max.reshape(1), self.finite_steps.reshape(1)])
        packed = accelerator.reduce(packed, reduction="sum") if accelerator.num_processes > 1 else packed
        values = packed.tolist()
        processes = accelerator.num_processes
        finite_steps = values[-1] / processes
        num_keys = len(self.keys)
        row: dict[str, float] = {}
        for index, key in enumerate(self.keys):
            count = values[num_keys + index]
            row[key] = values[index] / count if count > 0 else float("nan")
        # the gradient norm is taken after the all-reduce, so every process holds the same maximum
        row["grad_norm_max"] = values[-2] / processes if finite_steps > 0 else float("nan")
        row["nonfinite_steps"] = round(self.steps - finite_steps)
        row["longest_nonfinite_run"] = int(self.longest_run.item())
        self._reset()
        return row

    def state_dict(self) -> dict[str, Any]:
        """The sums since the last logging step (so that a resumed run logs the same rows)."""
        return {"keys": list(self.keys), "sums": self.sums.cpu(), "counts": self.counts.cpu(),
                "finite_steps": self.finite_steps.cpu(), "steps": self.steps, "grad_norm_max": self.grad_norm_max.cpu(),
                "current_run": self.current_run.cpu(), "longest_run": self.longest_run.cpu()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        saved_keys = tuple(state.get("keys", BASE_METRIC_KEYS[: state["sums"].numel()]))
        if saved_keys != self.keys:
            # other statistics than this run logs (a checkpoint from before the loss reported its
            # present ones, or a resume that changed the loss terms): the window it was in starts again
            # from zero rather than putting sums in the wrong columns (its first row averages fewer steps)
            return
        self.sums = state["sums"].to(self.device)
        # (a checkpoint without counts: every applied step gave every key a value)
        self.counts = state.get("counts", state["finite_steps"].expand(len(self.keys))).clone().to(self.device)
        self.grad_norm_max = state.get("grad_norm_max", torch.zeros(())).to(self.device)
        self.finite_steps = state["finite_steps"].to(self.device)
        self.steps = int(state["steps"])
        self.current_run = state["current_run"].to(self.device)
        self.longest_run = state["longest_run"].to(self.device)

    def nonfinite_run_lengths(self) -> tuple[int, int]:
        """(current run, longest run since last flush) of skipped steps; a host sync."""
        return int(self.current_run.item()), int(self.longest_run.item())


class MetricsLog:
    """``output_dir/metrics.jsonl`` (main process) plus the accelerate trackers.

    Nothing is removed from the file until `start` is called, which the trainer does once the
    checkpoint it resumes from has loaded: a resume that fails leaves every row in place.
    """

    def __init__(self, path: Path, accelerator: Accelerator) -> None:
        self.path = path
        self.accelerator = accelerator

    def start(self, resume_step: int | None) -> None:
        """Fresh run: empty the file. Resumed run: drop the rows after the checkpoint's step (logged
        by the run that was stopped after it). The file is replaced atomically."""
        if not self.accelerator.is_main_process:
            return
        kept: list[str] = []
        if resume_step is not None and self.path.is_file():
            for line in self.path.read_text(encoding="utf-8").splitlines():
                with contextlib.suppress(json.JSONDecodeError, TypeError, AttributeError):
                    if json.loads(line).get("step", math.inf) <= resume_step:
                        kept.append(line)
        temporary = self.path.with_name(f".{self.path.name}.tmp")
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            temporary.write_text("".join(line + "\n" for line in kept), encoding="utf-8")
            os.replace(temporary, self.path)
        except OSError as error:
            raise RunError(describe_os_error(error, self.path, "writing the metrics", "")) from None

    def write(self, row: dict[str, Any]) -> None:
        """Append ``row`` (non-finite numbers become null, so that every line is strict JSON)."""
        row = {key: None if isinstance(value, float) and not math.isfinite(value) else value
               for key, value in row.items()}
        if self.accelerator.is_main_process:
            try:
                with self.path.open("a", encoding="utf-8") as handle:
                    handle.write(json.dumps(row, allow_nan=False) + "\n")
            except OSError as error:
                raise RunError(describe_os_error(error, self.path, "writing the metrics",
                                                 "the checkpoints written so far are kept")) from None
        numbers = {key: value for key, value in row.items()
                   if isinstance(value, (int, float)) and not isinstance(value, bool) and key != "step"}
        if self.accelerator.trackers:
            self.accelerator.log(numbers, step=int(row["step"]))


class CollapseMonitor:
    """Warns once per episode when the logged statistics show a collapse for ``patience_steps``.

    Uniform collapse: the teacher's per-sample entropy stays near ln(K) (so does the loss): the
    teacher is too flat for the student to learn anything. One-hot collapse: the entropy of the
    batch-mean teacher distribution stays below 0.1 ln(K), i.e. fewer than K ** 0.1 prototypes are in
    effective use (nearly every image goes to the same prototype). With ``ibot_num_prototypes`` the
    iBOT teacher's masked-patch distributions are watched the same way (``ibot_teacher_entropy``,
    ``ibot_teacher_mean_entropy``). The warning names the flags to change with values computed from this run's K, temperatures and
    momenta (not generic ones).

    Args:
        num_prototypes: K.
        patience_steps: steps a condition must hold before the warning.
        teacher_temperature, student_temperature, teacher_momentum, center_momentum: this run's settings,
            from which the remedies are computed.
        learning_rate, learning_rate_flag: the learning-rate flag this run set (``--base_learning_rate``, per
            256 images, or ``--learning_rate``, absolute) and its value, for the remedy that halves it.
        ibot_num_prototypes: the iBOT head's K when the run has DINOv2's patch term, else ``None``.
    """

    def __init__(self, num_prototypes: int, patience_steps: int, *,
                 teacher_temperature: float = OFFICIAL_TEACHER_TEMPERATURE,
                 student_temperature: float = OFFICIAL_STUDENT_TEMPERATURE,
                 teacher_momentum: float = OFFICIAL_TEACHER_MOMENTUM, center_momentum: float = OFFICIAL_CENTER_MOMENTUM,
                 learning_rate: float = OFFICIAL_LEARNING_RATE, learning_rate_flag: str = "--base_learning_rate",
                 ibot_num_prototypes: int | None = None) -> None:
        self.num_prototypes = num_prototypes
        self.log_k = math.log(num_prototypes)
        self.ibot_num_prototypes = ibot_num_prototypes
        self.ibot_log_k = math.log(ibot_num_prototypes) if ibot_num_prototypes else None
        self.patience_steps = patience_steps
        self.teacher_temperature = teacher_temperature
        self.student_temperature = student_temperature
        self.teacher_momentum = teacher_momentum
        self.center_momentum = center_momentum
        self.learning_rate = learning_rate
        self.learning_rate_flag = learning_rate_flag
        self._since: dict[str, int] = {}
        self._warned: set[str] = set()

    def update(self, step: int, row: dict[str, float]) -> str | None:
        """Return a warning sentence when a collapse has lasted ``patience_steps``, else None."""
        conditions = {
            "uniform": (row.get("teacher_entropy") or 0.0) > 0.9 * self.log_k,
            # fewer than K ** 0.1 prototypes in effective use (exp of the entropy): 2 of 1024, 3 of 65536
            "one-hot": (row.get("teacher_mean_entropy") if row.get("teacher_mean_entropy") is not None else math.inf)
            < 0.1 * self.log_k,
        }
        if self.ibot_log_k is not None:
            conditions["uniform, iBOT head"] = (row.get("ibot_teacher_entropy") or 0.0) > 0.9 * self.ibot_log_k
            ibot_mean_entropy = row.get("ibot_teacher_mean_entropy")
            conditions["one-hot, iBOT head"] = ibot_mean_entropy is not None and ibot_mean_entropy < 0.1 * self.ibot_log_k
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

    def remedies(self, kind: str, row: dict[str, float] | None = None) -> list[str]:
        """The flag changes that address a ``"uniform"`` or ``"one-hot"`` collapse of this run (of its
        iBOT head for ``"uniform, iBOT head"`` / ``"one-hot, iBOT head"``)."""
        row = row or {}
        temperature = row.get("teacher_temperature") or self.teacher_temperature
        kind, _, head = kind.partition(", ")
        if kind == "uniform":
            # A flat teacher: sharpen it (lower temperature, from the first step), give it fewer
            # prototypes to spread over, and let it follow the student sooner (lower EMA momentum).
            sharper = _round_significant(0.75 * temperature)
            remedies = [f"--teacher_temperature {sharper} --warmup_teacher_temperature {sharper} "
                        f"(now {temperature:g}: a sharper teacher from the first step)"]
            num_prototypes = self.ibot_num_prototypes if head else self.num_prototypes
            if num_prototypes > 256:
                fewer = max(256, min(4096, num_prototypes // 4))
                remedies.append(f"--ibot_separate_head true --ibot_num_prototypes {fewer} (now iBOT K = {num_prototypes})"
                                if head else f"--config_overrides num_prototypes={fewer} (now K = {num_prototypes})")
            if self.teacher_momentum > 0.99:
                faster = round(1.0 - 2.5 * (1.0 - self.teacher_momentum), 4)
                remedies.append(f"--teacher_momentum {faster:g} (now {self.teacher_momentum:g}: a teacher that "
                                "follows the student sooner)")
            return remedies
        # One prototype takes every image: soften the teacher, centre faster, step more gently.
        softer = _round_significant(min(1.5 * temperature, 0.9 * self.student_temperature))
        # twice as fast a center, and at least the official 0.9 (1 turns centering off)
        faster_center = round(min(1.0 - 2.0 * (1.0 - self.center_momentum), 0.9), 3)
        remedies = []
        if softer > temperature:
            remedies.append(f"--teacher_temperature {softer} (now {temperature:g}; below the student's "
                            f"{self.student_temperature:g})")
        remedies.append(f"--center_momentum {faster_center:g} (now {self.center_momentum:g}: the center "
                        "follows the dominant prototype sooner)")
        remedies.append(f"{self.learning_rate_flag} {_round_significant(self.learning_rate / 2)} "
                        f"(now {self.learning_rate:g})")
        remedies.append("stronger augmentations (views that differ more)")
        return remedies

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
                      f"nats (about {math.exp(row['teacher_mean_entropy']):.1f} of K = {self.num_prototypes} prototypes "
                      "in effective use)")
        return (f"Training looks collapsed ({kind}) for {steps} steps: {detail}. Remedies for this run: "
                + "; ".join(self.remedies(kind, row)) + ".")


def _round_significant(value: float, digits: int = 2) -> float:
    """``value`` rounded to ``digits`` significant digits (0.0225 -> 0.022), for suggested flag values."""
    if value == 0 or not math.isfinite(value):
        return value
    return round(value, digits - 1 - math.floor(math.log10(abs(value))))


class GradientSpikeMonitor:
    """Warns when a logging window's largest gradient norm is far above the run's usual norm.

    "Usual" is the running median of the windows' mean gradient norms (``grad_norm``) over the last
    ``history`` logging steps: a median, so that an earlier spike does not raise the bar. A window
    whose ``grad_norm_max`` exceeds ``factor`` times that median, and ``max_grad_norm`` (below it
    clipping had nothing to cut: a jump from a tiny norm is harmless), warns (once per episode: the next
    warning needs a window without a spike in between), after ``min_history`` windows have been seen.
    A spike often precedes a divergence (non-finite steps) by some hundreds of steps.

    Args:
        factor: how many times the median counts as a spike; 0 disables the monitor.
        history: logging windows in the running median.
        min_history: windows seen before any warning (the first steps' norms are not yet typical).
        max_grad_norm, learning_rate, warmup_steps: this run's settings, for the remedies.
        learning_rate_flag: the flag ``learning_rate`` is the value of (``--base_learning_rate`` or ``--learning_rate``).
    """

    def __init__(self, factor: float = 10.0, history: int = 50, min_history: int = 5, *,
                 max_grad_norm: float = OFFICIAL_MAX_GRAD_NORM, learning_rate: float = OFFICIAL_LEARNING_RATE,
                 learning_rate_flag: str = "--base_learning_rate", warmup_steps: int = 0) -> None:
        self.factor = factor
        self.history: list[float] = []
        self.history_size = history
        self.min_history = min_history
        self.max_grad_norm = max_grad_norm
        self.learning_rate = learning_rate
        self.learning_rate_flag = learning_rate_flag
        self.warmup_steps = warmup_steps
        self._in_spike = False

    def update(self, step: int, row: dict[str, float]) -> str | None:
        """Return a warning sentence when this row's ``grad_norm_max`` is a spike, else None."""
        peak, mean = row.get("grad_norm_max"), row.get("grad_norm")
        message = None
        if self.factor > 0 and peak is not None and math.isfinite(peak) and len(self.history) >= self.min_history:
            median = statistics.median(self.history)
            # below the clipping threshold no gradient was even clipped: a jump from a tiny norm (a
            # collapsed run's) is no danger
            spike = median > 0 and peak > self.factor * median and peak > self.max_grad_norm
            if spike and not self._in_spike:
                message = self._message(step, peak, median)
            self._in_spike = spike
        if mean is not None and math.isfinite(mean):
            self.history = (self.history + [mean])[-self.history_size:]
        return message

    def _message(self, step: int, peak: float, median: float) -> str:
        clip = (f"a lower --max_grad_norm ({_round_significant(self.max_grad_norm / 3)}, now {self.max_grad_norm:g})"
                if self.max_grad_norm > 0 else "gradient clipping (--max_grad_norm 3.0, now off)")
        return (f"Gradient-norm spike by step {step}: {peak:.3g}, {peak / median:.0f} times the running median "
                f"{median:.3g} of the last {len(self.history)} logging windows. If it recurs or the loss jumps: "
                f"{clip}, a lower {self.learning_rate_flag} ({_round_significant(self.learning_rate / 2)}, now "
                f"{self.learning_rate:g}), a longer warm-up (--warmup_steps {max(2 * self.warmup_steps, 100)}, "
                f"now {self.warmup_steps}), or --mixed_precision no.")


class ThroughputWindow:
    """Images per second and the fraction of time spent waiting for data since the last call; with
    ``teacher_seconds`` (the step's :meth:`~dino_hf.train.step.DinoTrainStep.take_teacher_seconds`) also the
    frozen distillation teacher's share of that time (``teacher_forward_share``)."""

    def __init__(self, stream: BatchStream, images_per_micro_batch: int,
                 teacher_seconds: Callable[[], float] | None = None) -> None:
        self.stream = stream
        self.images_per_micro_batch = images_per_micro_batch
        self.teacher_seconds = teacher_seconds
        self._reset()

    def _reset(self) -> None:
        self.started, self.wait, self.batches = time.perf_counter(), self.stream.wait_seconds, self.stream.micro_batches

    def measure(self) -> dict[str, float]:
        seconds = max(time.perf_counter() - self.started, 1e-9)
        values = {
            "images_per_second": (self.stream.micro_batches - self.batches) * self.images_per_micro_batch / seconds,
            "data_wait_fraction": (self.stream.wait_seconds - self.wait) / seconds,
        }
        if self.teacher_seconds is not None:
            values["teacher_forward_share"] = self.teacher_seconds() / seconds
        self._reset()
        return values

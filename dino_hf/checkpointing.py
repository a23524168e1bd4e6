"""Checkpoints that survive a crash, and the signals that ask for one.

A checkpoint is ``output_dir/checkpoints/step_N/``: accelerate's state (model with student, teacher
and center, optimiser, loss scaler, RNG of every process), ``process_state_{rank}.pt`` (each
process's data-stream position, RNG state and metric sums, loaded with ``weights_only=True``),
``training_state.json`` (the step and the step plan) and, written last, the completion marker. It is
written into a hidden temporary folder and renamed, so a kill at any moment leaves either a complete
``step_N`` or nothing under that name. `StopSignals` turns SIGTERM/SIGINT into "checkpoint now and
exit".
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import pickle
import random
import shutil
import signal
import threading
from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate import Accelerator

from .data import BatchStream
from .run_output import RunFolder
from .training_args import DinoTrainingArguments

logger = logging.getLogger(__name__)

__all__ = [
    "StopSignals",
    "checkpoint_path",
    "checkpoint_step_of",
    "checkpoints_dir",
    "is_complete_checkpoint",
    "list_checkpoints",
    "load_checkpoint",
    "remove_stale_temporaries",
    "resolve_resume_checkpoint",
    "restore_rng_state",
    "save_checkpoint",
]

CHECKPOINT_PREFIX = "step_"
TEMPORARY_PREFIX = ".tmp-"
COMPLETE_MARKER = "checkpoint_complete.json"
TRAINING_STATE_NAME = "training_state.json"


def checkpoints_dir(output_dir: str | Path) -> Path:
    """``output_dir/checkpoints``."""
    return RunFolder(output_dir).checkpoints


def checkpoint_path(output_dir: str | Path, step: int) -> Path:
    """Where the checkpoint of optimiser step ``step`` lives (whether or not it exists)."""
    return checkpoints_dir(output_dir) / f"{CHECKPOINT_PREFIX}{step}"


def _checkpoint_step(path: Path) -> int | None:
    name = path.name
    if not name.startswith(CHECKPOINT_PREFIX):
        return None
    with contextlib.suppress(ValueError):
        return int(name[len(CHECKPOINT_PREFIX):])
    return None


def is_complete_checkpoint(path: Path) -> bool:
    return path.is_dir() and (path / COMPLETE_MARKER).is_file()


def list_checkpoints(output_dir: str | Path) -> list[Path]:
    """Complete checkpoints under ``output_dir/checkpoints``, oldest first."""
    folder = checkpoints_dir(output_dir)
    if not folder.is_dir():
        return []
    found = [(step, path) for path in folder.iterdir()
             if (step := _checkpoint_step(path)) is not None and is_complete_checkpoint(path)]
    return [path for _, path in sorted(found)]


def resolve_resume_checkpoint(args: DinoTrainingArguments) -> Path | None:
    """The checkpoint to resume from, or None for a fresh start.

    Raises:
        ValueError: ``--resume_from_checkpoint`` names a path that is not a complete checkpoint.
    """
    value = args.resume_from_checkpoint
    if value is None:
        return None
    if value == "latest":
        checkpoints = list_checkpoints(args.output_dir)
        if not checkpoints:
            logger.info("No complete checkpoint in %s: starting afresh.", checkpoints_dir(args.output_dir))
            return None
        return checkpoints[-1]
    path = Path(value)
    if not path.exists():
        raise ValueError(f"--resume_from_checkpoint {value} does not exist: pass a checkpoint folder or 'latest'.")
    if not is_complete_checkpoint(path):
        raise ValueError(
            f"--resume_from_checkpoint {value} is not a complete dino_hf checkpoint (no {COMPLETE_MARKER}): "
            "pass another checkpoint folder or 'latest'."
        )
    return path


def _rng_state() -> dict[str, Any]:
    numpy_state = np.random.get_state(legacy=False)
    # numpy's key array as a tensor: the whole process state then loads with weights_only=True
    numpy_state["state"]["key"] = torch.from_numpy(numpy_state["state"]["key"].astype(np.int64))
    state = {"python": random.getstate(), "numpy": numpy_state, "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    """Set the Python, numpy, torch (and CUDA) generators to a state saved with a checkpoint."""
    random.setstate(state["python"])
    numpy_state = dict(state["numpy"], state=dict(state["numpy"]["state"]))
    numpy_state["state"]["key"] = numpy_state["state"]["key"].numpy().astype(np.uint32)
    np.random.set_state(numpy_state)
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(accelerator: Accelerator, output_dir: str | Path, step: int, stream: BatchStream,
                    training_state: dict[str, Any], total_limit: int | None,
                    process_extras: dict[str, Any] | None = None) -> Path:
    """Write ``output_dir/checkpoints/step_{step}`` atomically; all processes must call it.

    Everything is written into a hidden temporary folder, the completion marker last, and the
    folder is then renamed: a kill at any moment leaves either a complete ``step_N`` or nothing
    under that name. Holds: model (student, teacher, center), optimiser, loss scaler, RNG states
    of every process (accelerate), each process's data-stream position and RNG state, and the
    step counter (the schedules are functions of the step), plus ``process_extras`` per process.
    """
    folder = checkpoints_dir(output_dir)
    final = checkpoint_path(output_dir, step)
    temporary = folder / f"{TEMPORARY_PREFIX}{CHECKPOINT_PREFIX}{step}"
    if is_complete_checkpoint(final):
        return final
    if accelerator.is_main_process:
        if temporary.exists():
            shutil.rmtree(temporary)
        temporary.mkdir(parents=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(temporary), safe_serialization=True)
    rank = accelerator.process_index
    process_state = {"stream": stream.state_dict(), "rng": _rng_state(), **(process_extras or {})}
    torch.save(process_state, temporary / f"process_state_{rank}.pt")
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        (temporary / TRAINING_STATE_NAME).write_text(
            json.dumps({**training_state, "step": step, "num_processes": accelerator.num_processes}, indent=2)
        )
        _fsync_folder(temporary)
        (temporary / COMPLETE_MARKER).write_text(json.dumps({"step": step}) + "\n")
        if final.exists():  # an incomplete leftover with the same name
            shutil.rmtree(final)
        os.rename(temporary, final)
        _prune_checkpoints(output_dir, total_limit)
    accelerator.wait_for_everyone()
    return final


def _fsync_folder(folder: Path) -> None:
    """Flush the files of ``folder`` to disk before the marker declares them complete."""
    for path in folder.rglob("*"):
        if path.is_file():
            with contextlib.suppress(OSError), open(path, "rb") as handle:
                os.fsync(handle.fileno())


def _prune_checkpoints(output_dir: str | Path, total_limit: int | None) -> None:
    if total_limit is None:
        return
    checkpoints = list_checkpoints(output_dir)
    for path in checkpoints[: max(len(checkpoints) - total_limit, 0)]:
        shutil.rmtree(path, ignore_errors=True)


def remove_stale_temporaries(output_dir: str | Path) -> None:
    folder = checkpoints_dir(output_dir)
    if folder.is_dir():
        for path in folder.glob(f"{TEMPORARY_PREFIX}*"):
            shutil.rmtree(path, ignore_errors=True)


def checkpoint_step_of(path: Path | None) -> int | None:
    if path is None:
        return None
    return int(json.loads((path / TRAINING_STATE_NAME).read_text())["step"])


def load_checkpoint(accelerator: Accelerator, path: Path, stream: BatchStream) -> tuple[dict[str, Any], dict[str, Any]]:
    """Restore model/optimiser/scaler (accelerate) and this process's stream position.

    Returns:
        (training state dict with ``step``, this process's state: ``rng`` to apply just before
        training and any ``process_extras`` given to `save_checkpoint`).
    Raises:
        ValueError: the checkpoint was written by a different number of processes.
    """
    state = json.loads((path / TRAINING_STATE_NAME).read_text())
    if state.get("num_processes") != accelerator.num_processes:
        raise ValueError(
            f"--resume_from_checkpoint {path} was written by {state.get('num_processes')} processes; resume "
            f"it with the same number (this run has {accelerator.num_processes})."
        )
    try:
        process_state = torch.load(path / f"process_state_{accelerator.process_index}.pt", weights_only=True)
    except pickle.UnpicklingError:
        raise ValueError(
            f"--resume_from_checkpoint {path} holds a process state that only unsafe unpickling can read (written "
            "by an earlier dino_hf, or not by dino_hf): resume from a newer checkpoint or start afresh."
        ) from None
    stream.load_state_dict(process_state["stream"])
    stream.start()
    accelerator.load_state(str(path))
    return state, process_state


class StopSignals:
    """Context manager: SIGTERM/SIGINT set ``received`` (a second signal acts as usual)."""

    def __init__(self) -> None:
        self.received: str | None = None
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, frame: Any) -> None:
        name = signal.Signals(signum).name
        if self.received is not None:  # second signal: stop waiting for the checkpoint
            signal.signal(signum, self._previous.get(signum, signal.SIG_DFL))
            signal.raise_signal(signum)
            return
        self.received = name
        logger.warning("Received %s: saving a checkpoint after the current step, then exiting.", name)

    def __enter__(self) -> StopSignals:  # noqa: PYI034 - final class
        if threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGTERM, signal.SIGINT):
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc_info: object) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)

"""Checkpoints that survive a crash, the lock that keeps one run per output folder, and the signals
that ask for a checkpoint.

A checkpoint is ``output_dir/checkpoints/step_N/``: accelerate's state (model with student, teacher
and center, optimiser, loss scaler, RNG of every process), ``process_state_{rank}.pt`` (each
process's data-stream position, RNG state and metric sums, loaded with ``weights_only=True``),
``training_state.json`` (the step, the step plan, the trackers' run id) and, written last, the
completion marker, which records every file's size and SHA-256. It is written into a hidden
temporary folder and renamed, so a kill at any moment leaves either a complete ``step_N`` or
nothing under that name; a checkpoint damaged later (a truncated copy, a full disk on a file system
that does not order writes) fails :func:`verify_checkpoint`, and ``latest`` then falls back to the
one before. Nothing is deleted before what replaces it is complete: pruning first renames a folder
out of the checkpoint namespace (``.deleting-step_N``), and start-up removes such leftovers.

`RunLock` is an exclusive OS lock (``flock``) on ``output_dir/.dino_hf.lock``, taken by the main
process before anything in the folder is read for resuming or deleted, and held for the run's
life; the kernel releases it when its holder dies, so a stale lock is simply taken over.

`StopSignals` turns SIGTERM/SIGINT into "checkpoint now and exit" and ignores repetitions
(launchers forward the scheduler's signal, so each process often gets it twice); `StopAgreement`
makes several processes stop at the same step. DataLoader workers ignore both signals
(:class:`dino_hf.data.loader.IgnoreStopSignals`): the main process stops them.
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import fcntl
import hashlib
import json
import logging
import os
import pickle
import random
import shlex
import shutil
import signal
import socket
import threading
from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import gather_object

from dino_hf.base.errors import RunError, describe_os_error
from dino_hf.base.run_folder import (
    CHECKPOINT_PREFIX,
    COMPLETE_MARKER,
    DISCARDED_PREFIX,
    TEMPORARY_PREFIX,
    TRAINING_STATE_NAME,
    WEIGHTS_NAME,
    RunFolder,
    process_state_name,
)
from dino_hf.data.loader import BatchStream
from dino_hf.train.sharded_resume import sharded_optimizer_resume

logger = logging.getLogger(__name__)

__all__ = [
    "RunLock",
    "StopAgreement",
    "StopSignals",
    "acquire_run_lock",
    "checkpoint_path",
    "checkpoint_step_of",
    "checkpoints_dir",
    "discard_folder",
    "is_complete_checkpoint",
    "list_checkpoints",
    "load_checkpoint",
    "remove_leftovers",
    "resolve_resume_checkpoint",
    "restore_rng_state",
    "resume_command",
    "save_checkpoint",
    "verify_checkpoint",
]

#: 2: the marker lists every file's size and SHA-256. Markers without ``files`` (the first format)
#: are still accepted: their checkpoints are checked for their files and a readable training state.
MARKER_FORMAT = 2
_HASH_CHUNK_BYTES = 8 << 20


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
    """Whether ``path`` is a checkpoint folder with its completion marker (not whether it verifies)."""
    return path.is_dir() and (path / COMPLETE_MARKER).is_file()


def list_checkpoints(output_dir: str | Path) -> list[Path]:
    """Complete checkpoints under ``output_dir/checkpoints``, oldest first."""
    folder = checkpoints_dir(output_dir)
    if not folder.is_dir():
        return []
    found = [(step, path) for path in folder.iterdir()
             if (step := _checkpoint_step(path)) is not None and is_complete_checkpoint(path)]
    return [path for _, path in sorted(found)]


# ------------------------------------------------------------------------------------------ verification
def _file_digest(path: Path) -> str:
    """SHA-256 of a file, read in chunks (about 1.5 GB/s on a CPU with SHA extensions)."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(_HASH_CHUNK_BYTES):
            digest.update(chunk)
    return digest.hexdigest()


def _checkpoint_files(folder: Path) -> list[Path]:
    """Every file of a checkpoint folder but its marker, in a stable order."""
    return sorted(path for path in folder.rglob("*") if path.is_file() and path.name != COMPLETE_MARKER)


def _manifest(folder: Path) -> dict[str, dict[str, Any]]:
    """``{relative path: {"size": bytes, "sha256": hex}}`` of a checkpoint folder's files."""
    return {path.relative_to(folder).as_posix(): {"size": path.stat().st_size, "sha256": _file_digest(path)}
            for path in _checkpoint_files(folder)}


def verify_checkpoint(path: Path) -> str | None:
    """Why ``path`` cannot be resumed from, as a clause (e.g. "model.safetensors has 12 bytes where
    its marker recorded 4096"), or None when it verifies.

    A marker of the current format is checked file by file (presence, size, SHA-256); one of the first
    format (no ``files``) for its model weights, process states and a readable training state.
    """
    if not path.is_dir():
        return "it is not a folder"
    marker_path = path / COMPLETE_MARKER
    if not marker_path.is_file():
        return f"it has no {COMPLETE_MARKER} (a save that did not finish)"
    try:
        marker = json.loads(marker_path.read_text(encoding="utf-8"))
        files = marker.get("files")
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError):
        return f"its {COMPLETE_MARKER} is unreadable"
    try:
        if files is None:
            problem = _verify_first_format(path)
            if problem is not None:
                return problem
        for name, expected in files.items() if files is not None else ():
            file = path / name
            if not file.is_file():
                return f"{name} is missing"
            size = file.stat().st_size
            if size != expected["size"]:
                return f"{name} has {size} bytes where its marker recorded {expected['size']}"
            if _file_digest(file) != expected["sha256"]:
                return f"{name} does not match the checksum its marker recorded"
    except OSError as error:
        return f"it could not be read ({error.strerror or error})"
    state = _read_training_state(path)
    if isinstance(state, str):
        return state
    return None


def _verify_first_format(path: Path) -> str | None:
    for name in (WEIGHTS_NAME, process_state_name(0)):
        if not (path / name).is_file() or (path / name).stat().st_size == 0:
            return f"{name} is missing or empty"
    return None


def _read_training_state(path: Path) -> dict[str, Any] | str:
    """``training_state.json`` of a checkpoint, or why it cannot be read (a clause)."""
    try:
        state = json.loads((path / TRAINING_STATE_NAME).read_text(encoding="utf-8"))
    except FileNotFoundError:
        return f"{TRAINING_STATE_NAME} is missing"
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return f"{TRAINING_STATE_NAME} is not valid JSON (truncated or overwritten)"
    if not isinstance(state, dict) or not isinstance(state.get("step"), int):
        return f"{TRAINING_STATE_NAME} holds no step"
    return state


def resolve_resume_checkpoint(resume_from_checkpoint: str | None, output_dir: str | Path,
                              accelerator: Accelerator | None = None) -> Path | None:
    """The checkpoint ``--resume_from_checkpoint`` names in ``output_dir``, or None for a fresh start;
    verified.

    ``latest`` is the newest checkpoint that verifies: a damaged newer one is skipped with one warning
    naming it. With several processes the main process verifies and tells the others.

    Raises:
        RunError: ``--resume_from_checkpoint`` names a path that does not exist, is not a complete
            checkpoint or is damaged, or every checkpoint of ``latest`` is damaged.
    """
    if resume_from_checkpoint is None:
        return None
    if accelerator is None or accelerator.num_processes == 1:
        return _resolve(resume_from_checkpoint, output_dir)
    answer: list[Any] = [None]
    if accelerator.is_main_process:
        try:
            answer = [str(path) if (path := _resolve(resume_from_checkpoint, output_dir)) is not None else None]
        except RunError as error:
            answer = [error]
    answer = gather_object(answer)[:1]
    if isinstance(answer[0], RunError):
        raise RunError(str(answer[0]))
    return None if answer[0] is None else Path(answer[0])


def _resolve(value: str, output_dir: str | Path) -> Path | None:
    if value == "latest":
        checkpoints = list_checkpoints(output_dir)
        if not checkpoints:
            logger.info("No complete checkpoint in %s: starting afresh.", checkpoints_dir(output_dir))
            return None
        for path in reversed(checkpoints):
            problem = verify_checkpoint(path)
            if problem is None:
                return path
            logger.warning("Skipping the damaged checkpoint %s (%s); trying the one before.", path, problem)
        raise RunError(
            f"Every checkpoint in {checkpoints_dir(output_dir)} is damaged (the oldest, {checkpoints[0].name}, "
            f"because {verify_checkpoint(checkpoints[0])}): pass --overwrite_output_dir to start over."
        )
    path = Path(value)
    if not path.exists():
        raise RunError(f"--resume_from_checkpoint {value} does not exist: pass a checkpoint folder or 'latest'.")
    if not is_complete_checkpoint(path):
        raise RunError(
            f"--resume_from_checkpoint {value} is not a complete dino_hf checkpoint (no {COMPLETE_MARKER}): "
            "pass another checkpoint folder or 'latest'."
        )
    problem = verify_checkpoint(path)
    if problem is not None:
        raise RunError(
            f"--resume_from_checkpoint {value} is damaged ({problem}): pass another checkpoint folder or 'latest', "
            "which uses the newest one that verifies."
        )
    return path


def checkpoint_step_of(path: Path | None) -> int | None:
    """The optimiser step a checkpoint was written at (None for None)."""
    if path is None:
        return None
    state = _read_training_state(path)
    if isinstance(state, str):
        raise RunError(f"The checkpoint {path} cannot be resumed from: {state}; pass another one or 'latest'.")
    return int(state["step"])


# ------------------------------------------------------------------------------------------ random states
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


# ------------------------------------------------------------------------------------------ saving
def _first_failure(accelerator: Accelerator, message: str | None) -> str | None:
    """The first process's failure message among all processes' (None when none failed).

    Every process must call it at the same point: it replaces a barrier, so that a process whose
    write failed does not leave the others waiting for it forever.
    """
    if accelerator.num_processes == 1:
        return message
    return next((item for item in gather_object([message]) if item is not None), None)


def _folder_bytes(folder: Path) -> int:
    return sum(path.stat().st_size for path in folder.rglob("*") if path.is_file())


def _space_problem(output_dir: str | Path, step: int) -> str | None:
    """A sentence when the disk cannot hold another checkpoint as large as the newest one.

    Only a run that already saved can estimate the size (the same model, optimiser and processes
    write the same bytes); pruning frees space only after the new checkpoint is complete.
    """
    checkpoints = list_checkpoints(output_dir)
    if not checkpoints:
        return None
    needed = _folder_bytes(checkpoints[-1])
    free = shutil.disk_usage(checkpoints_dir(output_dir)).free
    if free >= needed:
        return None
    return (
        f"Not writing the checkpoint of step {step}: no space left for it on the device of "
        f"{checkpoints_dir(output_dir)} ({free / 1e6:.1f} MB free, about {needed / 1e6:.1f} MB needed); free some "
        f"space or pass another --output_dir; the earlier checkpoints are kept (newest: {checkpoints[-1].name})."
    )


def save_checkpoint(accelerator: Accelerator, output_dir: str | Path, step: int, stream: BatchStream,
                    training_state: dict[str, Any], total_limit: int | None,
                    process_extras: dict[str, Any] | None = None) -> Path:
    """Write ``output_dir/checkpoints/step_{step}`` atomically; all processes must call it.

    Everything is written into a hidden temporary folder, the completion marker (every file's size
    and SHA-256) last, and the folder is then renamed: a kill at any moment leaves either a complete
    ``step_N`` or nothing under that name. Holds: model (student, teacher, center), optimiser, loss
    scaler, RNG states of every process (accelerate), each process's data-stream position and RNG
    state, and the step counter (the schedules are functions of the step), plus ``process_extras``
    per process. Checkpoints beyond ``total_limit`` (None or 0: keep all) are pruned afterwards.

    Raises:
        RunError: not enough space for it (checked first, from the newest checkpoint's size), or a
            write failed (disk full, permission...); the temporary folder is removed and the earlier
            checkpoints are left as they were.
    """
    folder = checkpoints_dir(output_dir)
    final = checkpoint_path(output_dir, step)
    temporary = folder / f"{TEMPORARY_PREFIX}{CHECKPOINT_PREFIX}{step}"
    if is_complete_checkpoint(final):
        return final
    failure = None
    if accelerator.is_main_process:
        try:
            if temporary.exists():
                shutil.rmtree(temporary)
            temporary.mkdir(parents=True)
            failure = _space_problem(output_dir, step)
        except OSError as error:
            failure = _save_failure(error, folder, step, output_dir)
    failure = _first_failure(accelerator, failure)
    if failure is None:
        try:
            accelerator.save_state(str(temporary), safe_serialization=True)
            rank = accelerator.process_index
            process_state = {"stream": stream.state_dict(), "rng": _rng_state(), **(process_extras or {})}
            torch.save(process_state, temporary / process_state_name(rank))
        except Exception as error:  # noqa: BLE001 - torch/safetensors wrap the OS error (ENOSPC) in their own
            failure = _save_failure(error, temporary, step, output_dir)
        failure = _first_failure(accelerator, failure)
    if failure is None and accelerator.is_main_process:
        try:
            _complete(temporary, final, step, accelerator.num_processes, training_state)
        except Exception as error:  # noqa: BLE001 - as above
            failure = _save_failure(error, temporary, step, output_dir)
    failure = _first_failure(accelerator, failure)
    if failure is not None:
        if accelerator.is_main_process:
            shutil.rmtree(temporary, ignore_errors=True)  # frees the space the partial save took
        raise RunError(failure)
    if accelerator.is_main_process:
        _prune_checkpoints(output_dir, total_limit)
    accelerator.wait_for_everyone()
    return final


def _save_failure(error: BaseException, path: Path, step: int, output_dir: str | Path) -> str:
    earlier = list_checkpoints(output_dir)
    kept = f"the earlier checkpoints are kept (newest: {earlier[-1].name})" if earlier else "no checkpoint was kept"
    return describe_os_error(error, path, f"writing the checkpoint of step {step}", kept)


def _complete(temporary: Path, final: Path, step: int, num_processes: int, training_state: dict[str, Any]) -> None:
    """Training state, flush, marker with the files' sizes and checksums, then the atomic rename."""
    (temporary / TRAINING_STATE_NAME).write_text(
        json.dumps({**training_state, "step": step, "num_processes": num_processes}, indent=2), encoding="utf-8"
    )
    _fsync_folder(temporary)
    marker = {"step": step, "format": MARKER_FORMAT, "files": _manifest(temporary)}
    with (temporary / COMPLETE_MARKER).open("w", encoding="utf-8") as handle:
        handle.write(json.dumps(marker, indent=1) + "\n")
        handle.flush()
        os.fsync(handle.fileno())
    if final.exists():  # an incomplete leftover with the same name
        discard_folder(final)
    os.rename(temporary, final)
    _fsync_directory(final.parent)


def _fsync_folder(folder: Path) -> None:
    """Flush the files of ``folder`` to disk before the marker declares them complete."""
    for path in folder.rglob("*"):
        if path.is_file():
            with contextlib.suppress(OSError), open(path, "rb") as handle:
                os.fsync(handle.fileno())


def _fsync_directory(folder: Path) -> None:
    """Flush a folder's entries (a rename is durable only once its folder is)."""
    with contextlib.suppress(OSError):
        descriptor = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(descriptor)
        finally:
            os.close(descriptor)


def discard_folder(path: Path) -> None:
    """Delete a folder by first renaming it out of the checkpoint namespace (atomic), then removing it.

    A kill during the removal leaves a ``.deleting-*`` folder that no listing counts as a checkpoint
    and that `remove_leftovers` deletes at the next start.
    """
    if not path.exists():
        return
    discarded = path.with_name(f"{DISCARDED_PREFIX}{path.name}")
    if discarded.exists():
        shutil.rmtree(discarded, ignore_errors=True)
    os.rename(path, discarded)
    shutil.rmtree(discarded, ignore_errors=True)


def _prune_checkpoints(output_dir: str | Path, total_limit: int | None) -> None:
    if not total_limit:  # None or 0: keep all
        return
    checkpoints = list_checkpoints(output_dir)
    for path in checkpoints[: max(len(checkpoints) - total_limit, 0)]:
        try:
            discard_folder(path)
        except OSError as error:  # a checkpoint left behind costs disk, not the run
            logger.warning("Could not remove the old checkpoint %s: %s", path, error)


def remove_leftovers(output_dir: str | Path) -> None:
    """Remove what killed runs left under ``checkpoints/``: unfinished saves and half-deleted folders.

    Call it only while holding the run lock (another live run's save in progress looks the same).
    """
    folder = checkpoints_dir(output_dir)
    if folder.is_dir():
        for pattern in (f"{TEMPORARY_PREFIX}*", f"{DISCARDED_PREFIX}*"):
            for path in folder.glob(pattern):
                shutil.rmtree(path, ignore_errors=True)


# ------------------------------------------------------------------------------------------ loading
def load_checkpoint(accelerator: Accelerator, path: Path, stream: BatchStream, model: torch.nn.Module | None = None,
                    optimizer: torch.optim.Optimizer | None = None) -> tuple[dict[str, Any], dict[str, Any]]:
    """Restore model/optimiser/scaler (accelerate) and this process's stream position.

    With ``model`` (the unwrapped model accelerate prepared), the checkpoint's weights are compared
    with it (names and shapes, from the safetensors header) before anything is loaded. With ``optimizer``
    (the prepared one) too, an FSDP run loads a checkpoint that holds no optimiser state for some
    parameters (:mod:`dino_hf.train.sharded_resume`).

    Returns:
        (training state dict with ``step``, this process's state: ``rng`` to apply just before
        training and any ``process_extras`` given to `save_checkpoint`).
    Raises:
        RunError: the checkpoint was written by a different number of processes, for another model,
            holds a process state only unsafe unpickling can read, or cannot be read.
    """
    state = _read_training_state(path)
    if isinstance(state, str):
        raise RunError(f"--resume_from_checkpoint {path} cannot be resumed from: {state}; pass another one or 'latest'.")
    if state.get("num_processes") != accelerator.num_processes:
        raise RunError(
            f"--resume_from_checkpoint {path} was written by {state.get('num_processes')} processes; resume "
            f"it with the same number (this run has {accelerator.num_processes})."
        )
    if model is not None:
        _check_same_model(path, model)
    try:
        process_state = torch.load(path / process_state_name(accelerator.process_index), weights_only=True)
    except pickle.UnpicklingError:
        raise RunError(
            f"--resume_from_checkpoint {path} holds a process state that only unsafe unpickling can read (written "
            "by an earlier dino_hf, or not by dino_hf): resume from a newer checkpoint or start afresh."
        ) from None
    except (OSError, RuntimeError, EOFError) as error:
        raise RunError(_unreadable(path, error)) from None
    stream.load_state_dict(process_state["stream"])
    stream.start()
    try:
        resuming = (sharded_optimizer_resume(accelerator, path, model, optimizer)
                    if model is not None and optimizer is not None else contextlib.nullcontext())
        with resuming:
            accelerator.load_state(str(path))
    except (OSError, RuntimeError, EOFError, pickle.UnpicklingError) as error:
        raise RunError(_unreadable(path, error)) from None
    return state, process_state


def _unreadable(path: Path, error: BaseException) -> str:
    first_line = (str(error).strip().splitlines() or [""])[0][:200]
    return (f"--resume_from_checkpoint {path} could not be loaded ({type(error).__name__}: {first_line}): pass "
            "another checkpoint folder or 'latest'.")


def _check_same_model(path: Path, model: torch.nn.Module) -> None:
    """Refuse a checkpoint whose weights have other shapes than this run's model (another size)."""
    from safetensors import SafetensorError, safe_open

    weights = path / WEIGHTS_NAME
    if not weights.is_file():
        return
    expected = {name: tuple(tensor.shape) for name, tensor in model.state_dict().items()}
    try:
        with safe_open(str(weights), framework="pt") as handle:
            saved = {name: tuple(handle.get_slice(name).get_shape()) for name in handle.keys()}  # noqa: SIM118
    except (OSError, SafetensorError) as error:
        raise RunError(_unreadable(path, error)) from None
    different = [(name, saved[name], expected[name]) for name in sorted(saved.keys() & expected.keys())
                 if saved[name] != expected[name]]
    if not different and saved.keys() & expected.keys():
        return
    detail = (f"{len(different)} tensors differ, e.g. {different[0][0]} is {list(different[0][1])} there and "
              f"{list(different[0][2])} here" if different else "no weight name in common")
    raise RunError(
        f"--resume_from_checkpoint {path} holds another model ({detail}): resume with the --model_config and "
        "--config_overrides it was trained with, or pass another --output_dir to start this model afresh."
    )


# ------------------------------------------------------------------------------------------ the run lock
class RunLock:
    """An exclusive ``flock`` on ``output_dir/.dino_hf.lock``, held from `acquire` to `release`.

    The file records the holder (host, pid, start time) for the message another run gets. The kernel
    drops the lock when the holding process dies, whatever killed it: a lock file left by a dead run is
    not locked, and the next run takes it over (and says so).
    """

    def __init__(self, output_dir: str | Path) -> None:
        self.output_dir = Path(output_dir)
        self.path = RunFolder(output_dir).lock
        self._descriptor: int | None = None

    def acquire(self) -> None:
        """Take the lock (creating ``output_dir`` if needed).

        Raises:
            RunError: another live run holds it (its host and pid are named), or the folder cannot be
                created or written.
        """
        try:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            descriptor = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as error:
            raise RunError(describe_os_error(error, self.output_dir, "opening --output_dir", "")) from None
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_holder(descriptor)
            os.close(descriptor)
            raise RunError(
                f"--output_dir {self.output_dir} is in use by another run ({holder}): wait for it to end or stop it, "
                "or pass another --output_dir."
            ) from None
        except OSError as error:
            if error.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
                os.close(descriptor)
                raise RunError(describe_os_error(error, self.path, "locking --output_dir", "")) from None
            logger.warning("The file system of %s does not support file locks: nothing stops another run from using "
                           "the same --output_dir.", self.output_dir)
        previous = _read_holder(descriptor, default=None)
        if previous is not None:
            logger.info("Took over the lock of %s from a run that is no longer running (%s).", self.output_dir,
                        previous)
        holder = {"host": socket.gethostname(), "pid": os.getpid(),
                  "started": datetime.datetime.now().astimezone().isoformat(timespec="seconds")}
        try:
            os.ftruncate(descriptor, 0)
            os.pwrite(descriptor, (json.dumps(holder) + "\n").encode(), 0)
        except OSError as error:
            os.close(descriptor)
            raise RunError(describe_os_error(error, self.path, "locking --output_dir", "")) from None
        self._descriptor = descriptor

    def release(self) -> None:
        """Drop the lock (the file stays, empty: an empty lock file names no holder)."""
        if self._descriptor is None:
            return
        with contextlib.suppress(OSError):
            os.ftruncate(self._descriptor, 0)
        os.close(self._descriptor)  # closing the last descriptor releases the flock
        self._descriptor = None

    @property
    def held(self) -> bool:
        return self._descriptor is not None


def _read_holder(descriptor: int, default: str | None = "holder unknown") -> str | None:
    """``host H, pid P, since T`` from a lock file, or ``default`` when it names no holder."""
    try:
        holder = json.loads(os.pread(descriptor, 4096, 0).decode())
        return f"host {holder['host']}, pid {holder['pid']}, since {holder['started']}"
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError):
        return default


def acquire_run_lock(output_dir: str | Path, accelerator: Accelerator) -> RunLock:
    """The run lock, taken by the main process; every process raises the same `RunError` if it is refused.

    The other processes of the run hold no lock of their own (they would refuse each other).
    """
    lock = RunLock(output_dir)
    failure = None
    if accelerator.is_main_process:
        try:
            lock.acquire()
        except RunError as error:
            failure = str(error)
    failure = _first_failure(accelerator, failure)
    if failure is not None:
        raise RunError(failure)
    return lock


# ------------------------------------------------------------------------------------------ signals
def resume_command(argv: list[str]) -> str:
    """The shell-quoted command line that resumes a run started with ``argv`` (``sys.argv``).

    ``--resume_from_checkpoint`` becomes ``latest`` (added when missing) and ``--overwrite_output_dir``
    is dropped (with it the resumed run would delete the checkpoints it needs).
    """
    kept: list[str] = []
    arguments = iter(argv)
    for argument in arguments:
        name = argument.split("=", 1)[0]
        if name == "--overwrite_output_dir":
            if "=" not in argument:
                # a bool flag takes an optional value
                following = next(arguments, None)
                if following is not None and following.lower() not in _BOOLEAN_WORDS:
                    kept.append(following)
            continue
        if name == "--resume_from_checkpoint":
            if "=" not in argument:
                next(arguments, None)
            continue
        kept.append(argument)
    return shlex.join([*kept, "--resume_from_checkpoint", "latest"])


_BOOLEAN_WORDS = {"true", "false", "yes", "no", "1", "0", "t", "f", "y", "n"}


class StopSignals:
    """Context manager: the first SIGTERM/SIGINT sets ``received``; repetitions are noted and ignored.

    Ignored, because a scheduler's signal usually arrives twice (``kill -TERM -- -PGID`` reaches every
    process, then torchrun or ``accelerate launch`` forwards the one it got) and the checkpoint must
    still be written. SIGKILL stops at once, without a checkpoint; the earlier ones stay intact.
    """

    def __init__(self) -> None:
        self.received: str | None = None
        self.repeated = 0
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, frame: Any) -> None:
        name = signal.Signals(signum).name
        if self.received is not None:
            self.repeated += 1
            if self.repeated == 1:
                logger.warning("Received %s again: still saving the checkpoint before exiting (SIGKILL stops at once, "
                               "without it).", name)
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
        self._previous = {}


class StopAgreement:
    """Makes every process stop at the same optimiser step when any of them received a stop signal.

    With one process the answer is immediate. With several, each step starts an all-reduce of the
    local flags on a CPU (gloo) group without waiting for it, and the next step reads it: every process
    then stops at the same step, one step after the signal, and no step waits on the accelerator.
    """

    def __init__(self, signals: StopSignals, num_processes: int) -> None:
        self.signals = signals
        self._group = None
        self._pending: tuple[Any, torch.Tensor] | None = None
        if num_processes > 1 and torch.distributed.is_available() and torch.distributed.is_initialized():
            self._group = torch.distributed.new_group(backend="gloo")

    def should_stop(self) -> bool:
        """Call once per optimiser step on every process: True on all of them at the same step."""
        if self._group is None:
            return self.signals.received is not None
        agreed = False
        if self._pending is not None:
            work, flags = self._pending
            work.wait()
            agreed = bool(flags.item() > 0)
        flags = torch.tensor([1 if self.signals.received is not None else 0], dtype=torch.int32)
        work = torch.distributed.all_reduce(flags, group=self._group, async_op=True)
        self._pending = (work, flags)
        return agreed

    def agree(self, flag: bool) -> bool:
        """True on every process when ``flag`` is True on any (a synchronous all-reduce on the same CPU
        group: what a callback asked, e.g. to stop or to save, happens at the same step everywhere)."""
        if self._group is None:
            return flag
        flags = torch.tensor([1 if flag else 0], dtype=torch.int32)
        torch.distributed.all_reduce(flags, group=self._group)
        return bool(flags.item() > 0)

    def close(self) -> None:
        """Wait for the last all-reduce (every process started it, so it completes)."""
        if self._pending is not None:
            self._pending[0].wait()
            self._pending = None

"""The one error type of expected failures, and the sentences that explain operating-system errors.

An expected failure is one the user can fix: a full disk, a folder without write permission, an
output folder another run holds, a damaged or incompatible checkpoint, a data set with no readable
image. Each reaches the user as a `RunError` whose message is one sentence naming the path and the
remedy; ``scripts/train.py`` prints it and exits with status 2 (``--debug`` shows the traceback).
`RunError` subclasses `ValueError`, the type of every bad-input error of the library, so one
``except ValueError`` in an entry point catches both.

:func:`describe_os_error` turns what the libraries raise while writing (an `OSError`, torch's
``RuntimeError: [enforce fail at inline_container.cc] unexpected pos`` that hides ENOSPC, the
``SafetensorError`` that carries ``(os error 28)`` in its text) into that sentence.
"""

from __future__ import annotations

import errno
import os
import re
import resource
import shutil
from pathlib import Path

__all__ = ["RunError", "describe_os_error", "error_number"]

# "... (os error 28)" is how the Rust side of safetensors reports the errno it met.
_RUST_OS_ERROR = re.compile(r"os error (\d+)")
# Text of the errors whose number got lost on the way (torch's zip writer keeps only a position).
_NO_SPACE_TEXT = ("no space left", "storagefull", "disk quota exceeded")
_TOO_LARGE_TEXT = ("file too large", "filetoolarge")
#: Below this many free bytes, a write error without an errno is taken for a full disk.
NEARLY_FULL_BYTES = 1 << 20


class RunError(ValueError):
    """An expected failure of a run; its message is one sentence naming the path and the remedy."""


def error_number(error: BaseException, path: str | Path | None = None) -> int | None:
    """The errno behind ``error`` (searched along its causes and in its text), or None.

    When none is found and ``path`` is on a nearly full file system (or the process has a file-size
    limit), that is the likely cause: torch's checkpoint writer reports a full disk as
    ``unexpected pos`` without any errno.
    """
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, OSError) and current.errno is not None:
            return current.errno
        text = str(current).lower()
        match = _RUST_OS_ERROR.search(text)
        if match:
            return int(match.group(1))
        if any(needle in text for needle in _NO_SPACE_TEXT):
            return errno.ENOSPC
        if any(needle in text for needle in _TOO_LARGE_TEXT):
            return errno.EFBIG
        current = current.__cause__ or current.__context__
    if path is not None:
        free = _free_bytes(Path(path))
        if free is not None and free < NEARLY_FULL_BYTES:
            return errno.ENOSPC
        if resource.getrlimit(resource.RLIMIT_FSIZE)[0] != resource.RLIM_INFINITY:
            return errno.EFBIG
    return None


def _free_bytes(path: Path) -> int | None:
    """Free bytes on the file system of ``path`` (or of its nearest existing parent)."""
    for candidate in (path, *path.parents):
        if candidate.exists():
            try:
                return shutil.disk_usage(candidate).free
            except OSError:
                return None
    return None


def describe_os_error(error: BaseException, path: str | Path, action: str, remedy: str) -> str:
    """One sentence for an error met while ``action`` (e.g. "writing the checkpoint") on ``path``.

    Args:
        error: what was raised (an `OSError` or a library error wrapping one).
        path: the file or folder concerned (named in the sentence).
        action: what was being done, as a gerund phrase.
        remedy: what to do besides fixing the cause named (e.g. "earlier checkpoints are kept").
    """
    number = error_number(error, path)
    if number in (errno.ENOSPC, errno.EDQUOT):
        cause = f"no space left on the device of {path}"
        fix = "free some space there or pass another --output_dir"
    elif number == errno.EFBIG:
        cause = f"a file in {path} grew past the size limit of this process (ulimit -f)"
        fix = "raise the limit or pass another --output_dir"
    elif number in (errno.EACCES, errno.EPERM):
        cause = f"permission denied on {path}"
        fix = "pass an --output_dir you can write to"
    elif number == errno.EROFS:
        cause = f"{path} is on a read-only file system"
        fix = "pass an --output_dir on a writable one"
    elif number in (errno.EEXIST, errno.ENOTDIR):
        cause = f"{path} (or a folder above it) is a file, not a folder"
        fix = "pass a folder as --output_dir (it is created if missing)"
    else:
        lines = str(error).strip().splitlines() or [""]
        reason = os.strerror(number) if number is not None else f"{type(error).__name__}: {lines[0]}"
        cause = f"{reason.rstrip('.')} ({path})"
        fix = "check the file system"
    return f"{action[:1].upper()}{action[1:]} failed: {cause}; {fix}{'; ' + remedy if remedy else ''}."

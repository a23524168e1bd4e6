"""What a test shows of a training subprocess that failed.

The tests run every subprocess with ``PYTHONFAULTHANDLER=1`` (conftest.py), so a process that crashes
natively (a segmentation fault in a kernel or a collective) prints ``Fatal Python error`` and the Python
stack of each of its threads. Under a launcher (accelerate, torchrun), the other process's traceback
and the launcher's summary follow and push that stack out of the usual tail of stderr: the report keeps
both.
"""

from __future__ import annotations

__all__ = ["failure_report"]

FAULT_MARKER = "Fatal Python error"


def failure_report(stderr: str, tail: int = 3000) -> str:
    """The last ``tail`` characters of ``stderr``, preceded by the first native crash's stack (up to
    ``tail`` characters from its ``Fatal Python error`` line) when that lies before them."""
    start = stderr.find(FAULT_MARKER)
    if start < 0 or start >= len(stderr) - tail:
        return stderr[-tail:]
    return f"{stderr[start:start + tail]}\n[...]\n{stderr[-tail:]}"

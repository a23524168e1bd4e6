"""Progress a person reads: a live bar on a terminal, plain log lines in a log file.

A tqdm bar redraws itself with carriage returns; written to a file (a scheduler's log, ``2> log``)
every redraw stays, and one run leaves a single line of hundreds of kilobytes. So bars are shown
only when stderr is a terminal; elsewhere :class:`TrainingProgress` writes one log line per logging
step (step, loss, images/s, ETA) and :func:`progress_bar` is silent.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import time
import warnings
from collections.abc import Callable, Iterable, Iterator
from typing import Any, TypeVar

from tqdm.auto import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

logger = logging.getLogger(__name__)

__all__ = ["TrainingProgress", "configure_output", "format_duration", "in_notebook", "is_interactive", "output_restored",
           "progress_bar"]

T = TypeVar("T")


def in_notebook() -> bool:
    """Whether this process is a Jupyter kernel (where stderr is no terminal, yet a bar redraws in place)."""
    shell = sys.modules.get("IPython")
    get_ipython = getattr(shell, "get_ipython", None)
    instance = get_ipython() if callable(get_ipython) else None
    return instance is not None and "IPKernelApp" in getattr(instance, "config", {})


def is_interactive() -> bool:
    """Whether progress shows as live bars: stderr is a terminal, or this is a Jupyter notebook
    (``tqdm.auto`` then draws its notebook bar)."""
    stream = sys.stderr
    return (bool(getattr(stream, "isatty", None)) and stream.isatty()) or in_notebook()


def format_duration(seconds: float) -> str:
    """``3725`` -> ``"1 h 02 min"``, ``95`` -> ``"1 min 35 s"``, ``9`` -> ``"9 s"``."""
    seconds = max(0, round(seconds))
    minutes, secs = divmod(seconds, 60)
    hours, minutes = divmod(minutes, 60)
    if hours:
        return f"{hours} h {minutes:02d} min"
    return f"{minutes} min {secs:02d} s" if minutes else f"{secs} s"


def progress_bar(iterable: Iterable[T], *, total: int | None = None, desc: str, unit: str = "it",
                 enabled: bool = True) -> Iterator[T]:
    """``iterable`` with a tqdm bar when ``enabled`` and stderr is a terminal, else unchanged."""
    if not (enabled and is_interactive()):
        yield from iterable
        return
    with tqdm(iterable, total=total, desc=desc, unit=unit, dynamic_ncols=True, leave=False) as bar:
        yield from bar


class TrainingProgress:
    """Progress of the training loop: a tqdm bar on a terminal, else one log line per logging step.

    Args:
        total: planned optimiser steps (may change: :meth:`set_total`).
        initial: the step the loop starts from (resumed runs).
        enabled: False on all processes but the local main one.
        clock: seconds, monotonic (tests pass a fake one).
    """

    def __init__(self, total: int, initial: int = 0, enabled: bool = True,
                 clock: Callable[[], float] = time.perf_counter) -> None:
        self.total = total
        self.step = initial
        self.enabled = enabled
        self.interactive = enabled and is_interactive()
        self._clock = clock
        self._started, self._first_step = clock(), initial
        self._bar: Any = None
        self._redirect: Any = None
        if self.interactive:
            self._bar = tqdm(total=total, initial=initial, desc="DINO", unit="step", dynamic_ncols=True)
            # log lines (k-NN results, checkpoints, warnings) print above the bar, not into it
            self._redirect = logging_redirect_tqdm(tqdm_class=type(self._bar))
            self._redirect.__enter__()

    def update(self, steps: int = 1) -> None:
        self.step += steps
        if self._bar is not None:
            self._bar.update(steps)

    def set_total(self, total: int) -> None:
        self.total = total
        if self._bar is not None:
            self._bar.total = total
            self._bar.refresh()

    def eta_seconds(self) -> float | None:
        """Seconds to the planned end at this process's pace so far (None before the first step)."""
        done = self.step - self._first_step
        if done <= 0:
            return None
        return (self._clock() - self._started) / done * max(self.total - self.step, 0)

    def log_step(self, loss: float | None, learning_rate: float, images_per_second: float) -> None:
        """At a logging step: the bar's postfix on a terminal, else one log line."""
        if not self.enabled:
            return
        loss_text = f"{loss:.4f}" if loss is not None else "nan"
        if self._bar is not None:
            self._bar.set_postfix(loss=loss_text, lr=f"{learning_rate:.2e}", refresh=False)
            return
        eta = self.eta_seconds()
        percent = 100.0 * self.step / max(self.total, 1)
        logger.info("step %d/%d (%.0f%%) | loss %s | %.1f images/s | ETA %s", self.step, self.total, percent,
                    loss_text, images_per_second, format_duration(eta) if eta is not None else "?")

    def close(self) -> None:
        if self._redirect is not None:
            self._redirect.__exit__(None, None, None)
            self._redirect = None
        if self._bar is not None:
            self._bar.close()


def configure_output(main_process: bool) -> None:
    """Logging, warnings and library progress bars of a run or a command, on one process.

    dino_hf's messages at INFO on the main process (errors only elsewhere), libraries' at WARNING;
    Python warnings through logging, on the main process only (the other ranks would repeat each
    one); ``datasets`` and ``transformers`` progress bars off unless asked for
    (``HF_DATASETS_DISABLE_PROGRESS_BARS=0`` in the environment), ``huggingface_hub``'s off outside a
    terminal, so that a log file stays readable.
    """
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S",
                        level=logging.WARNING)
    # The other processes hold the same data plan and model, so their warnings repeat the main one's.
    logging.getLogger("dino_hf").setLevel(logging.INFO if main_process else logging.ERROR)
    logging.captureWarnings(True)  # Python warnings through logging: the same format, once each
    warnings.simplefilter("default" if main_process else "ignore")
    if not main_process:  # the other ranks would repeat every library warning
        for name in ("transformers", "datasets", "accelerate", "huggingface_hub", "py.warnings"):
            logging.getLogger(name).setLevel(logging.ERROR)
    if os.environ.get("HF_DATASETS_DISABLE_PROGRESS_BARS") is None:
        import datasets

        datasets.disable_progress_bars()
    if os.environ.get("HF_HUB_DISABLE_PROGRESS_BARS") is None and not is_interactive():
        import huggingface_hub.utils

        huggingface_hub.utils.disable_progress_bars()  # upload bars in a log file
    import transformers

    transformers.utils.logging.set_verbosity_warning()
    if not main_process:
        transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


#: The loggers :func:`configure_output` sets a level on.
_CONFIGURED_LOGGERS = ("", "dino_hf", "transformers", "datasets", "accelerate", "huggingface_hub", "py.warnings")


@contextlib.contextmanager
def output_restored() -> Iterator[None]:
    """Undo, on exit, what :func:`configure_output` changes: the root logger's handlers and every
    configured logger's level, Python warnings' capture and filters, and the progress-bar settings of
    ``datasets``, ``transformers`` and ``huggingface_hub`` — so that a notebook or a script that trains
    from Python keeps its own logging and bars."""
    import datasets
    import huggingface_hub.utils
    import transformers

    root = logging.getLogger()
    handlers = list(root.handlers)
    levels = {name: logging.getLogger(name).level for name in _CONFIGURED_LOGGERS}
    capturing = getattr(warnings.showwarning, "__module__", "") == "logging"
    datasets_bars = datasets.utils.are_progress_bars_disabled()
    hub_bars = huggingface_hub.utils.are_progress_bars_disabled()
    transformers_bar = transformers.utils.logging.is_progress_bar_enabled()
    transformers_verbosity = transformers.utils.logging.get_verbosity()
    with warnings.catch_warnings():  # restores the filters and showwarning on exit
        try:
            yield
        finally:
            if not capturing:
                logging.captureWarnings(False)
    for handler in list(root.handlers):
        if handler not in handlers:
            root.removeHandler(handler)
    for name, level in levels.items():
        logging.getLogger(name).setLevel(level)
    (datasets.disable_progress_bars if datasets_bars else datasets.enable_progress_bars)()
    (huggingface_hub.utils.disable_progress_bars if hub_bars else huggingface_hub.utils.enable_progress_bars)()
    transformers.utils.logging.set_verbosity(transformers_verbosity)
    if transformers_bar:
        transformers.utils.logging.enable_progress_bar()
    else:
        transformers.utils.logging.disable_progress_bar()

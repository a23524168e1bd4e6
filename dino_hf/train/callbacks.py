"""``transformers.TrainerCallback``s in the DINO loop, with HF's own ``TrainerState`` and ``TrainerControl``.

The loop calls, in this order: ``on_train_begin`` (after set-up and any resume), then per optimiser
step ``on_step_end``, ``on_log`` (with the metrics row, also appended to ``state.log_history``),
``on_evaluate`` (with the k-NN metrics) and ``on_save`` (after a checkpoint), and ``on_train_end``
once the final model is written. Callbacks answer through ``control``:
``control.should_training_stop`` ends the run cleanly after this step (a checkpoint, the evaluation
and the export, as at the planned end) and ``control.should_save`` writes a checkpoint now.

The callbacks receive ``args`` (the run's ``DinoTrainingArguments``), ``state``, ``control`` and as
keyword arguments ``model`` (the unwrapped ``DinoForPreTraining``) plus ``logs`` / ``metrics`` where
HF's ``Trainer`` passes them. transformers' ``CallbackHandler`` is not used: it expects the
``Trainer``'s optimiser and scheduler objects and warns without a ``DefaultFlowCallback``, whose
step-counting rules are the ``Trainer``'s, not this loop's.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

from transformers import TrainerCallback, TrainerControl, TrainerState

__all__ = ["CallbackRunner"]

#: The events the loop calls (a subset of TrainerCallback's).
EVENTS = ("on_train_begin", "on_step_end", "on_log", "on_evaluate", "on_save", "on_train_end")


class CallbackRunner:
    """Calls every callback's event with the run's state and control.

    Args:
        callbacks: ``TrainerCallback`` instances (or classes, instantiated here, as HF's ``Trainer`` allows).
        args: the run's arguments, passed to every call.
        is_world_process_zero, is_local_process_zero: this process's rank facts for ``state``.
    """

    def __init__(self, callbacks: Iterable[TrainerCallback | type[TrainerCallback]] | None, args: Any,
                 is_world_process_zero: bool = True, is_local_process_zero: bool = True) -> None:
        self.callbacks: list[TrainerCallback] = []
        for callback in callbacks or ():
            instance = callback() if isinstance(callback, type) else callback
            if not isinstance(instance, TrainerCallback):
                raise ValueError(f"callbacks must be transformers.TrainerCallback instances, not {type(instance).__name__}.")
            self.callbacks.append(instance)
        self.args = args
        self.state = TrainerState(is_world_process_zero=is_world_process_zero,
                                  is_local_process_zero=is_local_process_zero)
        self.control = TrainerControl()

    def __bool__(self) -> bool:
        return bool(self.callbacks)

    def update_state(self, step: int, max_steps: int, steps_per_epoch: float) -> None:
        """The step counters every event sees."""
        self.state.global_step = step
        self.state.max_steps = max_steps
        self.state.epoch = step / steps_per_epoch if steps_per_epoch and math.isfinite(steps_per_epoch) else None

    def event(self, name: str, **kwargs: Any) -> TrainerControl:
        """Call ``name`` on every callback; a callback that returns a ``TrainerControl`` replaces it."""
        for callback in self.callbacks:
            result = getattr(callback, name)(self.args, self.state, self.control, **kwargs)
            if isinstance(result, TrainerControl):
                self.control = result
        return self.control

    def log(self, row: dict[str, Any], **kwargs: Any) -> None:
        """A metrics row: into ``state.log_history``, then ``on_log``."""
        self.state.log_history.append(dict(row))
        self.event("on_log", logs=dict(row), **kwargs)

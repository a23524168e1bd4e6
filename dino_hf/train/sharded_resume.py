"""Resuming an FSDP2 optimiser whose checkpoint has no state for some parameters.

torch's optimisers create a parameter's state (AdamW's moments and step count) at its first gradient, so
a checkpoint holds none for a parameter that has had no gradient yet: the prototype layer during its
frozen first steps, or a DINOv2's own mask token in a run without iBOT (no patch is masked, so it never
gets one). accelerate loads an FSDP2 optimiser with ``torch.distributed.checkpoint``: it asks torch for
the fresh optimiser's state dict, which creates state for every parameter that requires gradients (a
zero-gradient step at learning rate 0), loads the checkpoint into it, and hands it to
``set_optimizer_state_dict``. Both steps refuse a parameter that requires gradients and has no state in
the checkpoint ("Missing key in checkpoint state_dict", "Missing optimizer state for parameter").

:func:`sharded_optimizer_resume` turns ``requires_grad`` off, for the length of the load, on exactly the
parameters the checkpoint has no state for: torch then neither creates nor expects their state. They
come out of the load without state, as in the interrupted run, so the resumed run goes on bit-identical.
(Without sharding, ``Optimizer.load_state_dict`` takes a checkpoint that lacks some state as it is.)
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType

__all__ = ["sharded_optimizer_resume"]

#: Name components that wrappers insert in a parameter's name but that are not part of the fully qualified
#: name torch's distributed state dicts use (torch.compile, activation checkpointing, FSDP1).
_WRAPPER_NAMES = frozenset({"_orig_mod", "_checkpoint_wrapped_module", "_fsdp_wrapped_module"})
_STATE_PREFIX = "optimizer.state."


@contextlib.contextmanager
def sharded_optimizer_resume(accelerator: Accelerator, path: Path, model: torch.nn.Module,
                             optimizer: torch.optim.Optimizer) -> Iterator[None]:
    """Around ``accelerator.load_state(path)``: under FSDP with a sharded optimiser state (the checkpoint's
    ``optimizer_0`` folder), the parameters of ``optimizer`` that have no state in it do not require
    gradients until the block ends. ``model`` holds the parameters of ``optimizer`` (the unwrapped model:
    FSDP2 shards it in place, so its parameters are the optimiser's). Nothing changes without FSDP or when
    the checkpoint has state for every parameter."""
    folder = Path(path) / "optimizer_0"  # accelerate's folder of the first (the run's only) optimiser
    stateless: list[torch.nn.Parameter] = []
    if accelerator.distributed_type == DistributedType.FSDP and folder.is_dir():
        saved = _parameters_with_state(folder)
        name_of = {id(parameter): _fully_qualified(name) for name, parameter in model.named_parameters()}
        stateless = [parameter for group in optimizer.param_groups for parameter in group["params"]
                     if parameter.requires_grad and name_of.get(id(parameter)) not in saved]
    for parameter in stateless:
        parameter.requires_grad_(False)
    try:
        yield
    finally:
        for parameter in stateless:
            parameter.requires_grad_(True)


def _parameters_with_state(folder: Path) -> set[str]:
    """Fully qualified names of the parameters with optimiser state in a DCP checkpoint folder."""
    from torch.distributed.checkpoint import FileSystemReader

    keys = FileSystemReader(str(folder)).read_metadata().state_dict_metadata
    # "optimizer.state.<parameter name>.<state name>"; the state names (exp_avg, step...) have no dot
    return {key[len(_STATE_PREFIX):].rsplit(".", 1)[0] for key in keys if key.startswith(_STATE_PREFIX)}


def _fully_qualified(name: str) -> str:
    """A parameter's name without the components that wrappers add."""
    return ".".join(part for part in name.split(".") if part not in _WRAPPER_NAMES)

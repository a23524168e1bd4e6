"""The precision rule of every loss: probability math in at least float32, also under autocast.

Logits arrive in bf16 or fp16 under mixed precision; a softmax over ``K = 65536`` prototypes, a log
of a small probability or KoLeo's ``eps = 1e-8`` would round away in half precision. So each loss
upcasts its inputs to :func:`compute_dtype` (float32, float64 inputs stay float64) and computes
inside :func:`full_precision`, where autocast cannot downcast the matmuls and reductions again.
"""

from __future__ import annotations

import contextlib

import torch
from torch import Tensor


def full_precision(device: torch.device) -> contextlib.AbstractContextManager:
    """A context that switches autocast off on ``device`` (a no-op where autocast does not exist)."""
    if torch.amp.is_autocast_available(device.type):
        return torch.autocast(device_type=device.type, enabled=False)
    return contextlib.nullcontext()


def compute_dtype(*tensors: Tensor) -> torch.dtype:
    """float32, or float64 when any input is float64: never half precision."""
    dtype = torch.float32
    for tensor in tensors:
        dtype = torch.promote_types(dtype, tensor.dtype)
    return dtype

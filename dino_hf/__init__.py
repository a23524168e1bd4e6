"""dino_hf: self-supervised DINO pre-training of vision backbones on the Hugging Face stack.

Public names are imported lazily so that ``import dino_hf`` stays cheap (a data-loader worker or
a command-line ``--help`` does not pay for importing transformers).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# public name -> submodule that defines it
_LAZY_EXPORTS = {
    "DinoConfig": "configuration_dino",
    "DinoForPreTraining": "modeling_dino",
    "DinoForPreTrainingOutput": "modeling_dino",
    "DinoHead": "modeling_dino",
    "DinoLoss": "loss",
    "IBOTPatchLoss": "loss",
    "KoLeoLoss": "loss",
    "MaskingGenerator": "masking",
    "DinoSchedules": "schedules",
    "MultiCropAugmentation": "augmentation",
    "create_train_dataloader": "data",
    "load_image_dataset": "data",
    "DinoTrainingArguments": "training_args",
}

__all__ = [
    "DinoConfig",
    "DinoForPreTraining",
    "DinoForPreTrainingOutput",
    "DinoHead",
    "DinoLoss",
    "DinoSchedules",
    "DinoTrainingArguments",
    "IBOTPatchLoss",
    "KoLeoLoss",
    "MaskingGenerator",
    "MultiCropAugmentation",
    "create_train_dataloader",
    "load_image_dataset",
]

if TYPE_CHECKING:  # pragma: no cover - for static analysers only
    from .augmentation import MultiCropAugmentation
    from .configuration_dino import DinoConfig
    from .data import create_train_dataloader, load_image_dataset
    from .loss import DinoLoss, IBOTPatchLoss, KoLeoLoss
    from .masking import MaskingGenerator
    from .modeling_dino import DinoForPreTraining, DinoForPreTrainingOutput, DinoHead
    from .schedules import DinoSchedules
    from .training_args import DinoTrainingArguments


def __getattr__(name: str) -> Any:
    module_name = _LAZY_EXPORTS.get(name)
    if module_name is None:
        raise AttributeError(f"module 'dino_hf' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module_name}", __name__), name)
    globals()[name] = value  # cache: later look-ups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted(list(globals()) + __all__)

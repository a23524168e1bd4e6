"""dino_hf: self-supervised DINO pre-training of vision backbones on the Hugging Face stack.

``import dino_hf`` registers ``DinoConfig`` and ``DinoForPreTraining`` with ``transformers``'
``AutoConfig``, ``AutoModel`` and ``AutoModelForPreTraining``, so that a run folder or a pushed
``DinoForPreTraining`` loads with the auto classes. transformers has no lazy registration (its auto
mappings hold classes, and even ``PreTrainedConfig`` imports torch), so this imports torch and the
model code: 5-7 s on a busy 2-core machine, against 5 ms before (``python -X importtime -c
"import dino_hf"``). A post-import hook on transformers' auto module would defer it, but fires inside
transformers' own imports (``modeling_utils`` half-initialised): not worth the fragility. The other
public names are still imported on first use.
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


# The registration (AutoConfig, AutoModel, AutoModelForPreTraining) runs at the end of modeling_dino.
importlib.import_module(".modeling_dino", __name__)


def __getattr__(name: str) -> Any:
    module_name = _LAZY_EXPORTS.get(name)
    if module_name is None:
        raise AttributeError(f"module 'dino_hf' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module_name}", __name__), name)
    globals()[name] = value  # cache: later look-ups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted(list(globals()) + __all__)

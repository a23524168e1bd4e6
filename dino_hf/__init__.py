"""dino_hf: self-supervised DINO pre-training of vision backbones on the Hugging Face stack.

The package in subpackages that import downhill only (README, "Layout"):
``cli -> train -> eval -> hub -> models -> losses / data -> base`` (``errors``, ``progress``,
``run_folder``).

``import dino_hf`` registers ``DinoConfig`` and ``DinoForPreTraining`` with ``transformers``'
``AutoConfig``, ``AutoModel`` and ``AutoModelForPreTraining``, so that a run folder or a pushed
``DinoForPreTraining`` loads with the auto classes. transformers has no lazy registration (its auto
mappings hold classes), so this imports torch and the model code; the other public names are
imported on first use.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.2.0"

# public name -> submodule that defines it
_LAZY_EXPORTS = {
    "DinoConfig": "models.configuration_dino",
    "DinoForPreTraining": "models.modeling_dino",
    "DinoForPreTrainingOutput": "models.modeling_dino",
    "DinoHead": "models.modeling_dino",
    "DinoLoss": "losses.dino",
    "IBOTPatchLoss": "losses.ibot",
    "KoLeoLoss": "losses.koleo",
    "MaskingGenerator": "data.masking",
    "DinoSchedules": "train.schedules",
    "MultiCropAugmentation": "data.augmentation",
    "create_train_dataloader": "data.loader",
    "load_image_dataset": "data.streaming",
    "DinoTrainingArguments": "train.arguments",
    "DinoTrainer": "train.trainer",
    "TrainingResult": "train.loop",
}

__all__ = [
    "DinoConfig",
    "DinoForPreTraining",
    "DinoForPreTrainingOutput",
    "DinoHead",
    "DinoLoss",
    "DinoSchedules",
    "DinoTrainer",
    "DinoTrainingArguments",
    "TrainingResult",
    "IBOTPatchLoss",
    "KoLeoLoss",
    "MaskingGenerator",
    "MultiCropAugmentation",
    "create_train_dataloader",
    "load_image_dataset",
]

if TYPE_CHECKING:  # pragma: no cover - for static analysers only
    from dino_hf.data.augmentation import MultiCropAugmentation
    from dino_hf.data.loader import create_train_dataloader
    from dino_hf.data.masking import MaskingGenerator
    from dino_hf.data.streaming import load_image_dataset
    from dino_hf.losses.dino import DinoLoss
    from dino_hf.losses.ibot import IBOTPatchLoss
    from dino_hf.losses.koleo import KoLeoLoss
    from dino_hf.models.configuration_dino import DinoConfig
    from dino_hf.models.modeling_dino import DinoForPreTraining, DinoForPreTrainingOutput, DinoHead
    from dino_hf.train.arguments import DinoTrainingArguments
    from dino_hf.train.loop import TrainingResult
    from dino_hf.train.schedules import DinoSchedules
    from dino_hf.train.trainer import DinoTrainer


# The registration (AutoConfig, AutoModel, AutoModelForPreTraining) runs at the end of modeling_dino.
importlib.import_module(".models.modeling_dino", __name__)


def __getattr__(name: str) -> Any:
    module_name = _LAZY_EXPORTS.get(name)
    if module_name is None:
        raise AttributeError(f"module 'dino_hf' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module_name}", __name__), name)
    globals()[name] = value  # cache: later look-ups skip __getattr__
    return value


def __dir__() -> list[str]:
    # The public names only: not this module's own imports (importlib, typing's names).
    return sorted([*__all__, "__version__"])

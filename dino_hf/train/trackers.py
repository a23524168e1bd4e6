"""Experiment trackers: which ones ``--report_to`` names, and how each receives pictures.

Every tracker accelerate knows (``accelerate.utils.LoggerType``: aim, tensorboard, wandb, trackio,
comet_ml, mlflow, clearml, dvclive, swanlab) is passed through to ``Accelerator(log_with=...)``;
``all`` means every one installed (as in the ``transformers`` example scripts), ``none`` none.
Scalars go through ``Accelerator.log``; pictures (the attention grids) need each tracker's own
format, which :func:`log_images` supplies.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
from PIL import Image

logger = logging.getLogger(__name__)

__all__ = ["TRACKER_EXTRAS", "known_tracker_names", "log_images", "parse_report_to", "resolve_report_to"]

#: Trackers with a dino_hf extra (``pip install 'dino_hf[NAME]'``); the others install by package name.
TRACKER_EXTRAS = ("tensorboard", "wandb", "trackio", "mlflow")
#: Package that provides each tracker (for the install hint).
_PACKAGES = {"tensorboard": "tensorboard", "comet_ml": "comet_ml", "dvclive": "dvclive", "clearml": "clearml",
             "swanlab": "swanlab", "aim": "aim", "wandb": "wandb", "trackio": "trackio", "mlflow": "mlflow"}


def known_tracker_names() -> list[str]:
    """The tracker names accelerate accepts in ``log_with`` (without ``all``), in its order."""
    from accelerate.utils import LoggerType

    return [member.value for member in LoggerType if member.value != "all"]


def parse_report_to(values: Iterable[str] | str | None) -> list[str]:
    """``--report_to`` values as lower-case names: items may be comma-separated; ``none`` and empty
    items are dropped (so ``["none"]`` is ``[]``), ``all`` is kept.

    Raises:
        ValueError: a name accelerate does not know (one sentence listing the choices).
    """
    if values is None:
        return []
    if isinstance(values, str):
        values = [values]
    names: list[str] = []
    for value in values:
        for name in str(value).replace(",", " ").split():
            name = name.strip().lower()
            if name and name != "none" and name not in names:
                names.append(name)
    known = known_tracker_names()
    for name in names:
        if name != "all" and name not in known:
            raise ValueError(
                f"--report_to {name} is not a tracker accelerate knows; choose all, none or any of {', '.join(known)}."
            )
    if "all" in names and len(names) > 1:
        raise ValueError("--report_to all already means every installed tracker: pass it alone.")
    return names


def resolve_report_to(values: Iterable[str] | str | None) -> list[str]:
    """The trackers to start: :func:`parse_report_to`, ``all`` expanded to the installed ones.

    Raises:
        ValueError: a named tracker whose package is not installed (the sentence says what to install).
    """
    from accelerate.tracking import get_available_trackers

    names = parse_report_to(values)
    available = [str(getattr(tracker, "value", tracker)) for tracker in get_available_trackers()]
    if names == ["all"]:
        return available
    for name in names:
        if name not in available:
            extra = f"pip install 'dino_hf[{name}]'" if name in TRACKER_EXTRAS else f"pip install {_PACKAGES[name]}"
            raise ValueError(f"--report_to {name} needs the {_PACKAGES[name]} package ({extra}), or pass --report_to none.")
    return names


def _arrays(images: Sequence[Image.Image]) -> list[np.ndarray]:
    return [np.asarray(image.convert("RGB"), dtype=np.uint8) for image in images]


def log_images(trackers: Iterable[Any], key: str, images: Sequence[Image.Image], step: int) -> None:
    """Send ``images`` (RGB pictures) to every tracker under ``key``, each in its own format.

    - TensorBoard: one ``(N, H, W, 3)`` uint8 array (``dataformats="NHWC"``) when the pictures share
      a size, shown as one grid; else one array per picture (``key/image{i}``).
    - W&B and SwanLab: a list of PIL images (their accelerate trackers wrap them).
    - trackio, MLflow, Comet, DVCLive, Aim, ClearML: one picture at a time through the library's own
      image call (accelerate gives trackio and MLflow none).

    A tracker that fails is logged and skipped: pictures must never stop training.
    """
    if not images:
        return
    for tracker in trackers:
        try:
            _log_to(tracker, key, list(images), step)
        except Exception as error:  # noqa: BLE001 - a tracker hiccup must not stop training
            logger.warning("Could not send %s images to %s: %s", key, getattr(tracker, "name", tracker), error)


def _log_to(tracker: Any, key: str, images: list[Image.Image], step: int) -> None:
    name = getattr(tracker, "name", "")
    arrays = _arrays(images)
    numbered = [(f"{key}/image{index}", image, array) for index, (image, array) in enumerate(zip(images, arrays, strict=True))]
    if name == "tensorboard":
        if len({array.shape for array in arrays}) == 1:
            tracker.log_images({key: np.stack(arrays)}, step=step, dataformats="NHWC")
        else:
            tracker.log_images({tag: array[None] for tag, _, array in numbered}, step=step, dataformats="NHWC")
    elif name in ("wandb", "swanlab"):
        tracker.log_images({key: images}, step=step)
    elif name == "trackio":
        import trackio

        tracker.log({tag: trackio.Image(image) for tag, image, _ in numbered}, step=step)
    elif name == "mlflow":
        import mlflow

        for tag, image, _ in numbered:
            mlflow.log_image(image, key=tag.replace("/", "_"), step=step)
    elif name == "comet_ml":
        for tag, image, _ in numbered:
            tracker.tracker.log_image(image, name=tag, step=step)
    elif name == "dvclive":
        for tag, image, _ in numbered:
            tracker.live.log_image(f"{tag.replace('/', '_')}_step{step}.png", image)
    elif name == "aim":
        for tag, image, _ in numbered:
            tracker.log_images({tag: image}, step=step)
    elif name == "clearml":
        for tag, _, array in numbered:
            tracker.log_images({tag: array}, step=step)
    elif hasattr(tracker, "log_images"):  # a custom GeneralTracker: accelerate's documented list of pictures
        tracker.log_images({key: images}, step=step)

"""Loading a trained or downloaded backbone for the tools (evaluation, embeddings, attention maps,
push): from an exported backbone folder, a Hub id, a training run's ``--output_dir`` or a
``DinoForPreTraining`` folder, with the image processor it was trained with.
"""

from __future__ import annotations

import contextlib
import inspect
import json
import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from torch import nn
from transformers import AutoConfig, AutoImageProcessor, AutoModel, PreTrainedConfig, ViTImageProcessor
from transformers.models.auto.modeling_auto import MODEL_MAPPING

from dino_hf.base.run_folder import BACKBONE_DIRNAME, CHECKPOINTS_DIRNAME, CONFIG_NAME
from dino_hf.models.backbones import SUPPORTED_MODEL_TYPES, build_image_processor, config_image_size, family_of
from dino_hf.models.configuration_dino import DinoConfig
from dino_hf.models.modeling_dino import DinoForPreTraining

logger = logging.getLogger(__name__)

__all__ = ["NETWORKS", "backbone_config_of", "load_backbone", "load_image_processor", "resolve_backbone_source"]

#: Which network of a DINO model a tool uses: the teacher (the official evaluation's choice) or the student.
NETWORKS = ("teacher", "student")


def resolve_backbone_source(model_name_or_path: str | Path, which: str = "teacher",
                            revision: str | None = None) -> tuple[str, bool]:
    """Where a tool finds the backbone it was pointed at: ``(path or Hub id, is a DinoForPreTraining)``.

    - an exported backbone folder or Hub id: itself (the teacher; ``which="student"`` is refused);
    - a training run's ``--output_dir``: its exported ``backbone/`` for the teacher, the full
      ``DinoForPreTraining`` at its root for the student;
    - a ``DinoForPreTraining`` folder or Hub id (``config.json`` of model type ``dino_hf``): itself.

    Raises:
        ValueError: unknown ``which``; a student asked of an exported backbone; a run folder without a
            model yet. OSError from transformers for a path or id that holds no model.
    """
    if which not in NETWORKS:
        raise ValueError(f"--which must be teacher or student, not {which!r}.")
    path = Path(os.path.expanduser(str(model_name_or_path)))
    if path.is_dir():
        exported = path / BACKBONE_DIRNAME
        model_type = _local_model_type(path)
        if which == "teacher" and (exported / CONFIG_NAME).is_file():
            return str(exported), False
        if model_type == DinoConfig.model_type:
            return str(path), True
        if model_type is None:
            hint = " (a run still training has no model until it ends)" if (path / CHECKPOINTS_DIRNAME).is_dir() else ""
            raise ValueError(f"{model_name_or_path} holds no config.json{hint}: pass an exported backbone, a finished "
                             "run's --output_dir or a DinoForPreTraining folder.")
        is_dino = False
    else:
        is_dino = AutoConfig.from_pretrained(str(model_name_or_path), revision=revision).model_type == DinoConfig.model_type
    if which == "student" and not is_dino:
        raise ValueError(f"{model_name_or_path} is an exported backbone (the teacher only): --which student needs a "
                         "run's --output_dir or a DinoForPreTraining folder.")
    return str(model_name_or_path), is_dino


def _local_model_type(folder: Path) -> str | None:
    config_file = folder / CONFIG_NAME
    if not config_file.is_file():
        return None
    try:
        return str(json.loads(config_file.read_text(encoding="utf-8")).get("model_type", ""))
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise ValueError(f"{config_file} is not valid JSON.") from None


def load_backbone(
    model_name_or_path: str | Path,
    *,
    attn_implementation: str | None = None,
    revision: str | None = None,
    which: str = "teacher",
) -> nn.Module:
    """Load a backbone with ``transformers.AutoModel`` (in eval mode).

    A backbone of a family dino_hf trains is loaded with its family's arguments
    (:meth:`dino_hf.models.backbones.BackboneFamily.from_pretrained_kwargs`: an export with the identity
    pooler as it is, a ViT without one with ``add_pooling_layer=False``); another model class that accepts
    ``add_pooling_layer`` gets ``False``, so that no randomly initialised pooler is created.

    Args:
        model_name_or_path: a folder written by ``save_backbone`` / ``save_pretrained``, a Hub id, a
            training run's ``--output_dir`` or a ``DinoForPreTraining`` folder
            (:func:`resolve_backbone_source`).
        attn_implementation: e.g. ``"eager"`` to be able to return attention weights.
        revision: Hub revision (branch, tag or commit).
        which: ``"teacher"`` or ``"student"`` network of a DINO model.
    Raises:
        OSError / ValueError from transformers when the path or id does not hold a model.
    """
    model_name_or_path, is_dino = resolve_backbone_source(model_name_or_path, which, revision)
    if is_dino:
        backbone = getattr(DinoForPreTraining.from_pretrained(model_name_or_path, revision=revision), which).backbone
        if attn_implementation is not None:
            backbone.set_attn_implementation(attn_implementation)
        return backbone.eval()
    config = AutoConfig.from_pretrained(model_name_or_path, revision=revision)
    kwargs: dict[str, Any] = {"revision": revision}
    if attn_implementation is not None:
        kwargs["attn_implementation"] = attn_implementation
    if config.model_type in SUPPORTED_MODEL_TYPES:  # the family's own call: nothing missing, unexpected or random
        kwargs.update(family_of(config).from_pretrained_kwargs(config))
    else:
        model_class = MODEL_MAPPING[type(config)] if type(config) in MODEL_MAPPING else None
        if model_class is not None and "add_pooling_layer" in inspect.signature(model_class.__init__).parameters:
            kwargs["add_pooling_layer"] = False
    model = AutoModel.from_pretrained(model_name_or_path, config=config, **kwargs)
    return model.eval()


def backbone_config_of(model_name_or_path: str | Path, which: str = "teacher",
                           revision: str | None = None) -> PreTrainedConfig:
    """The backbone config of what a tool was pointed at (:func:`resolve_backbone_source`), without loading
    weights: an exported backbone's ``config.json``, or a DinoForPreTraining's ``backbone_config``."""
    source, is_dino = resolve_backbone_source(model_name_or_path, which, revision)
    config = AutoConfig.from_pretrained(source, revision=revision)
    return config.backbone_config if is_dino else config


def load_image_processor(
    model_name_or_path: str | Path | None,
    backbone_config: PreTrainedConfig,
    image_size: int | None = None,
    *,
    revision: str | None = None,
    image_processor: Mapping[str, Any] | None = None,
) -> Any:
    """The image processor that evaluation feeds the backbone with.

    The model's own ``AutoImageProcessor`` when it has one (:func:`save_backbone` writes one), or the
    ``image_processor`` dict a backbone in training came with; otherwise what :func:`save_backbone`
    would write for ``backbone_config``.

    Args:
        image_size: overrides the processor's output resolution (square ``image_size`` px; processors
            that resize the shorter side then centre-crop keep their resize / crop ratio).
    """
    processor = None
    if image_processor is not None:
        processor = _processor_from_dict(image_processor)
    elif model_name_or_path is not None:
        # a run folder's exported backbone/ holds the processor; a DinoForPreTraining folder has none
        with contextlib.suppress(ValueError, OSError):
            model_name_or_path = resolve_backbone_source(model_name_or_path, revision=revision)[0]
        try:
            processor = AutoImageProcessor.from_pretrained(model_name_or_path, revision=revision)
        except (OSError, ValueError, KeyError) as error:
            logger.info("No image processor with %s (%s); using ImageNet mean/std.", model_name_or_path, error)
    if processor is None:
        return build_image_processor(image_size or config_image_size(backbone_config))
    if image_size is not None:
        _set_processor_size(processor, image_size)
    return processor


def _processor_from_dict(values: Mapping[str, Any]) -> Any:
    """An image processor from its ``to_dict()`` (the class named by ``image_processor_type``)."""
    import transformers

    processor_class = getattr(transformers, str(values.get("image_processor_type", "")), None)
    if processor_class is None:
        processor_class = ViTImageProcessor
    return processor_class.from_dict(dict(values))


def _set_processor_size(processor: Any, image_size: int) -> None:
    """Make ``processor`` output ``image_size`` x ``image_size`` images (in place)."""
    size = processor.size
    get = size.get if isinstance(size, Mapping) else lambda key: getattr(size, key, None)
    crop_size = getattr(processor, "crop_size", None)
    shortest_edge = get("shortest_edge")
    if get("height") is not None:
        processor.size = {"height": image_size, "width": image_size}
    elif shortest_edge is not None:
        ratio = 1.0
        if crop_size is not None and getattr(processor, "do_center_crop", False):
            crop_get = crop_size.get if isinstance(crop_size, Mapping) else lambda key: getattr(crop_size, key)
            ratio = shortest_edge / crop_get("height")
        processor.size = {"shortest_edge": round(image_size * ratio)}
    else:
        processor.size = {"height": image_size, "width": image_size}
    if crop_size is not None:
        processor.crop_size = {"height": image_size, "width": image_size}

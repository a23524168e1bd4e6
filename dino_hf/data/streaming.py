"""Streaming image data for DINO: any ``datasets`` source in, crop-major multi-crop batches out.

Pipeline (per process)::

    load_image_dataset (streaming by default)
      -> keep the image column, undecoded            (bytes are decoded once, by us, so bad images are caught)
      -> shard order shuffled by seed and epoch      (datasets' shard shuffling, exact on resume)
      -> split_dataset_by_node(rank, world_size)     (by shard when shards % processes == 0)
      -> DataLoader workers, one slice of shards each (datasets' own worker split)
      -> shuffle buffer of ``shuffle_buffer_size``   (fill, permute, drain: see below)
      -> decode, skip and count bad images, augment, batch  (inside the worker)

With ``working_size`` instead of an augmentation (``--augmentation_device cpu|cuda``), workers only
decode: each image is shrunk to fit ``working_size`` (aspect kept) and pasted at the top-left of a
``working_size`` square, and batches are ``{"images": (B, 3, S, S) uint8, "image_sizes": (B, 2)}``
for :class:`dino_hf.data.batched_augmentation.BatchedMultiCropAugmentation` on the training device.

The loader that runs this per process, with exact resumption, is :mod:`dino_hf.data.loader`.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

__all__ = ["PREPARE_HINT", "count_local_examples", "detect_image_column", "load_image_dataset", "looks_like_local_path"]

_IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp"}


# --------------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------------
def _builder_for_file(path: str) -> str | None:
    lowered = path.lower()
    if lowered.endswith(".parquet"):
        return "parquet"
    if lowered.endswith(".tar"):
        return "webdataset"
    if Path(lowered).suffix in _IMAGE_EXTENSIONS:
        return "imagefolder"
    return None


#: Top folders that, in this project, always mean local data (the Makefile's DATA_DIR, the recipes'
#: ``data/fashion_mnist``): a missing ``data/x`` is a dataset not prepared yet, not a Hub id.
_LOCAL_TOP_FOLDERS = ("data",)
#: What to run when a dataset the project prepares itself is missing.
PREPARE_HINT = (
    "for Fashion-MNIST run `make demo` or `python scripts/prepare_fashion_mnist.py --output_dir data/fashion_mnist`"
)


def looks_like_local_path(name: str) -> bool:
    """Whether ``name`` is meant as a local path rather than a Hub id (``name`` or ``owner/name``).

    Path syntax (``/``, ``./``, ``../``, ``~``, more than one ``/``, a file suffix, a glob) is local, and
    so is ``owner/name`` whose ``owner`` is an existing local folder or one of :data:`_LOCAL_TOP_FOLDERS`:
    such a path is never sent to the Hub, whose retries would take half a minute to say it is not there.
    """
    first = name.split("/", 1)[0]
    return (
        name.startswith(("/", "./", "../", "~"))
        or name.rstrip("/").count("/") > 1
        or _builder_for_file(name) is not None
        or "*" in name
        or ("/" in name.rstrip("/") and (os.path.isdir(first) or first in _LOCAL_TOP_FOLDERS))
    )


def detect_image_column(dataset: Any, image_column: str | None, dataset_name: str = "the dataset") -> str:
    """The image column: ``image_column`` when given (checked), else ``image``, ``img``, or the first
    column of the ``datasets.Image`` type, as the ``transformers`` example scripts look for it.

    A streamed dataset whose columns are unknown before reading keeps ``image_column`` or ``"image"``.

    Raises:
        ValueError: the given column is missing, or no column looks like images (the sentence lists them).
    """
    from datasets import Image as ImageFeature

    features = getattr(dataset, "features", None) or {}
    columns = getattr(dataset, "column_names", None) or list(features)
    if image_column is not None:
        if columns and image_column not in columns:
            raise ValueError(
                f"Image column {image_column!r} is not in dataset {dataset_name!r}, whose columns are "
                f"{', '.join(repr(c) for c in columns)}; pass one of them with --image_column."
            )
        return image_column
    if not columns:
        return "image"
    for candidate in ("image", "img"):
        if candidate in columns:
            return candidate
    for column in columns:
        if isinstance(features.get(column), ImageFeature):
            return column
    raise ValueError(
        f"Dataset {dataset_name!r} has no column 'image', 'img' or of the Image type (its columns are "
        f"{', '.join(repr(c) for c in columns)}); pass the one that holds the images with --image_column."
    )


def load_image_dataset(
    dataset_name: str,
    dataset_config_name: str | None = None,
    split: str = "train",
    streaming: bool = True,
    hub_options: Mapping[str, Any] | None = None,
) -> Any:
    """Load an image dataset split as a ``datasets`` ``IterableDataset`` (streaming) or ``Dataset``.

    ``hub_options``: ``token`` and ``cache_dir`` for ``datasets.load_dataset`` (``None`` values dropped).

    ``dataset_name`` may be:

    - a local folder: ``datasets`` infers the format from the files it holds (images -> imagefolder,
      with labels from sub-folder names; ``*.parquet`` -> parquet; ``*.tar`` -> webdataset) and the
      splits from file names (``train-00000-of-00004.parquet``, ``train/`` ...);
    - a ``*.parquet`` or ``*.tar`` file or glob pattern (its content becomes ``split``);
    - a Hub dataset id (``dataset_config_name`` selects the configuration).

    Raises:
        ValueError: one sentence naming ``--dataset_name`` when the dataset cannot be found.
    """
    import datasets

    expanded = os.path.expanduser(dataset_name)
    options = {key: value for key, value in (hub_options or {}).items() if value is not None}
    try:
        if os.path.isdir(expanded):
            return datasets.load_dataset(expanded, dataset_config_name, split=split, streaming=streaming, **options)
        builder = _builder_for_file(expanded)
        if builder in ("parquet", "webdataset") and (os.path.isfile(expanded) or "*" in expanded):
            return datasets.load_dataset(builder, data_files={split: expanded}, split=split, streaming=streaming, **options)
        if looks_like_local_path(dataset_name) and not os.path.exists(expanded):
            raise ValueError(
                f"--dataset_name {dataset_name} does not exist (a local path, so it is not looked up on the Hub); "
                f"{PREPARE_HINT}, or pass an existing folder, parquet/webdataset files or a Hub dataset id."
            )
        return datasets.load_dataset(dataset_name, dataset_config_name, split=split, streaming=streaming, **options)
    except ConnectionError as error:
        raise ValueError(
            f"Dataset {dataset_name!r} is not a local path and the Hub could not be reached ({error}); pass a local "
            "image folder or parquet/webdataset files with --dataset_name, or allow network access."
        ) from error
    except (FileNotFoundError, datasets.exceptions.DatasetNotFoundError) as error:
        raise ValueError(
            f"Dataset {dataset_name!r} was not found: --dataset_name must be a local image folder, a folder or "
            f"file of parquet or webdataset (.tar) shards, or a Hub dataset id ({type(error).__name__}: {error})."
        ) from error


def count_local_examples(dataset_name: str, dataset_config_name: str | None, split: str) -> int | None:
    """Number of examples of a local parquet / imagefolder split without reading the data, else None."""
    import datasets

    expanded = os.path.expanduser(dataset_name)
    try:
        if os.path.isfile(expanded):
            files = [expanded]
        elif os.path.isdir(expanded):
            builder = datasets.load_dataset_builder(expanded, dataset_config_name)
            files = list(builder.config.data_files[split])
        else:
            return None
        if files and all(str(f).lower().endswith(".parquet") for f in files):
            import pyarrow.parquet as pq

            return sum(pq.read_metadata(str(f)).num_rows for f in files)
        if files and all(Path(str(f)).suffix.lower() in _IMAGE_EXTENSIONS for f in files):
            return len(files)
    except Exception:  # noqa: BLE001 - a count is a nicety; never fail loading for it
        return None
    return None

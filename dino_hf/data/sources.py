"""What a user may hand over as images, opened as one ``datasets`` split.

- a name: a Hub dataset id, a local image folder, parquet or webdataset files
  (:func:`dino_hf.data.streaming.load_image_dataset`), or a folder written by ``save_to_disk``;
- a ``datasets.Dataset`` or ``IterableDataset`` (used as it is) or a ``DatasetDict`` /
  ``IterableDatasetDict`` (the split named by the arguments);
- a ``torch.utils.data.Dataset`` (map-style: ``__len__`` and ``__getitem__``) whose items are images
  (PIL images, ``(3, H, W)`` / ``(H, W, 3)`` arrays or tensors, encoded bytes, paths) or dicts holding
  one under ``image`` / ``img`` (other keys, e.g. ``label``, are kept);
- a mapping of split names to any of these (``{"train": ..., "test": ...}``), for evaluation.

Every kind then goes the same way through the loader (:mod:`dino_hf.data.loader`): sharded over
processes and loader workers, bad images skipped and counted, an exactly resumable position. A torch
dataset becomes an ``IterableDataset`` whose shards are contiguous index ranges of it, read in the
loader workers (the dataset object itself is not copied into Arrow).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dino_hf.data.streaming import count_local_examples, load_image_dataset

__all__ = ["OpenedImages", "describe_image_source", "is_named_source", "open_image_source"]

#: Shards of a torch dataset's index range: enough for several processes x workers, none empty.
TORCH_DATASET_SHARDS = 64
#: Files ``save_to_disk`` writes next to the Arrow data (a Dataset, a DatasetDict).
_SAVED_DATASET_FILES = ("state.json", "dataset_dict.json")


@dataclass(frozen=True)
class OpenedImages:
    """One split opened for reading: the dataset, its size when known and what to call it in messages."""

    dataset: Any  # datasets.Dataset or datasets.IterableDataset
    num_examples: int | None
    description: str


def is_named_source(source: Any) -> bool:
    """Whether ``source`` is a name or path (what ``--dataset_name`` takes) rather than an object."""
    return isinstance(source, (str, os.PathLike))


def describe_image_source(source: Any) -> str:
    """A short name for messages and records: the name itself, else the object's kind and size."""
    if is_named_source(source):
        return os.fspath(source)
    size = _length(source)
    kind = f"{type(source).__module__.split('.')[0]}.{type(source).__name__}"
    return f"an in-memory {kind}" + (f" of {size} rows" if size is not None else "")


def open_image_source(
    source: Any,
    split: str = "train",
    dataset_config_name: str | None = None,
    streaming: bool = True,
    flag: str = "--dataset_name",
    hub_options: Mapping[str, Any] | None = None,
) -> OpenedImages:
    """Open ``split`` of ``source`` (any kind of the module docstring); ``hub_options`` (``token``,
    ``cache_dir``) reach ``datasets.load_dataset`` for a name.

    Raises:
        ValueError: one sentence naming ``flag``: an unknown split of a dict of splits, an object that is
            no dataset, or a name that cannot be found.
    """
    import datasets

    description = describe_image_source(source)
    if is_named_source(source):
        path = Path(os.path.expanduser(os.fspath(source)))
        if path.is_dir() and any((path / name).is_file() for name in _SAVED_DATASET_FILES):
            opened = open_image_source(datasets.load_from_disk(str(path)), split, flag=flag)
            return dataclasses.replace(opened, description=description)
        dataset = load_image_dataset(os.fspath(source), dataset_config_name, split=split, streaming=streaming,
                                     hub_options=hub_options)
        num_examples = None
        if isinstance(dataset, datasets.IterableDataset):
            splits = dataset.info.splits
            if splits and split in splits and splits[split].num_examples:
                num_examples = splits[split].num_examples
            else:
                num_examples = count_local_examples(os.fspath(source), dataset_config_name, split)
        else:
            num_examples = len(dataset)
        return OpenedImages(dataset, num_examples, description)
    if isinstance(source, (datasets.DatasetDict, datasets.IterableDatasetDict, Mapping)):
        if split not in source:
            raise ValueError(f"{flag} ({description}) has no split {split!r}; its splits are "
                             f"{', '.join(map(repr, source))}: name one with the split argument.")
        return open_image_source(source[split], split, flag=flag)
    if isinstance(source, datasets.Dataset):
        return OpenedImages(source, len(source), description)
    if isinstance(source, datasets.IterableDataset):
        splits = source.info.splits
        known = splits[split].num_examples if splits and split in splits else None
        return OpenedImages(source, known or None, description)
    if _is_map_style(source):
        return OpenedImages(_torch_dataset_as_iterable(source), len(source), description)
    raise ValueError(
        f"{flag} got {type(source).__name__}: pass a dataset name or path, a datasets Dataset, IterableDataset or "
        "DatasetDict, a folder written by save_to_disk, or a torch Dataset of images or dicts of them."
    )


def _length(source: Any) -> int | None:
    try:
        return len(source)
    except TypeError:
        return None


def _is_map_style(source: Any) -> bool:
    return hasattr(source, "__getitem__") and _length(source) is not None


def _torch_dataset_as_iterable(source: Any) -> Any:
    """A map-style dataset as an ``IterableDataset`` sharded into contiguous index ranges."""
    import datasets

    size = len(source)
    if size == 0:
        raise ValueError("The torch dataset is empty: it must hold at least one image.")
    num_shards = min(size, TORCH_DATASET_SHARDS)
    bounds = [round(size * shard / num_shards) for shard in range(num_shards + 1)]
    return datasets.IterableDataset.from_generator(
        _read_torch_items,
        gen_kwargs={"starts": bounds[:-1], "stops": bounds[1:], "source": source},
    )


def _read_torch_items(starts: list[int], stops: list[int], source: Any) -> Iterator[dict[str, Any]]:
    """The examples of this worker's index ranges: ``{"image": value, ...the item's other keys}``."""
    for start, stop in zip(starts, stops, strict=True):
        for index in range(start, stop):
            yield _as_example(source[index])


def _as_example(item: Any) -> dict[str, Any]:
    if isinstance(item, Mapping):
        values = dict(item)
        key = next((name for name in ("image", "img") if name in values), None)
        if key is None:
            raise ValueError(f"A torch dataset item has no 'image' or 'img' key (its keys: {', '.join(map(str, values))}).")
        example = {"image": values.pop(key)}
        example.update({name: _plain(value) for name, value in values.items()})
        return example
    if isinstance(item, tuple) and len(item) == 2:  # torchvision's (image, target)
        return {"image": item[0], "label": _plain(item[1])}
    return {"image": item}


def _plain(value: Any) -> Any:
    """A tensor scalar as a Python number (labels), anything else unchanged."""
    item = getattr(value, "item", None)
    if callable(item) and getattr(value, "ndim", None) == 0:
        return item()
    return value

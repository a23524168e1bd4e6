"""Small on-disk image datasets for tests (parquet, imagefolder, webdataset), with optional corrupt entries.

Import from any test module (pytest puts ``tests/`` on ``sys.path``)::

    from image_datasets import write_parquet_dataset, read_image_index

    path = write_parquet_dataset(tmp_path / "data", num_images=64, image_size=40, num_shards=2)
    dataset = datasets.load_dataset(str(path), split="train", streaming=True)

Every writer returns the path to hand to ``datasets.load_dataset`` / ``dino_hf.data.streaming.load_image_dataset``
(a folder; ``load_dataset(folder)`` infers the format and the ``train`` split from the file names).

Conventions shared by all writers
- Images are RGB PNG, ``image_size`` x ``image_size`` (square), deterministic for a given ``seed``.
- Image ``i`` carries its index in its top-left pixel: ``(i % 256, i // 256, 7)``; recover it from a
  decoded image (PIL image, ``(3, H, W)`` uint8 tensor or ``(H, W, 3)`` array) with
  :func:`read_image_index`. The rest of the image is a smooth colour gradient plus noise.
- ``with_labels=True`` adds a ``label`` column (``ClassLabel`` with names ``class_0`` ...), ``i % num_classes``.
  For imagefolder the labels are class sub-folders; for webdataset a ``.cls`` member per sample.
- ``corrupt=True`` adds, after the ``num_images`` good ones, one bad entry of each kind in
  :data:`CORRUPT_KINDS` (imagefolder: :data:`IMAGEFOLDER_CORRUPT_KINDS`, it cannot hold a missing
  value). Bad entries are spread over the shards. ``expected_bad_count(format_name)`` gives the count.
- Column / member names: parquet and imagefolder use ``image``; webdataset uses ``png`` (datasets names
  webdataset columns after the member extension) -- pass ``image_column="png"`` for it.
"""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image

__all__ = [
    "CORRUPT_KINDS",
    "IMAGEFOLDER_CORRUPT_KINDS",
    "WEBDATASET_IMAGE_COLUMN",
    "corrupt_entry_bytes",
    "encode_png",
    "expected_bad_count",
    "make_image",
    "IndexViews",
    "indices_of_batches",
    "read_image_index",
    "write_imagefolder_dataset",
    "write_parquet_dataset",
    "write_webdataset_dataset",
]

#: Kinds of bad entries written when ``corrupt=True`` (parquet and webdataset).
CORRUPT_KINDS: tuple[str, ...] = ("undecodable", "truncated", "zero_byte", "one_pixel", "missing")
#: Imagefolder cannot store a missing value, so it gets the other four kinds.
IMAGEFOLDER_CORRUPT_KINDS: tuple[str, ...] = CORRUPT_KINDS[:-1]
#: Image column name of a webdataset written by :func:`write_webdataset_dataset`.
WEBDATASET_IMAGE_COLUMN = "png"


def make_image(index: int, image_size: int = 40, seed: int = 0) -> Image.Image:
    """Deterministic RGB test image whose top-left pixel encodes ``index`` (see :func:`read_image_index`)."""
    rng = np.random.default_rng([seed, index])
    y, x = np.mgrid[0:image_size, 0:image_size].astype(np.float32) / max(image_size - 1, 1)
    base = rng.uniform(0, 255, size=3)
    direction = rng.uniform(-120, 120, size=(3, 2))
    channels = [base[c] + direction[c, 0] * x + direction[c, 1] * y for c in range(3)]
    array = np.stack(channels, axis=-1) + rng.normal(0, 12, size=(image_size, image_size, 3))
    array = np.clip(array, 0, 255).astype(np.uint8)
    array[0, 0] = (index % 256, (index // 256) % 256, 7)
    return Image.fromarray(array, mode="RGB")


def read_image_index(image) -> int:
    """Index written by :func:`make_image`, read from a PIL image, a ``(3, H, W)`` tensor or an ``(H, W, 3)`` array."""
    if isinstance(image, Image.Image):
        red, green = image.convert("RGB").getpixel((0, 0))[:2]
    elif hasattr(image, "dim") and image.dim() == 3 and image.shape[0] in (1, 3, 4):  # torch (C, H, W)
        red, green = int(image[0, 0, 0]), int(image[1, 0, 0])
    else:
        array = np.asarray(image)
        red, green = int(array[0, 0, 0]), int(array[0, 0, 1])
    return int(red) + 256 * int(green)


def encode_png(image: Image.Image) -> bytes:
    """PNG bytes of ``image``."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def corrupt_entry_bytes(kind: str, image_size: int = 40) -> bytes | None:
    """Encoded content of one bad entry of ``kind`` (``None`` for ``"missing"``)."""
    if kind == "undecodable":
        return b"this is not an image" * 8
    if kind == "truncated":
        return encode_png(make_image(9999, image_size))[:60]
    if kind == "zero_byte":
        return b""
    if kind == "one_pixel":
        return encode_png(Image.new("RGB", (1, 1), (200, 10, 10)))
    if kind == "missing":
        return None
    raise ValueError(f"Unknown corrupt kind {kind!r}; expected one of {CORRUPT_KINDS}.")


def expected_bad_count(format_name: str) -> int:
    """Number of bad entries a ``corrupt=True`` dataset of ``format_name`` holds."""
    return len(IMAGEFOLDER_CORRUPT_KINDS if format_name == "imagefolder" else CORRUPT_KINDS)


def _entries(num_images: int, image_size: int, seed: int, corrupt: bool, kinds: tuple[str, ...]):
    """(index, png bytes or None, kind) for the good images then the bad ones."""
    entries = [(i, encode_png(make_image(i, image_size, seed)), "good") for i in range(num_images)]
    if corrupt:
        entries += [(num_images + k, corrupt_entry_bytes(kind, image_size), kind) for k, kind in enumerate(kinds)]
    return entries


def _shard_of(position: int, num_shards: int, num_good: int) -> int:
    """Good images go to contiguous shards; bad ones round-robin so every shard may hold some."""
    if position < num_good:
        return position * num_shards // max(num_good, 1)
    return (position - num_good) % num_shards


def write_parquet_dataset(
    directory: str | Path,
    num_images: int = 64,
    image_size: int = 40,
    num_shards: int = 2,
    with_labels: bool = True,
    corrupt: bool = False,
    num_classes: int = 4,
    seed: int = 0,
    split: str = "train",
) -> Path:
    """Write ``directory/{split}-0000k-of-0000n.parquet`` with an ``image`` column (and ``label``).

    Files carry the ``datasets`` feature metadata (``Image``, ``ClassLabel``), as the Hub's parquet does.
    Returns ``directory``.
    """
    import datasets
    import pyarrow.parquet as pq

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    features = {"image": datasets.Image()}
    if with_labels:
        features["label"] = datasets.ClassLabel(names=[f"class_{c}" for c in range(num_classes)])
    features = datasets.Features(features)
    entries = _entries(num_images, image_size, seed, corrupt, CORRUPT_KINDS)
    shards: list[list[tuple[int, bytes | None]]] = [[] for _ in range(num_shards)]
    for position, (index, data, _kind) in enumerate(entries):
        shards[_shard_of(position, num_shards, num_images)].append((index, data))
    for shard_index, rows in enumerate(shards):
        columns = {"image": [None if data is None else {"bytes": data, "path": None} for _, data in rows]}
        if with_labels:
            columns["label"] = [index % num_classes for index, _ in rows]
        table = datasets.Dataset.from_dict(columns, features=features).data.table  # keeps feature metadata
        pq.write_table(table, directory / f"{split}-{shard_index:05d}-of-{num_shards:05d}.parquet")
    return directory


def write_imagefolder_dataset(
    directory: str | Path,
    num_images: int = 64,
    image_size: int = 40,
    with_labels: bool = True,
    corrupt: bool = False,
    num_classes: int = 4,
    seed: int = 0,
) -> Path:
    """Write PNG files ``directory/class_c/image_iiiii.png`` (or flat without labels). Returns ``directory``.

    Streaming imagefolder is a single shard in ``datasets``; use it for format tests, not worker tests.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    for index, data, kind in _entries(num_images, image_size, seed, corrupt, IMAGEFOLDER_CORRUPT_KINDS):
        folder = directory / f"class_{index % num_classes}" if with_labels else directory
        folder.mkdir(exist_ok=True)
        name = f"image_{index:05d}.png" if kind == "good" else f"image_{index:05d}_{kind}.png"
        (folder / name).write_bytes(data)
    return directory


def write_webdataset_dataset(
    directory: str | Path,
    num_images: int = 64,
    image_size: int = 40,
    num_shards: int = 2,
    with_labels: bool = True,
    corrupt: bool = False,
    num_classes: int = 4,
    seed: int = 0,
    split: str = "train",
) -> Path:
    """Write ``directory/{split}-0000k-of-0000n.tar`` with members ``{key}.png`` (and ``{key}.cls``).

    The image column is :data:`WEBDATASET_IMAGE_COLUMN` (``"png"``); the label column is ``cls`` (int).
    A ``"missing"`` bad entry is a sample with only its ``.cls`` member. Returns ``directory``.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    entries = _entries(num_images, image_size, seed, corrupt, CORRUPT_KINDS)
    shards: list[list[tuple[int, bytes | None]]] = [[] for _ in range(num_shards)]
    for position, (index, data, _kind) in enumerate(entries):
        shards[_shard_of(position, num_shards, num_images)].append((index, data))
    for shard_index, rows in enumerate(shards):
        path = directory / f"{split}-{shard_index:05d}-of-{num_shards:05d}.tar"
        with tarfile.open(path, "w") as tar:
            for index, data in rows:
                members = {}
                if data is not None:
                    members["png"] = data
                if with_labels or data is None:
                    members["cls"] = str(index % num_classes).encode()
                for extension, payload in members.items():
                    info = tarfile.TarInfo(f"sample_{index:05d}.{extension}")
                    info.size = len(payload)
                    tar.addfile(info, io.BytesIO(payload))
    return directory


# ------------------------------------------------------------------------------ reading them back
class IndexViews:
    """Test augmentation: a single 'global view' holding the image's index (see ``read_image_index``)."""

    num_global_crops = 1

    def __call__(self, image: torch.Tensor) -> list[torch.Tensor]:
        assert image.dtype == torch.uint8 and image.shape[0] == 3
        return [torch.tensor([float(read_image_index(image))])]


def indices_of_batches(loader) -> list[int]:
    """The source-image indices of every batch of a loader whose augmentation is :class:`IndexViews`."""
    return [int(i) for batch in loader for i in batch["global_crops"][0, :, 0].tolist()]

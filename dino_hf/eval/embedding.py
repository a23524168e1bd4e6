"""Bulk embeddings: every image of a dataset through a backbone, written as a ``datasets`` parquet set.

``export_embeddings`` writes ``output_dir/data/{split}-{index:05d}.parquet`` shards of ``rows_per_shard``
source rows, each row ``{"id": ..., "label": ..., "embedding": [D floats]}`` (the DINO embedding of the
backbone's family, :func:`dino_hf.models.backbones.backbone_embedding`: a ViT's CLS token, a ConvNet's
pooled output), plus ``embedding_config.json`` (what was embedded, with what) and a ``README.md``
dataset card, so that ``datasets.load_dataset(output_dir)`` reads it back and the folder can be pushed
as a Hub dataset (:func:`push_embeddings`).

Resumable: a shard is written to a temporary file and renamed, so each shard on disk is complete; a
rerun with the same settings skips the shards already written (without decoding their images) and
continues with the first missing one. Other settings over an existing export are refused.

Ids are the dataset's ``id_column`` (``dino-hf-embed`` finds ``id``, ``image_id``... when it has one) or
else the row's index in the split; a ``label_column`` is carried with its feature (a ``ClassLabel``
keeps its names). Images that do not decode are skipped, counted and reported (their ids are absent).
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from dino_hf.base.progress import progress_bar
from dino_hf.data.decoding import BadImageError, decode_image, to_pil_image
from dino_hf.models.backbones import SUPPORTED_MODEL_TYPES, backbone_embedding, backbone_forward, family_of

logger = logging.getLogger(__name__)

__all__ = ["EMBEDDING_CONFIG_NAME", "EmbeddingExport", "export_embeddings", "push_embeddings", "shard_path"]

EMBEDDING_CONFIG_NAME = "embedding_config.json"
DATA_DIRNAME = "data"


@dataclass(frozen=True)
class EmbeddingExport:
    """What :func:`export_embeddings` left in ``output_dir``."""

    output_dir: Path
    num_rows: int  # embedded rows in all shards (this run's and earlier runs')
    embedding_dim: int
    shards: list[Path]
    resumed_shards: int  # shards found complete and skipped
    bad_images: int  # images of this run that did not decode


def shard_path(output_dir: str | Path, split: str, index: int) -> Path:
    """``output_dir/data/{split}-{index:05d}.parquet``: a name ``datasets`` maps to the split."""
    return Path(output_dir) / DATA_DIRNAME / f"{split}-{index:05d}.parquet"


def _check_settings(output_dir: Path, settings: dict[str, Any], overwrite: bool) -> None:
    """Write ``embedding_config.json``; refuse to continue an export made with other settings."""
    config_file = output_dir / EMBEDDING_CONFIG_NAME
    if config_file.is_file() and not overwrite:
        saved = json.loads(config_file.read_text(encoding="utf-8"))
        changed = sorted(key for key in settings if saved.get(key) != settings[key])
        if changed:
            raise ValueError(
                f"--output_dir {output_dir} holds embeddings made with other settings ({', '.join(changed)} differ): "
                "pass another --output_dir, or --overwrite_output_dir to start over."
            )
    if overwrite and (output_dir / DATA_DIRNAME).is_dir():
        for old in (output_dir / DATA_DIRNAME).glob("*.parquet"):
            old.unlink()
    output_dir.mkdir(parents=True, exist_ok=True)
    config_file.write_text(json.dumps(settings, indent=2) + "\n", encoding="utf-8")


class _Collate:
    """Rows ``{image_column, id_column?, label_column?}`` -> ``(pixel_values (B, 3, H, W) or None, decoded
    mask, ids, labels)``; the pixels hold only the images that decoded."""

    def __init__(self, processor: Any, image_column: str, id_column: str | None, label_column: str | None = None) -> None:
        self.processor = processor
        self.image_column = image_column
        self.id_column = id_column
        self.label_column = label_column

    @property
    def columns(self) -> list[str]:
        return [self.image_column] + [column for column in (self.id_column, self.label_column) if column]

    def __call__(self, rows: list[dict[str, Any]]) -> tuple[torch.Tensor | None, list[bool], list[Any], list[Any]]:
        images, decoded = [], []
        for row in rows:
            try:
                images.append(to_pil_image(decode_image(row[self.image_column])))
                decoded.append(True)
            except BadImageError:
                decoded.append(False)
        pixel_values = self.processor(images=images, return_tensors="pt")["pixel_values"] if images else None
        ids = [row[self.id_column] for row in rows] if self.id_column else []
        labels = [row[self.label_column] for row in rows] if self.label_column else []
        return pixel_values, decoded, ids, labels


def _batches(dataset: Any, first_row: int, batch_size: int, num_workers: int,
             collate: _Collate) -> Iterator[tuple[torch.Tensor | None, list[bool], list[Any], list[Any]]]:
    """Batches from row ``first_row`` on, in the dataset's order (see :class:`_Collate`)."""
    import datasets

    if isinstance(dataset, datasets.Dataset):
        remaining = dataset.select(range(first_row, len(dataset)))
    else:
        remaining, num_workers = dataset.skip(first_row), 0  # one stream keeps the order of the rows
    remaining = remaining.select_columns(collate.columns)
    if isinstance((remaining.features or {}).get(collate.image_column), datasets.Image):
        remaining = remaining.cast_column(collate.image_column, datasets.Image(decode=False))  # decoded by us
    yield from torch.utils.data.DataLoader(remaining, batch_size=batch_size, shuffle=False, num_workers=num_workers,
                                           collate_fn=collate)


@torch.inference_mode()
def export_embeddings(
    backbone: nn.Module,
    processor: Any,
    dataset: Any,
    output_dir: str | Path,
    *,
    split: str,
    image_column: str,
    id_column: str | None = None,
    label_column: str | None = None,
    rows_per_shard: int = 10_000,
    batch_size: int = 64,
    num_workers: int = 0,
    l2_normalize: bool = False,
    settings: dict[str, Any] | None = None,
    overwrite: bool = False,
) -> EmbeddingExport:
    """Embed every image of ``dataset`` into parquet shards (see the module docstring).

    Args:
        backbone: a backbone in eval mode, on its device (its family's embedding is used).
        processor: the image processor that feeds it (``load_image_processor``).
        dataset: a ``datasets.Dataset`` or ``IterableDataset`` (streamed: read in order, no workers).
        output_dir: the export's folder.
        split: name of the split in the shard names.
        image_column, id_column: columns of ``dataset``; without ``id_column`` the ids are row indices.
        label_column: a column of ``dataset`` carried into the export as ``label`` (``None``: none).
        rows_per_shard: source rows per parquet file (the unit of resumption).
        batch_size: images per forward pass.
        num_workers: DataLoader workers decoding images (map-style datasets).
        l2_normalize: L2-normalise the embeddings (cosine similarity becomes a dot product).
        settings: what identifies the export (model, dataset, split...): written to
            ``embedding_config.json``; a rerun with other settings is refused.
        overwrite: delete an earlier export's shards instead.

    Raises:
        ValueError: bad settings or an export made with other settings (one sentence).
    """
    import datasets

    if rows_per_shard < 1 or batch_size < 1:
        raise ValueError(f"--rows_per_shard and --per_device_eval_batch_size must be positive, not {rows_per_shard}, {batch_size}.")
    output_dir = Path(output_dir)
    settings = {**(settings or {}), "split": split, "image_column": image_column, "id_column": id_column,
                "rows_per_shard": rows_per_shard, "l2_normalize": l2_normalize}
    if label_column is not None:  # absent otherwise: an export made before labels were carried still resumes
        settings["label_column"] = label_column
    _check_settings(output_dir, settings, overwrite)
    total_rows = len(dataset) if isinstance(dataset, datasets.Dataset) else None
    num_shards = math.ceil(total_rows / rows_per_shard) if total_rows is not None else None

    # shards already complete from an earlier run: the leading run of existing files
    done = 0
    while shard_path(output_dir, split, done).is_file() and (num_shards is None or done < num_shards):
        done += 1
    first_row = done * rows_per_shard
    if done:
        logger.info("Resuming: %d shard(s) of %s already written; starting at row %d.", done, output_dir, first_row)
    device = next(backbone.parameters()).device
    columns = _Columns(_id_feature(dataset, id_column), _label_feature(dataset, label_column))
    shards = [shard_path(output_dir, split, index) for index in range(done)]
    buffer: dict[str, list[Any]] = {"id": [], "label": [], "embedding": []}
    row, shard_index, bad_images, dim = first_row, done, 0, None
    remaining_rows = None if total_rows is None else max(total_rows - first_row, 0)
    collate = _Collate(processor, image_column, id_column, label_column)
    batches = _batches(dataset, first_row, batch_size, num_workers, collate)
    total_batches = None if remaining_rows is None else math.ceil(remaining_rows / batch_size)
    dtype = next(backbone.parameters()).dtype
    for pixel_values, decoded, ids, labels in progress_bar(batches, total=total_batches, desc="embeddings",
                                                           unit="batch"):
        embeddings = None
        if pixel_values is not None:
            output = backbone_forward(backbone, pixel_values.to(device, dtype))
            embeddings = backbone_embedding(backbone, output).float()
            if l2_normalize:
                embeddings = F.normalize(embeddings, dim=-1)
            embeddings = embeddings.cpu().numpy()
            dim = embeddings.shape[1]
        kept = 0
        for position, ok in enumerate(decoded):
            if ok:
                buffer["id"].append(ids[position] if id_column else row)
                buffer["label"].append(labels[position] if label_column else None)
                buffer["embedding"].append(embeddings[kept])
                kept += 1
            else:
                bad_images += 1
            row += 1
            if row % rows_per_shard == 0:
                shards.append(_write_shard(output_dir, split, shard_index, buffer, columns, dim))
                buffer, shard_index = {"id": [], "label": [], "embedding": []}, shard_index + 1
    if buffer["id"]:  # the last, partial shard
        shards.append(_write_shard(output_dir, split, shard_index, buffer, columns, dim))
    if bad_images:
        logger.warning("Skipped %d image(s) that did not decode; their ids are not in the export.", bad_images)
    num_rows, dim = _count_rows(shards, dim)
    _write_card(output_dir, settings, num_rows, dim, _embedding_text(backbone))
    logger.info("Wrote %d embeddings of dimension %s to %s (%d shard(s)).", num_rows, dim, output_dir, len(shards))
    return EmbeddingExport(output_dir, num_rows, dim or 0, shards, done, bad_images)


def _embedding_text(backbone: nn.Module) -> str:
    """What the embedding is, for the dataset card (the family's words, else a generic description)."""
    config = getattr(backbone, "config", None)
    if getattr(config, "model_type", None) in SUPPORTED_MODEL_TYPES:
        return family_of(config).usage(config).embedding
    return "the CLS token of `last_hidden_state`, or the pooled output of a model without one"


@dataclass(frozen=True)
class _Columns:
    """The features of the export's ``id`` and ``label`` columns (``label``: ``None`` when not carried)."""

    id: Any
    label: Any | None


def _id_feature(dataset: Any, id_column: str | None) -> Any:
    from datasets import Value

    if id_column is None:
        return Value("int64")
    feature = (dataset.features or {}).get(id_column)
    return feature if isinstance(feature, Value) else Value("string")


def _label_feature(dataset: Any, label_column: str | None) -> Any | None:
    """The label column's own feature (a ``ClassLabel`` keeps its names), else ``string``."""
    from datasets import ClassLabel, Value

    if label_column is None:
        return None
    feature = (dataset.features or {}).get(label_column)
    return feature if isinstance(feature, (ClassLabel, Value)) else Value("string")


def _write_shard(output_dir: Path, split: str, index: int, rows: dict[str, list[Any]], columns: _Columns,
                 dim: int | None) -> Path:
    """One shard through ``datasets`` (parquet), written to a temporary name and renamed when complete."""
    from datasets import Dataset, Features, List, Value

    path = shard_path(output_dir, split, index)
    path.parent.mkdir(parents=True, exist_ok=True)
    embeddings = rows["embedding"]
    matrix = np.stack(embeddings).astype(np.float32) if embeddings else np.zeros((0, dim or 0), np.float32)
    values: dict[str, Any] = {"id": rows["id"]}
    schema: dict[str, Any] = {"id": columns.id}
    if columns.label is not None:
        values["label"], schema["label"] = rows["label"], columns.label
    values["embedding"], schema["embedding"] = list(matrix), List(Value("float32"), length=dim or -1)
    shard = Dataset.from_dict(values, features=Features(schema))
    temporary = path.with_name(f".{path.name}.tmp")
    shard.to_parquet(str(temporary))
    os.replace(temporary, path)
    return path


def _count_rows(shards: list[Path], dim: int | None) -> tuple[int, int | None]:
    """Rows in all shards (from the parquet footers) and the embedding dimension."""
    import pyarrow.parquet as pq

    rows = 0
    for path in shards:
        metadata = pq.read_metadata(str(path))
        rows += metadata.num_rows
        if dim is None and metadata.num_rows:
            dim = len(pq.read_table(str(path), columns=["embedding"]).column(0)[0])
    return rows, dim


def _write_card(output_dir: Path, settings: dict[str, Any], num_rows: int, dim: int | None,
                embedding: str = "the DINO embedding") -> None:
    """``README.md``: a dataset card that says what the embeddings are and how to load them."""
    from huggingface_hub import DatasetCard, DatasetCardData

    split = settings["split"]
    # No `configs:` entry: `datasets` finds the split in the shard names (data/{split}-NNNNN.parquet), and a
    # config named in the card would make it cache a local folder by its name alone, so that a new export in
    # a folder of the same name would be read back from the cache of the old one.
    data = DatasetCardData(tags=["embeddings", "dino", "dino_hf"])
    model, which = settings.get("model"), settings.get("which", "teacher")
    source = settings.get("dataset_name")
    text = "\n".join([
        "---", data.to_yaml(), "---", "",
        "# DINO embeddings", "",
        f"{num_rows:,} embeddings of dimension {dim} of split `{split}` of `{source}`, computed with the "
        f"{which} backbone `{model}` by dino_hf: {embedding}"
        + (", L2-normalised." if settings.get("l2_normalize") else " (not normalised)."),
        "",
        "Columns: `id` (the dataset's "
        + (f"`{settings['id_column']}` column" if settings.get("id_column") else "row index in the split")
        + ")"
        + (f", `label` (the dataset's `{settings['label_column']}` column)" if settings.get("label_column") else "")
        + " and `embedding`.", "",
        "```python", "from datasets import load_dataset", "",
        f'embeddings = load_dataset("REPO_OR_FOLDER", split="{split}")', "```", "",
    ])
    DatasetCard(text).save(output_dir / "README.md")


def push_embeddings(output_dir: str | Path, repo_id: str, *, private: bool = False, token: str | None = None) -> str:
    """Upload an export to the Hub as a dataset repository (created if needed); returns the commit URL.

    Raises:
        MissingTokenError / HubPushError: as :func:`dino_hf.hub.push.push_training_output`, token never shown.
    """
    from huggingface_hub import HfApi

    from dino_hf.base.run_folder import scrub_secrets
    from dino_hf.hub.push import HubPushError, resolve_token

    resolved = resolve_token(token)
    api = HfApi(token=resolved)
    try:
        api.create_repo(repo_id, repo_type="dataset", private=True if private else None, exist_ok=True)
        info = api.upload_folder(repo_id=repo_id, repo_type="dataset", folder_path=str(output_dir),
                                 allow_patterns=[f"{DATA_DIRNAME}/*.parquet", "README.md", EMBEDDING_CONFIG_NAME],
                                 commit_message="Upload DINO embeddings with dino_hf")
    except Exception as error:  # noqa: BLE001 - any transport/Hub failure becomes one sentence
        raise HubPushError(scrub_secrets(f"Pushing to the dataset {repo_id} failed: {error}", resolved),
                           repo_id=repo_id) from None
    return info.commit_url

"""Photo-like synthetic JPEGs for the benchmarks, and parquet shards of them (what the loader streams)."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image


def make_jpegs(count: int, width: int, height: int, seed: int = 0) -> list[bytes]:
    """Photo-like JPEGs: smooth random colour fields (upsampled noise) plus sensor-like noise."""
    rng = np.random.default_rng(seed)
    images = []
    for _ in range(count):
        coarse = rng.uniform(0, 255, (max(height // 24, 2), max(width // 24, 2), 3)).astype(np.uint8)
        smooth = np.asarray(Image.fromarray(coarse).resize((width, height), Image.BICUBIC), dtype=np.float32)
        pixels = np.clip(smooth + rng.normal(0, 8, smooth.shape), 0, 255).astype(np.uint8)
        buffer = io.BytesIO()
        Image.fromarray(pixels).save(buffer, format="JPEG", quality=90)
        images.append(buffer.getvalue())
    return images


def write_parquet(images: list[bytes], directory: Path, num_shards: int) -> Path:
    """``images`` (encoded) round-robin into ``num_shards`` parquet files with a ``datasets`` Image column."""
    import datasets
    import pyarrow.parquet as pq

    directory.mkdir(parents=True, exist_ok=True)
    features = datasets.Features({"image": datasets.Image()})
    for shard in range(num_shards):
        rows = {"image": [{"bytes": data, "path": None} for data in images[shard::num_shards]]}
        table = datasets.Dataset.from_dict(rows, features=features).data.table
        pq.write_table(table, directory / f"train-{shard:05d}-of-{num_shards:05d}.parquet")
    return directory

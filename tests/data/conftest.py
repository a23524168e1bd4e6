"""Fixtures of the data tests (tests/data/)."""

from __future__ import annotations

import pytest
from image_datasets import write_parquet_dataset


@pytest.fixture(scope="module")
def parquet_dir(tmp_path_factory):
    """40 good images + 5 bad ones in 4 parquet shards."""
    return write_parquet_dataset(
        tmp_path_factory.mktemp("parquet"), num_images=40, image_size=20, num_shards=4, corrupt=True
    )

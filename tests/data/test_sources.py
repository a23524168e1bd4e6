"""Tests of dino_hf.data.sources: every kind of image source opens as one datasets split."""

from __future__ import annotations

import datasets
import numpy as np
import pytest
import torch
from image_datasets import write_parquet_dataset
from PIL import Image

from dino_hf.data.sources import describe_image_source, is_named_source, open_image_source


def _images(count: int) -> list[Image.Image]:
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 256, (12, 12, 3), dtype=np.uint8)) for _ in range(count)]


class Pairs(torch.utils.data.Dataset):
    """torchvision's shape: (image, label) pairs."""

    def __len__(self) -> int:
        return 5

    def __getitem__(self, index: int):
        return _images(1)[0], torch.tensor(index)


def test_names_objects_dicts_saved_folders_and_torch_datasets_open(tmp_path):
    parquet = write_parquet_dataset(tmp_path / "parquet", num_images=8, image_size=12, num_shards=2)
    dataset = datasets.Dataset.from_dict({"image": _images(6)})
    dataset.save_to_disk(str(tmp_path / "saved"))
    datasets.DatasetDict(train=dataset, test=dataset.select(range(2))).save_to_disk(str(tmp_path / "saved_dict"))
    cases = {
        str(parquet): 8, str(tmp_path / "saved"): 6, str(tmp_path / "saved_dict"): 6, "dataset": 6,
        "dict": 6, "mapping": 6, "torch": 5,
    }
    sources = {"dataset": dataset, "dict": datasets.DatasetDict(train=dataset), "mapping": {"train": dataset},
               "torch": Pairs()}
    for key, size in cases.items():
        opened = open_image_source(sources.get(key, key), "train")
        assert opened.num_examples == size, key
    torch_examples = list(open_image_source(Pairs()).dataset)
    assert [example["label"] for example in torch_examples] == [0, 1, 2, 3, 4]
    assert isinstance(torch_examples[0]["image"], Image.Image)
    assert open_image_source(dataset.to_iterable_dataset(num_shards=2)).num_examples is None  # a stream


def test_sources_are_named_in_messages_and_bad_ones_refused():
    dataset = datasets.Dataset.from_dict({"image": _images(3)})
    assert is_named_source("data/x") and not is_named_source(dataset)
    assert describe_image_source(dataset) == "an in-memory datasets.Dataset of 3 rows"
    with pytest.raises(ValueError, match=r"--eval_dataset_name .* has no split 'test'; its splits are 'train'"):
        open_image_source(datasets.DatasetDict(train=dataset), "test", flag="--eval_dataset_name")
    with pytest.raises(ValueError, match="--dataset_name got int"):
        open_image_source(3)
    with pytest.raises(ValueError, match="The torch dataset is empty"):
        open_image_source(torch.utils.data.TensorDataset(torch.zeros(0, 3)))

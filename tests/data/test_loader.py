"""Tests of dino_hf.data.loader: streaming batches, sharding across ranks and workers, exact resumption, bad images."""

from __future__ import annotations

import json
import logging

import pytest
import torch
from image_datasets import (
    WEBDATASET_IMAGE_COLUMN,
    IndexViews,
    expected_bad_count,
    indices_of_batches,
    write_imagefolder_dataset,
    write_parquet_dataset,
    write_webdataset_dataset,
)
from tiny_models import SMALL_AUGMENTATION

from dino_hf.data.loader import create_train_dataloader


# ---------------------------------------------------------------------------------------------
# Streaming
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("format_name", ["parquet", "imagefolder", "webdataset"])
def test_streams_each_format_and_skips_bad_images(tmp_path, format_name, caplog):
    writer = {
        "parquet": write_parquet_dataset,
        "imagefolder": write_imagefolder_dataset,
        "webdataset": write_webdataset_dataset,
    }[format_name]
    path = writer(tmp_path / format_name, num_images=14, image_size=12, corrupt=True)
    column = WEBDATASET_IMAGE_COLUMN if format_name == "webdataset" else "image"
    loader = create_train_dataloader(
        str(path), augmentation=IndexViews(), batch_size=4, image_column=column, drop_last=False, shuffle_buffer_size=5
    )
    with caplog.at_level(logging.WARNING, logger="dino_hf.data.streaming"):
        indices = indices_of_batches(loader)
    assert sorted(indices) == list(range(14))
    assert loader.bad_image_count == expected_bad_count(format_name)
    assert f"skipped {expected_bad_count(format_name)} bad image(s)" in caplog.text


def test_decode_only_batches_for_on_device_augmentation(parquet_dir):
    """working_size instead of an augmentation: uint8 letterboxed images plus their valid sizes."""
    loader = create_train_dataloader(str(parquet_dir), augmentation=None, working_size=16, batch_size=8, seed=1)
    batches = list(loader)
    assert len(batches) == 40 // 8 and loader.bad_image_count == 5
    for batch in batches:
        assert set(batch) == {"images", "image_sizes"}
        assert batch["images"].shape == (8, 3, 16, 16) and batch["images"].dtype == torch.uint8
        assert batch["image_sizes"].tolist() == [[16, 16]] * 8  # 20 px squares shrunk to 16
    # a working size above the images' keeps them as they are, padded
    batch = next(iter(create_train_dataloader(str(parquet_dir), augmentation=None, working_size=24, batch_size=4)))
    assert batch["image_sizes"].tolist() == [[20, 20]] * 4
    assert batch["images"][:, :, 20:].eq(0).all() and batch["images"][:, :, :, 20:].eq(0).all()
    with pytest.raises(ValueError, match="either an augmentation or a working_size"):
        create_train_dataloader(str(parquet_dir), augmentation=SMALL_AUGMENTATION, working_size=16, batch_size=4)
    with pytest.raises(ValueError, match="either an augmentation or a working_size"):
        create_train_dataloader(str(parquet_dir), augmentation=None, batch_size=4)


def test_multi_crop_batches(parquet_dir):
    loader = create_train_dataloader(str(parquet_dir), augmentation=SMALL_AUGMENTATION, batch_size=8, seed=1)
    batches = list(loader)
    assert len(batches) == 40 // 8  # drop_last: 40 good images
    for batch in batches:
        assert batch["global_crops"].shape == (2, 8, 3, 16, 16) and batch["global_crops"].dtype == torch.float32
        assert batch["local_crops"].shape == (2, 8, 3, 8, 8)
    assert loader.num_examples == 45  # rows in the parquet footers, bad ones included
    assert loader.bad_image_count == 5


def test_non_streaming_dataset(parquet_dir):
    loader = create_train_dataloader(
        str(parquet_dir), augmentation=IndexViews(), batch_size=5, streaming=False, drop_last=False
    )
    assert loader.num_examples == 45
    assert sorted(indices_of_batches(loader)) == list(range(40))


def test_epochs_reshuffle_and_are_reproducible(parquet_dir):
    def order(epoch: int, seed: int = 0) -> list[int]:
        loader = create_train_dataloader(
            str(parquet_dir),
            augmentation=IndexViews(),
            batch_size=4,
            seed=seed,
            shuffle_buffer_size=16,
            drop_last=False,
        )
        loader.set_epoch(epoch)
        return indices_of_batches(loader)

    first, again, second, other_seed = order(0), order(0), order(1), order(0, seed=5)
    assert first == again
    assert sorted(first) == sorted(second) == list(range(40))
    assert first != second and first != other_seed


class RandomViews:
    """Test augmentation drawing from the global torch generator."""

    num_global_crops = 1

    def __call__(self, image: torch.Tensor) -> list[torch.Tensor]:
        return [torch.rand(2)]


@pytest.mark.parametrize("augmentation", [RandomViews(), SMALL_AUGMENTATION])
def test_augmentation_is_seeded_and_leaves_the_global_generator_alone(parquet_dir, augmentation):
    def views() -> list[torch.Tensor]:
        loader = create_train_dataloader(str(parquet_dir), augmentation=augmentation, batch_size=8, seed=4)
        return [batch["global_crops"] for batch in loader]

    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    first = views()
    assert torch.equal(torch.rand(3), expected)
    assert all(torch.equal(a, b) for a, b in zip(first, views(), strict=True))


def test_two_ranks_are_disjoint_and_cover_the_dataset(parquet_dir, caplog):
    seen = []
    for rank in range(2):
        loader = create_train_dataloader(
            str(parquet_dir),
            augmentation=IndexViews(),
            batch_size=3,
            process_index=rank,
            num_processes=2,
            drop_last=False,
        )
        assert loader.num_examples == 45 // 2
        seen.append(set(indices_of_batches(loader)))
    assert not seen[0] & seen[1]
    assert seen[0] | seen[1] == set(range(40))
    assert "shard" not in caplog.text  # 4 shards, 2 ranks: no warning


def test_two_ranks_with_indivisible_shards_still_partition(tmp_path, caplog):
    path = write_parquet_dataset(tmp_path / "three", num_images=21, image_size=8, num_shards=3)
    seen = []
    with caplog.at_level(logging.WARNING, logger="dino_hf.data.streaming"):
        for rank in range(2):
            loader = create_train_dataloader(
                str(path), augmentation=IndexViews(), batch_size=2, process_index=rank, num_processes=2, drop_last=False
            )
            seen.append(set(indices_of_batches(loader)))
    assert not seen[0] & seen[1] and seen[0] | seen[1] == set(range(21))
    assert "every process reads every shard" in caplog.text


def test_all_workers_receive_data(parquet_dir):
    loader = create_train_dataloader(
        str(parquet_dir), augmentation=IndexViews(), batch_size=4, num_workers=2, drop_last=False
    )
    assert sorted(indices_of_batches(loader)) == list(range(40))
    workers = loader.state_dict()["workers"]
    assert set(workers) == {"0", "1"} and all(state["batches"] > 0 for state in workers.values())
    assert loader.bad_image_count == 5


def test_too_few_shards_warns_once_with_the_fix(tmp_path, caplog):
    folder = write_imagefolder_dataset(tmp_path / "folder", num_images=8, image_size=8)  # one shard
    with caplog.at_level(logging.WARNING, logger="dino_hf.data.streaming"):
        loader = create_train_dataloader(str(folder), augmentation=IndexViews(), batch_size=2, num_workers=2)
        assert sorted(indices_of_batches(loader)) == list(range(8))  # the idle worker does not lose data
    messages = [r.getMessage() for r in caplog.records if "shard" in r.getMessage()]
    assert len(messages) == 1
    assert "1 shard(s)" in messages[0] and "to_iterable_dataset(num_shards=2)" in messages[0]
    assert "--num_shards 2" in messages[0]


# ---------------------------------------------------------------------------------------------
# Exact resumption
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("num_workers", [0, 2])
def test_resume_gives_the_same_next_batches(parquet_dir, num_workers):
    def make():
        return create_train_dataloader(
            str(parquet_dir),
            augmentation=SMALL_AUGMENTATION,
            batch_size=3,
            num_workers=num_workers,
            shuffle_buffer_size=7,
            seed=11,
        )

    reference = make()
    reference.set_epoch(2)
    uninterrupted = [batch["local_crops"] for batch in reference]
    assert len(uninterrupted) >= 10
    for stop in (1, 4, len(uninterrupted) - 1):
        loader = make()
        loader.set_epoch(2)
        iterator = iter(loader)
        for _ in range(stop):
            next(iterator)
        state = json.loads(json.dumps(loader.state_dict()))  # a checkpoint survives serialisation
        del iterator
        resumed = make()
        resumed.load_state_dict(state)
        resumed.set_epoch(2)  # what a training loop does on resume: same epoch keeps the position
        rest = [batch["local_crops"] for batch in resumed]
        assert len(rest) == len(uninterrupted) - stop
        assert all(torch.equal(a, b) for a, b in zip(rest, uninterrupted[stop:], strict=True))
        assert resumed.bad_image_count == 5
        resumed.set_epoch(3)  # the next epoch starts from its beginning
        assert len(list(resumed)) > 0


def test_resume_with_different_settings_is_refused(parquet_dir):
    loader = create_train_dataloader(str(parquet_dir), augmentation=IndexViews(), batch_size=4)
    state = loader.state_dict()
    other = create_train_dataloader(str(parquet_dir), augmentation=IndexViews(), batch_size=5)
    with pytest.raises(ValueError, match="batch_size"):
        other.load_state_dict(state)

"""Tests of dino_hf.data: streaming, sharding across ranks and workers, exact resumption, bad images."""

from __future__ import annotations

import json
import logging

import pytest
import torch
from image_datasets import (
    WEBDATASET_IMAGE_COLUMN,
    expected_bad_count,
    read_image_index,
    write_imagefolder_dataset,
    write_parquet_dataset,
    write_webdataset_dataset,
)
from PIL import Image

from dino_hf.augmentation import MultiCropAugmentation
from dino_hf.data import create_train_dataloader, detect_image_column, load_image_dataset


class IndexViews:
    """Test augmentation: a single 'global view' holding the image's index (see ``read_image_index``)."""

    num_global_crops = 1

    def __call__(self, image: torch.Tensor) -> list[torch.Tensor]:
        assert image.dtype == torch.uint8 and image.shape[0] == 3
        return [torch.tensor([float(read_image_index(image))])]


def _indices(loader) -> list[int]:
    return [int(i) for batch in loader for i in batch["global_crops"][0, :, 0].tolist()]


SMALL_AUGMENTATION = MultiCropAugmentation(global_crop_size=16, local_crop_size=8, num_local_crops=2)


@pytest.fixture(scope="module")
def parquet_dir(tmp_path_factory):
    """40 good images + 5 bad ones in 4 parquet shards."""
    return write_parquet_dataset(
        tmp_path_factory.mktemp("parquet"), num_images=40, image_size=20, num_shards=4, corrupt=True
    )


# ---------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------
def test_load_each_local_format(tmp_path):
    parquet = write_parquet_dataset(tmp_path / "pq", num_images=6, image_size=8, num_shards=2)
    folder = write_imagefolder_dataset(tmp_path / "folder", num_images=6, image_size=8)
    tars = write_webdataset_dataset(tmp_path / "wds", num_images=6, image_size=8, num_shards=2)
    cases = [
        (parquet, "image"),
        (parquet / "train-00000-of-00002.parquet", "image"),
        (folder, "image"),
        (tars, WEBDATASET_IMAGE_COLUMN),
        (tars / "train-00001-of-00002.tar", WEBDATASET_IMAGE_COLUMN),
    ]
    for path, column in cases:
        dataset = load_image_dataset(str(path))
        assert type(dataset).__name__ == "IterableDataset"
        rows = list(dataset)
        assert column in rows[0] and len(rows) in (3, 6), path
    assert type(load_image_dataset(str(parquet), streaming=False)).__name__ == "Dataset"


def test_missing_dataset_names_the_flag(tmp_path):
    with pytest.raises(ValueError, match="--dataset_name"):
        load_image_dataset(str(tmp_path / "does_not_exist"))
    with pytest.raises(ValueError, match="--dataset_name"):
        load_image_dataset(str(tmp_path / "missing.parquet"))


def test_a_missing_local_looking_path_never_goes_to_the_hub(tmp_path, monkeypatch):
    """``data/x`` (the recipes' form) and other paths that do not exist fail at once, naming the
    command that prepares the demo data, without a Hub request (whose retries take half a minute)."""
    import datasets

    def no_hub(*args, **kwargs):
        raise AssertionError(f"datasets.load_dataset was called with {args}")

    monkeypatch.setattr(datasets, "load_dataset", no_hub)
    monkeypatch.chdir(tmp_path)  # no data/ folder here
    for name in ("data/fashion_mnist", "./fashion_mnist", "runs/data/images", "~/no/such/images", "shards/missing.parquet"):
        with pytest.raises(ValueError, match="scripts/prepare_fashion_mnist.py") as error:
            load_image_dataset(name)
        assert f"--dataset_name {name} does not exist" in str(error.value) and "make demo" in str(error.value)
    (tmp_path / "mine").mkdir()  # an existing local folder makes mine/x local too
    with pytest.raises(ValueError, match="not looked up on the Hub"):
        load_image_dataset("mine/images")
    with pytest.raises(AssertionError, match="user/dataset"):  # a Hub id still goes to the Hub
        load_image_dataset("user/dataset")


def test_image_column_is_found_when_unset():
    import datasets

    def dataset(**columns):
        features = datasets.Features({name: feature for name, (feature, _) in columns.items()})
        return datasets.Dataset.from_dict({name: values for name, (_, values) in columns.items()}, features=features)

    picture = [Image.new("RGB", (4, 4))]
    label = (datasets.Value("int64"), [0])
    assert detect_image_column(dataset(img=(datasets.Image(), picture), label=label), None) == "img"
    assert detect_image_column(dataset(photo=(datasets.Image(), picture), label=label), None) == "photo"
    assert detect_image_column(dataset(image=(datasets.Value("string"), ["a.png"]), photo=(datasets.Image(), picture)),
                               None) == "image"
    assert detect_image_column(dataset(photo=(datasets.Image(), picture)), "photo") == "photo"
    with pytest.raises(ValueError, match=r"no column 'image', 'img' or of the Image type.*'label'.*--image_column"):
        detect_image_column(dataset(label=label), None, "labels_only")


def test_missing_image_column_lists_columns(parquet_dir):
    with pytest.raises(ValueError, match=r"'pixels'.*'image', 'label'.*--image_column"):
        create_train_dataloader(str(parquet_dir), augmentation=IndexViews(), batch_size=2, image_column="pixels")


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
    with caplog.at_level(logging.WARNING, logger="dino_hf.data"):
        indices = _indices(loader)
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
    assert sorted(_indices(loader)) == list(range(40))


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
        return _indices(loader)

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
        seen.append(set(_indices(loader)))
    assert not seen[0] & seen[1]
    assert seen[0] | seen[1] == set(range(40))
    assert "shard" not in caplog.text  # 4 shards, 2 ranks: no warning


def test_two_ranks_with_indivisible_shards_still_partition(tmp_path, caplog):
    path = write_parquet_dataset(tmp_path / "three", num_images=21, image_size=8, num_shards=3)
    seen = []
    with caplog.at_level(logging.WARNING, logger="dino_hf.data"):
        for rank in range(2):
            loader = create_train_dataloader(
                str(path), augmentation=IndexViews(), batch_size=2, process_index=rank, num_processes=2, drop_last=False
            )
            seen.append(set(_indices(loader)))
    assert not seen[0] & seen[1] and seen[0] | seen[1] == set(range(21))
    assert "every process reads every shard" in caplog.text


def test_all_workers_receive_data(parquet_dir):
    loader = create_train_dataloader(
        str(parquet_dir), augmentation=IndexViews(), batch_size=4, num_workers=2, drop_last=False
    )
    assert sorted(_indices(loader)) == list(range(40))
    workers = loader.state_dict()["workers"]
    assert set(workers) == {"0", "1"} and all(state["batches"] > 0 for state in workers.values())
    assert loader.bad_image_count == 5


def test_too_few_shards_warns_once_with_the_fix(tmp_path, caplog):
    folder = write_imagefolder_dataset(tmp_path / "folder", num_images=8, image_size=8)  # one shard
    with caplog.at_level(logging.WARNING, logger="dino_hf.data"):
        loader = create_train_dataloader(str(folder), augmentation=IndexViews(), batch_size=2, num_workers=2)
        assert sorted(_indices(loader)) == list(range(8))  # the idle worker does not lose data
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


# ---------------------------------------------------------------------------------------------
# scripts/prepare_fashion_mnist.py (on synthetic IDX files: the Debian package is not needed)
# ---------------------------------------------------------------------------------------------
def _write_idx(path, array) -> None:
    import gzip
    import struct

    header = struct.pack(">HBB", 0, 0x08, array.ndim) + struct.pack(">" + "I" * array.ndim, *array.shape)
    with gzip.open(path, "wb") as stream:
        stream.write(header + array.astype("uint8").tobytes())


def _prepare_script():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "scripts" / "prepare_fashion_mnist.py"
    spec = importlib.util.spec_from_file_location("prepare_fashion_mnist", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_prepare_fashion_mnist_writes_streamable_shards(tmp_path, capsys):
    import numpy as np

    script = _prepare_script()
    source = tmp_path / "idx"
    source.mkdir()
    rng = np.random.default_rng(0)
    for split, count in (("train", 30), ("t10k", 10)):
        _write_idx(source / f"{split}-images-idx3-ubyte.gz", rng.integers(0, 256, (count, 28, 28)))
        _write_idx(source / f"{split}-labels-idx1-ubyte.gz", np.arange(count) % 10)
    output = tmp_path / "fashion"
    assert script.main(["--output_dir", str(output), "--num_shards", "3", "--source_dir", str(source)]) == 0
    train = load_image_dataset(str(output), split="train")
    assert train.num_shards == 3 and train.features["label"].names[0] == "T-shirt/top"
    rows = list(load_image_dataset(str(output), split="test"))
    assert len(rows) == 10 and rows[3]["label"] == 3 and rows[3]["image"].size == (28, 28)
    loader = create_train_dataloader(str(output), augmentation=SMALL_AUGMENTATION, batch_size=4, num_workers=0)
    assert loader.num_examples == 30 and len(list(loader)) == 30 // 4


def test_prepare_fashion_mnist_explains_how_to_install(tmp_path, capsys):
    script = _prepare_script()
    assert script.main(["--output_dir", str(tmp_path / "out"), "--source_dir", str(tmp_path / "none")]) == 1
    assert "apt-get install -y dataset-fashion-mnist" in capsys.readouterr().err

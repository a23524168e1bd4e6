"""Tests of dino_hf.data.streaming: every local format, the image column, local-path rules, the Fashion-MNIST preparation."""

from __future__ import annotations

import pytest
from image_datasets import (
    WEBDATASET_IMAGE_COLUMN,
    IndexViews,
    write_imagefolder_dataset,
    write_parquet_dataset,
    write_webdataset_dataset,
)
from PIL import Image
from tiny_models import SMALL_AUGMENTATION

from dino_hf.data.loader import create_train_dataloader
from dino_hf.data.streaming import detect_image_column, load_image_dataset


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

    path = Path(__file__).resolve().parents[2] / "scripts" / "prepare_fashion_mnist.py"
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

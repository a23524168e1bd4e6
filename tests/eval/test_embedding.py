"""Bulk embeddings (dino_hf.eval.embedding, dino-hf-embed): rows and dimensions of the parquet export read back
with ``datasets``, ids, resumption that skips finished shards, settings checks, and the push of the
export as a Hub dataset (loopback Hub)."""

from __future__ import annotations

import huggingface_hub
import numpy as np
import pytest
import torch
from hub_server import LoopbackHub
from image_datasets import write_parquet_dataset
from tiny_models import TOKEN

from dino_hf.cli import embed
from dino_hf.eval.embedding import export_embeddings, shard_path
from dino_hf.eval.loading import load_backbone, load_image_processor

pytestmark = pytest.mark.filterwarnings("ignore:Use 'content=<...>':DeprecationWarning")


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """23 labelled 20 px images (one parquet file): 3 shards of 10 rows, the last one partial."""
    return write_parquet_dataset(tmp_path_factory.mktemp("images"), num_images=23, image_size=20, num_shards=1,
                                 num_classes=3)


def _embed(model, images, output_dir, *extra):
    return embed.main(["--model_name_or_path", str(model), "--dataset_name", str(images), "--output_dir",
                       str(output_dir), "--rows_per_shard", "10", "--batch_size", "4", *extra])


def test_export_rows_dimensions_and_values(tiny_backbone, images, tmp_path):
    import datasets

    assert _embed(tiny_backbone, images, tmp_path / "out") == 0
    exported = datasets.load_dataset(str(tmp_path / "out"), split="train")
    assert exported.num_rows == 23 and exported.column_names == ["id", "label", "embedding"]
    assert exported["label"] == [index % 3 for index in range(23)]  # the dataset's labels, its ClassLabel kept
    assert exported.features["label"].names == ["class_0", "class_1", "class_2"]
    assert exported.features["embedding"].length == 32 and exported["id"] == list(range(23))
    assert [shard_path(tmp_path / "out", "train", i).is_file() for i in range(4)] == [True, True, True, False]
    # the embedding is the backbone's CLS token of each image, in order
    backbone = load_backbone(tiny_backbone)
    processor = load_image_processor(tiny_backbone, backbone.config)
    source = datasets.load_dataset(str(images), split="train")
    with torch.no_grad():
        pixels = processor(images=[source[i]["image"].convert("RGB") for i in (0, 22)], return_tensors="pt")
        expected = backbone(**pixels).last_hidden_state[:, 0].numpy()
    np.testing.assert_allclose(np.array(exported["embedding"])[[0, 22]], expected, rtol=1e-4, atol=1e-5)


def test_resume_skips_finished_shards_and_other_settings_are_refused(tiny_backbone, images, tmp_path, capsys):
    import datasets

    output_dir = tmp_path / "out"
    backbone = load_backbone(tiny_backbone)
    processor = load_image_processor(tiny_backbone, backbone.config)
    source = datasets.load_dataset(str(images), split="train")
    first = export_embeddings(backbone, processor, source, output_dir, split="train", image_column="image",
                              rows_per_shard=10, batch_size=4)
    assert (first.num_rows, first.embedding_dim, first.resumed_shards) == (23, 32, 0)
    kept = shard_path(output_dir, "train", 0).read_bytes()
    shard_path(output_dir, "train", 2).unlink()  # as if the run had been stopped before the last shard

    seen_images = []
    counting = _CountingProcessor(processor, seen_images)
    resumed = export_embeddings(backbone, counting, source, output_dir, split="train", image_column="image",
                                rows_per_shard=10, batch_size=4)
    assert resumed.resumed_shards == 2 and resumed.num_rows == 23
    assert sum(seen_images) == 3  # only the 3 rows of the missing shard were decoded and embedded
    assert shard_path(output_dir, "train", 0).read_bytes() == kept
    assert datasets.load_dataset(str(output_dir), split="train")["id"] == list(range(23))

    # the same command again finds everything done; other settings over it are refused
    assert _embed(tiny_backbone, images, tmp_path / "cli") == 0
    assert _embed(tiny_backbone, images, tmp_path / "cli") == 0
    assert "3 shard(s)" in capsys.readouterr().out
    assert _embed(tiny_backbone, images, tmp_path / "cli", "--l2_normalize") == 2
    assert "other settings (l2_normalize differ)" in capsys.readouterr().err
    assert _embed(tiny_backbone, images, tmp_path / "cli", "--l2_normalize", "--overwrite_output_dir") == 0
    norms = np.linalg.norm(np.array(datasets.load_dataset(str(tmp_path / "cli"), split="train")["embedding"]), axis=1)
    np.testing.assert_allclose(norms, 1.0, rtol=1e-5)


class _CountingProcessor:
    """An image processor that counts the images it is given."""

    def __init__(self, processor, counts):
        self.processor, self.counts = processor, counts

    def __call__(self, images, **kwargs):
        self.counts.append(len(images))
        return self.processor(images=images, **kwargs)


def test_push_the_export_as_a_hub_dataset(tiny_backbone, images, tmp_path, monkeypatch):
    import datasets

    with LoopbackHub(token=TOKEN) as hub:
        monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", hub.url)
        monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_DISABLE_XET", True)
        monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
        monkeypatch.setenv("HF_TOKEN", TOKEN)
        assert _embed(tiny_backbone, images, tmp_path / "out", "--push_to_hub", "--hub_dataset_id",
                      f"{hub.user}/tiny-embeddings") == 0
        files = hub.files(f"{hub.user}/tiny-embeddings", repo_type="dataset")
        assert hub.unhandled == []
    assert {"README.md", "embedding_config.json", "data/train-00000.parquet", "data/train-00002.parquet"} <= set(files)
    for path, content in files.items():
        assert TOKEN.encode() not in content, path
    checkout = tmp_path / "checkout"
    for path, content in files.items():
        (checkout / path).parent.mkdir(parents=True, exist_ok=True)
        (checkout / path).write_bytes(content)
    assert datasets.load_dataset(str(checkout), split="train").num_rows == 23  # the split from the shard names

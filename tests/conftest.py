"""Fixtures shared by several test modules (helpers to import live in tiny_models.py, image_datasets.py and
process_failures.py)."""

from __future__ import annotations

import importlib
import os
import sys
from pathlib import Path

import pytest
import torch
from image_datasets import write_parquet_dataset
from tiny_models import save_tiny_backbone, tiny_dino_config, write_training_output

from dino_hf.models.modeling_dino import DinoForPreTraining

REPO_ROOT = Path(__file__).resolve().parents[1]

# Every subprocess a test starts inherits it: a native crash (a segmentation fault) prints the Python stack
# of each thread of the crashed process, which process_failures.failure_report puts in the failure message.
os.environ.setdefault("PYTHONFAULTHANDLER", "1")


@pytest.fixture
def fresh_accelerate_state():
    """Accelerate keeps process-wide singletons; each in-process run starts from a clean state.

    Modules that build an ``Accelerator`` in this process use it for every test:
    ``pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")``.
    """
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    yield
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


# ------------------------------------------------------------------------------ training runs
@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    """48 unlabelled 40 px images in 2 parquet shards (the data of ``tiny_models.tiny_args`` runs)."""
    return write_parquet_dataset(tmp_path_factory.mktemp("data"), num_images=48, image_size=40, num_shards=2)


@pytest.fixture(scope="module")
def tiny_config_file(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("tiny_config")
    tiny_dino_config().save_pretrained(folder)
    return folder / "config.json"


@pytest.fixture
def model() -> DinoForPreTraining:
    torch.manual_seed(0)
    return DinoForPreTraining(tiny_dino_config())


# ------------------------------------------------------------------------------ evaluation
@pytest.fixture(scope="module")
def labelled_parquet(tmp_path_factory) -> Path:
    pytest.importorskip("dino_hf.data.streaming")

    directory = tmp_path_factory.mktemp("labelled")
    write_parquet_dataset(directory, num_images=24, image_size=20, num_shards=1, num_classes=3)
    write_parquet_dataset(directory, num_images=12, image_size=20, num_shards=1, num_classes=3, seed=1, split="test")
    return directory


@pytest.fixture(scope="module")
def tiny_backbone(tmp_path_factory) -> Path:
    return save_tiny_backbone(tmp_path_factory.mktemp("backbone"))


# ------------------------------------------------------------------------------ run output folders
@pytest.fixture(scope="module")
def training_output(tmp_path_factory) -> Path:
    return write_training_output(tmp_path_factory.mktemp("run"))


# ------------------------------------------------------------------------------ scripts
def _import_script(name: str):
    """Import scripts/NAME.py as a module (its main(argv) runs in this process)."""
    sys.path.insert(0, str(REPO_ROOT / "scripts"))
    try:
        return importlib.import_module(name)
    finally:
        sys.path.remove(str(REPO_ROOT / "scripts"))


@pytest.fixture
def import_script():
    """``import_script("eval_knn")``: scripts/eval_knn.py as a module."""
    return _import_script

"""The examples run: ``examples/train_fashion_mnist.py`` and the notebook ``examples/fashion_mnist.ipynb``
(executed by nbclient in a real Jupyter kernel), on a tiny labelled dataset shaped like the prepared
Fashion-MNIST (28 px, parquet train/test shards) and 2 steps, so that neither can rot."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from image_datasets import write_parquet_dataset

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = REPO / "examples"


@pytest.fixture(scope="module")
def fashion_like(tmp_path_factory) -> Path:
    """72 training and 12 test images of 28 px in 3 classes (the recipe's batch is 64)."""
    directory = tmp_path_factory.mktemp("fashion_like")
    write_parquet_dataset(directory, num_images=72, image_size=28, num_shards=2, num_classes=3)
    write_parquet_dataset(directory, num_images=12, image_size=28, num_shards=1, num_classes=3, seed=1, split="test")
    return directory


def _environment() -> dict[str, str]:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "PYTHONPATH": str(REPO),
            "TQDM_DISABLE": "1"}


def test_the_example_script_trains_embeds_and_scores(fashion_like, tmp_path):
    result = subprocess.run([sys.executable, str(EXAMPLES / "train_fashion_mnist.py"), "--data_dir", str(fashion_like),
                             "--output_dir", str(tmp_path / "run"), "--max_steps", "2", "--eval_samples", "8"],
                            env=_environment(), cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "weighted 20-NN on 8 test images: DINO" in result.stdout
    assert (tmp_path / "run" / "backbone" / "model.safetensors").is_file()


def test_the_notebook_runs(fashion_like, tmp_path):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    notebook = nbformat.read(EXAMPLES / "fashion_mnist.ipynb", as_version=4)
    parameters = next(cell for cell in notebook.cells if "parameters" in cell.metadata.get("tags", []))
    parameters.source = (f"DATA_DIR = {str(fashion_like)!r}\nOUTPUT_DIR = {str(tmp_path / 'run')!r}\nMINUTES = 1\n"
                         "MAX_STEPS = 2\nEVAL_SAMPLES = 8\n")
    os.environ.update({"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"})  # the kernel inherits them
    client = nbclient.NotebookClient(notebook, timeout=300, kernel_name="python3",
                                     resources={"metadata": {"path": str(EXAMPLES)}})
    client.execute()
    outputs = "".join(output.get("text", "") for cell in notebook.cells if cell.cell_type == "code"
                      for output in cell.get("outputs", []))
    assert "weighted 20-NN on 8 test images: DINO" in outputs
    images = [output for cell in notebook.cells for output in cell.get("outputs", [])
              if "image/png" in output.get("data", {})]
    assert len(images) >= 3  # a training image, the curves, the attention grid

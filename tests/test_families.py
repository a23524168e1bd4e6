"""Every backbone family through every command and its card (issue 22): for a finished run of each of the
eight families, dino-hf-embed, dino-hf-eval, dino-hf-attention (or its one-sentence refusal for a ConvNet),
the in-training attention snapshot, dino-hf-push to the loopback Hub, and the pushed card's code run in a
fresh interpreter that never imports dino_hf, warning-free, giving the run's own embedding."""

from __future__ import annotations

import json
import logging
import math
import re
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import huggingface_hub
import pytest
import torch
from hub_server import LoopbackHub
from image_datasets import make_image, write_imagefolder_dataset
from PIL import Image
from tiny_models import FAMILY_MODEL_TYPES, TOKEN, tiny_args, tiny_family_config, write_training_output

from dino_hf import DinoTrainer
from dino_hf.cli import attention, embed, evaluate, push
from dino_hf.eval.loading import load_backbone, load_image_processor
from dino_hf.hub.model_card import write_run_cards
from dino_hf.models.backbones import backbone_embedding, backbone_forward, family_of
from dino_hf.models.modeling_dino import DinoForPreTraining

pytestmark = pytest.mark.filterwarnings("ignore:Use 'content=<...>':DeprecationWarning")

CONVNETS = ("convnext", "dinov3_convnext", "resnet")
MODEL_CLASSES = {
    "vit": "ViTModel", "deit": "DeiTModel", "dinov2": "Dinov2Model", "dinov2_with_registers": "Dinov2WithRegistersModel",
    "dinov3_vit": "DINOv3ViTModel", "convnext": "ConvNextModel", "dinov3_convnext": "DINOv3ConvNextModel",
    "resnet": "ResNetModel",
}


def write_labelled_imagefolder(root: Path, num_train: int = 12, num_test: int = 6, num_classes: int = 3) -> Path:
    """``root/{train,test}/class_c/image_i.png``: an imagefolder with both splits, labels from the folders."""
    write_imagefolder_dataset(root / "train", num_images=num_train, num_classes=num_classes, seed=0)
    write_imagefolder_dataset(root / "test", num_images=num_test, num_classes=num_classes, seed=1)
    return root


def train_family_run(output_dir: Path, model_type: str, images: Path) -> tuple[Path, list[str]]:
    """A real 3-step DinoTrainer run of the family's tiny backbone from scratch, with a final k-NN evaluation on
    ``images`` (also its training images), exported at the 32 px training resolution; and the warnings the run
    logged or raised (a user must be able to act on each: there should be none)."""
    config_dir = output_dir.parent / f"{model_type}_config"
    tiny_family_config(model_type).save_pretrained(config_dir)
    args = tiny_args(images, output_dir, config_dir / "config.json", max_steps=3, checkpointing_steps=3, logging_steps=1,
                     eval_dataset_name=str(images), eval_k=[1, 3], mixed_precision="no", seed=0)
    heard = _WarningRecorder()
    with warnings.catch_warnings(record=True) as raised:
        warnings.simplefilter("always")
        logging.getLogger().addHandler(heard)
        try:
            DinoTrainer(args=args).train()
        finally:
            logging.getLogger().removeHandler(heard)
    return output_dir, heard.messages + [str(warning.message) for warning in raised]


class _WarningRecorder(logging.Handler):
    """The messages of every warning logged while it is attached to the root logger."""

    def __init__(self) -> None:
        super().__init__(level=logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


@pytest.fixture(scope="module")
def eval_folder(tmp_path_factory) -> Path:
    return write_labelled_imagefolder(tmp_path_factory.mktemp("eval_images"))


@pytest.fixture(scope="module")
def trained(tmp_path_factory, eval_folder) -> dict[str, tuple[Path, list[str]]]:
    root = tmp_path_factory.mktemp("runs")
    return {model_type: train_family_run(root / model_type, model_type, eval_folder) for model_type in FAMILY_MODEL_TYPES}


@pytest.fixture(scope="module")
def runs(trained) -> dict[str, Path]:
    return {model_type: run for model_type, (run, _) in trained.items()}


@pytest.mark.parametrize("model_type", FAMILY_MODEL_TYPES)
def test_three_steps_of_every_family_train_evaluate_and_export_without_a_warning(model_type, trained):
    run, heard = trained[model_type]
    assert heard == []
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in rows if "loss" in row] == [1, 2, 3]
    assert all(math.isfinite(row["loss"]) for row in rows if "loss" in row)
    assert any({"knn_top1_k1", "knn_top1_k3"} <= set(row) for row in rows)  # the final evaluation
    config = json.loads((run / "backbone" / "config.json").read_text())
    assert config["model_type"] == model_type and (run / "backbone" / "README.md").is_file()
    assert (run / "attention").is_dir() != (model_type in CONVNETS)  # the snapshot only where there is attention


@pytest.fixture
def no_warnings(caplog, recwarn):
    """The command logs no warning and raises no Python warning (nothing a user could not act on)."""
    caplog.set_level(logging.INFO)
    yield
    logged = [record.getMessage() for record in caplog.records if record.levelno >= logging.WARNING]
    assert not logged, logged
    assert not [str(warning.message) for warning in recwarn.list], [str(warning.message) for warning in recwarn.list]


def _embeddings_of(run: Path, images: list[Image.Image]) -> torch.Tensor:
    backbone = load_backbone(run)
    processor = load_image_processor(run, backbone.config)
    with torch.no_grad():
        pixels = processor(images=images, return_tensors="pt")["pixel_values"]
        return backbone_embedding(backbone, backbone_forward(backbone, pixels))


# ------------------------------------------------------------------------------ the commands
@pytest.mark.parametrize("model_type", FAMILY_MODEL_TYPES)
@pytest.mark.usefixtures("no_warnings")
def test_embed_writes_the_familys_embedding_with_the_datasets_labels(model_type, runs, eval_folder, tmp_path):
    import datasets

    output = tmp_path / "embeddings"
    assert embed.main(["--model_name_or_path", str(runs[model_type]), "--dataset_name", str(eval_folder),
                       "--dataset_split", "test", "--output_dir", str(output), "--per_device_eval_batch_size", "4"]) == 0
    exported = datasets.load_dataset(str(output), split="test")
    source = datasets.load_dataset(str(eval_folder), split="test")
    assert exported.column_names == ["id", "label", "embedding"]
    assert exported["label"] == source["label"] and exported.features["label"] == source.features["label"]
    expected = _embeddings_of(runs[model_type], [image.convert("RGB") for image in source["image"]])
    torch.testing.assert_close(torch.tensor(exported["embedding"]), expected, rtol=1e-4, atol=1e-5)
    assert "DINO embeddings" in (output / "README.md").read_text()


@pytest.mark.parametrize("model_type", FAMILY_MODEL_TYPES)
@pytest.mark.usefixtures("no_warnings")
def test_eval_scores_a_run_of_every_family(model_type, runs, eval_folder, tmp_path):
    result_file = tmp_path / "results.json"
    assert evaluate.main(["--model_name_or_path", str(runs[model_type]), "--dataset_name", str(eval_folder),
                          "--k", "1", "3", "--per_device_eval_batch_size", "4", "--output_file", str(result_file)]) == 0
    results = json.loads(result_file.read_text())
    assert results["feature_dim"] == 32 and results["num_test_samples"] == 6 and 0 <= results["knn_top1_k3"] <= 1
    # the run's own final evaluation: same weights, data and protocol, so the same figures
    in_training = [row for row in map(json.loads, (runs[model_type] / "metrics.jsonl").read_text().splitlines())
                   if "knn_top1_k3" in row][-1]
    for k in (1, 3):
        assert results[f"knn_top1_k{k}"] == pytest.approx(in_training[f"knn_top1_k{k}"], abs=1e-3)


@pytest.mark.parametrize("model_type", FAMILY_MODEL_TYPES)
@pytest.mark.usefixtures("no_warnings")
def test_attention_draws_a_transformer_and_refuses_a_convnet_in_one_sentence(model_type, runs, tmp_path, capsys):
    picture = tmp_path / "picture.png"
    make_image(0, 40).save(picture)
    status = attention.main(["--model_name_or_path", str(runs[model_type]), "--image", str(picture),
                             "--output_dir", str(tmp_path / "maps")])
    captured = capsys.readouterr()
    if model_type in CONVNETS:
        assert status == 2 and not (tmp_path / "maps").exists()
        lines = captured.err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("dino-hf-attention: error: ")
        assert "has no self-attention" in lines[0] and MODEL_CLASSES[model_type] in lines[0]
        assert "eager" not in captured.err
    else:
        assert status == 0, captured.err
        assert (tmp_path / "maps" / "picture" / "grid.png").is_file()


@pytest.mark.parametrize("model_type", ["vit", "dinov2_with_registers", "convnext", "resnet"])
def test_the_in_training_attention_snapshot_skips_a_convnet_with_one_info_line(model_type, runs, eval_folder,
                                                                                 tmp_path, caplog):
    from dino_hf.eval.evaluation import KnnMonitor

    monitor = KnnMonitor(str(eval_folder), k=(1,), batch_size=4)
    backbone = DinoForPreTraining.from_pretrained(runs[model_type]).teacher.backbone
    with caplog.at_level(logging.INFO, logger="dino_hf.eval.evaluation"):
        first = monitor.attention_snapshot(backbone, tmp_path / "step_1", num_images=2)
        second = monitor.attention_snapshot(backbone, tmp_path / "step_2", num_images=2)
    assert not [record for record in caplog.records if record.levelno >= logging.WARNING]
    said = [record.getMessage() for record in caplog.records if "attention" in record.getMessage()]
    if model_type in CONVNETS:
        assert first == second == [] and not (tmp_path / "step_1").exists()
        assert len(said) == 1 and "has no self-attention" in said[0]  # once per monitor, not per evaluation
    else:
        assert len(first) == len(second) == 2 and not said


# ------------------------------------------------------------------------------ the card and the Hub
@pytest.fixture(scope="module")
def pushed(runs, tmp_path_factory) -> dict[str, Path]:
    """Each run pushed with dino-hf-push to the loopback Hub, then the repository's files checked out; and
    ``legacy``: a ViT exported without a pooler (by an earlier dino_hf), whose card passes add_pooling_layer."""
    root = tmp_path_factory.mktemp("checkouts")
    runs = {**runs, "legacy": write_training_output(tmp_path_factory.mktemp("legacy"))}
    checkouts = {}
    with LoopbackHub(token=TOKEN) as hub, pytest.MonkeyPatch.context() as patch:
        patch.setattr(huggingface_hub.constants, "ENDPOINT", hub.url)
        patch.setattr(huggingface_hub.constants, "HF_HUB_DISABLE_XET", True)
        patch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
        patch.setenv("HF_TOKEN", TOKEN)
        for model_type, run in runs.items():
            repo_id = f"{hub.user}/tiny-{model_type.replace('_', '-')}"
            assert push.main(["--output_dir", str(run), "--hub_model_id", repo_id]) == 0
            checkouts[model_type] = checkout = root / model_type
            for path, content in hub.files(repo_id).items():
                (checkout / path).parent.mkdir(parents=True, exist_ok=True)
                (checkout / path).write_bytes(content)
            (checkout / "repo_id").write_text(repo_id)
        assert hub.unhandled == []
    return checkouts


# In a fresh interpreter that never imports dino_hf: every ```python block of each card, the repository
# id replaced by the checked-out folder, run from a folder holding image.jpg; the embeddings come back.
_RUN_CARD_CODE = textwrap.dedent(
    """
    import json, re, sys, warnings
    from pathlib import Path
    warnings.simplefilter("always")
    results = {}
    for checkout in sys.argv[1:]:
        card = Path(checkout, "README.md").read_text()
        repo_id = Path(checkout, "repo_id").read_text()
        blocks = [block.replace(repo_id, checkout) for block in re.findall(r"```python\\n(.*?)```", card, re.S)]
        first = {}
        exec(blocks[0], first)
        second = {}
        exec(blocks[1], second)
        result = {"class": type(first["model"]).__name__, "embedding": first["embedding"].tolist(),
                  "pipeline": second["embedding"].tolist(), "blocks": len(blocks)}
        if len(blocks) > 2:
            exec(blocks[2], first)
            result["attention"] = list(first["cls_attention"].shape)
        results[checkout] = result
    assert not any(name.split(".")[0] == "dino_hf" for name in sys.modules)
    print(json.dumps(results))
    """
)


@pytest.fixture(scope="module")
def card_code_results(pushed, tmp_path_factory) -> tuple[dict, str]:
    folder = tmp_path_factory.mktemp("user")
    make_image(5, 48).convert("RGB").save(folder / "image.jpg")
    completed = subprocess.run([sys.executable, "-c", _RUN_CARD_CODE, *map(str, pushed.values())], cwd=folder,
                               capture_output=True, text=True, timeout=300, env={**_offline_env(), "PYTHONPATH": ""})
    assert completed.returncode == 0, completed.stderr[-4000:]
    return json.loads(completed.stdout.strip().splitlines()[-1]), completed.stderr


def _offline_env() -> dict[str, str]:
    import os

    return {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_DISABLE_PROGRESS_BARS": "1"}


def test_the_pushed_cards_code_runs_without_a_warning_and_gives_the_runs_embedding(pushed, runs, card_code_results):
    results, stderr = card_code_results
    # no warning a user cannot act on: no load report, no missing or random weights, no Python warning
    for needle in ("LOAD REPORT", "MISSING", "UNEXPECTED", "newly initialized", "Warning", "warn"):
        assert needle not in stderr, stderr[-3000:]
    legacy = results[str(pushed["legacy"])]
    assert legacy["class"] == "ViTModel" and "attention" in legacy
    torch.testing.assert_close(torch.tensor(legacy["pipeline"]), torch.tensor(legacy["embedding"]))
    for model_type in FAMILY_MODEL_TYPES:
        checkout = pushed[model_type]
        result = results[str(checkout)]
        assert result["class"] == MODEL_CLASSES[model_type]
        embedding = torch.tensor(result["embedding"])
        assert embedding.shape == (1, 32)
        torch.testing.assert_close(torch.tensor(result["pipeline"]), embedding, rtol=1e-4, atol=1e-5)
        if model_type in CONVNETS:
            assert result["blocks"] == 2 and "attention" not in result
        else:
            heads, patches = result["attention"]
            assert heads == 2 and patches == 16  # the CLS token's attention to the 4 x 4 patches, registers skipped


def test_the_cards_code_gives_dino_hfs_embedding_of_the_image(pushed, runs, card_code_results, tmp_path):
    results, _ = card_code_results
    image = make_image(5, 48).convert("RGB")
    image.save(tmp_path / "image.jpg")
    image = Image.open(tmp_path / "image.jpg").convert("RGB")  # the JPEG the card's code read
    for model_type in FAMILY_MODEL_TYPES:
        expected = _embeddings_of(runs[model_type], [image])
        torch.testing.assert_close(torch.tensor(results[str(pushed[model_type])]["embedding"]), expected,
                                   rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("model_type", FAMILY_MODEL_TYPES)
def test_the_card_speaks_of_its_family_and_of_what_ran(model_type, pushed, runs):
    card = (pushed[model_type] / "README.md").read_text()
    usage = family_of(model_type).usage(json.loads((runs[model_type] / "backbone" / "config.json").read_text()))
    assert f"`{MODEL_CLASSES[model_type]}`" in card and f"{usage.name} backbone" in card
    assert usage.embedding in card
    assert "| Mixed precision | fp32 (no autocast) |" in card
    assert "Mixed precision | auto" not in card and "add_pooling_layer" not in card
    assert "Input (processor) | `ViTImageProcessor`: resize to 32 x 32 px (bicubic), ImageNet mean/std" in card
    if model_type != "vit":
        assert "`ViTModel`" not in card and "A Vision Transformer" not in card and "vit_small" not in card
    if model_type in CONVNETS:
        assert "CLS" not in card and "pooler_output" in card and "no self-attention maps" in card
    else:
        assert "CLS token of `last_hidden_state`" in card
    assert re.search(r"dino-hf-eval --model_name_or_path \S+ --dataset_name eval_images\d* --train_split train "
                     r"--eval_split test --k 1 3", card)


def test_write_run_cards_writes_the_run_folder_and_backbone_cards(runs, tmp_path):
    run = runs["dinov2"]
    written = write_run_cards(run)
    assert written == [run / "backbone" / "README.md", run / "README.md"]
    text = written[0].read_text()
    assert written[1].read_text() == text and "`Dinov2Model`" in text
    assert f"# {run.name}" in text  # a local card is named after its run
    # the card's code loads the exported folder (a path as the run's files write them)
    assert 'AutoModel.from_pretrained("' in text and "/backbone\")" in text
    # a push dry run saves the card it would push
    assert push.main(["--output_dir", str(run), "--hub_model_id", "someone/tiny-dinov2", "--dry_run"]) == 0
    assert 'AutoModel.from_pretrained("someone/tiny-dinov2")' in (run / "README.md").read_text()
    assert 'AutoModel.from_pretrained("someone/tiny-dinov2")' in (run / "backbone" / "README.md").read_text()

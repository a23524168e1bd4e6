"""Tests of dino_hf.eval.evaluation and the evaluation scripts (CPU, tiny models, a few seconds each):
k-NN, linear probe, features, the in-training monitor."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from transformers import ViTImageProcessor, ViTModel

from dino_hf.eval.evaluation import (
    KnnMonitor,
    LabelEncoder,
    extract_features,
    knn_accuracy,
    linear_probe_accuracy,
    make_eval_dataloader,
    weighted_knn_predict,
)
from dino_hf.eval.loading import load_backbone
from tests.tiny_models import tiny_vit  # as tests.tiny_models: _distributed_extract runs in a subprocess

REPO_ROOT = Path(__file__).resolve().parents[2]
T = 0.07


def unit(*rows: tuple[float, ...]) -> torch.Tensor:
    return F.normalize(torch.tensor(rows, dtype=torch.float32), dim=1)


def reference_knn(train, train_labels, test, k, temperature, num_classes):
    """Row-by-row official DINO knn_classifier (sorted top-k, exp(sim/T) one-hot votes)."""
    predictions = []
    for feature in test:
        similarity = train @ feature
        values, indices = similarity.sort(descending=True, stable=True)
        votes = torch.zeros(num_classes)
        for value, index in zip(values[:k], indices[:k], strict=True):
            votes[train_labels[index]] += math.exp(value.item() / temperature)
        predictions.append(int(votes.argmax()))
    return torch.tensor(predictions)


# ------------------------------------------------------------------------------------------ k-NN


def test_weighted_knn_hand_computed_votes():
    # train: a0=(1,0) c0, a1=(.6,.8) c1, a2=(.8,.6) c0, a3=(0,1) c2, a4=(-1,0) c1
    train = unit((1, 0), (0.6, 0.8), (0.8, 0.6), (0, 1), (-1, 0))
    labels = torch.tensor([0, 1, 0, 2, 1])
    test = unit((1, 0), (0, 1), (0.6, 0.8))
    predictions = weighted_knn_predict(train, labels, test, k=(1, 2, 3), temperature=T)
    # (0,1): sims a3=1, a1=.8, a2=.6 -> k1: c2; k2: c2 e^(1/T) > c1 e^(.8/T); k3: c2 vs c1 vs c0
    assert predictions[1].tolist() == [0, 2, 1]
    assert predictions[2].tolist() == [0, 2, 1]
    votes_k3 = {2: math.exp(1 / T), 1: math.exp(0.8 / T), 0: math.exp(0.6 / T)}
    assert max(votes_k3, key=votes_k3.get) == predictions[3][1].item() == 2
    # (.6,.8): sims a1=1, a3=.8, a2=.96 -> order a1 (c1), a2 (c0), a0 (c0, .6) -> k3: c1 e^(1/T)
    # = e^14.29 vs c0 e^(.96/T) + e^(.6/T) = e^13.71 + e^8.57 -> c1
    c1, c0 = math.exp(1 / T), math.exp(0.96 / T) + math.exp(0.6 / T)
    assert c1 > c0 and predictions[3][2].item() == 1


def test_weighted_knn_vote_tie_goes_to_smaller_class():
    # The test point is exactly between a class-1 and a class-0 sample: equal votes with k=2.
    train = unit((1, 0), (0, 1))
    labels = torch.tensor([1, 0])
    test = unit((1, 1))
    assert weighted_knn_predict(train, labels, test, k=2)[2].tolist() == [0]
    # Equal similarities inside k, same class: the tie does not matter.
    train = unit((1, 0), (1, 0), (0, 1))
    labels = torch.tensor([3, 3, 1])
    assert weighted_knn_predict(train, labels, unit((1, 0.1)), k=2)[2].tolist() == [3]


def test_weighted_knn_k_larger_than_a_class_and_than_the_train_set():
    # class 0: two samples close to the test point; class 1: three samples far from it.
    train = unit((1, 0.05), (1, -0.05), (0, 1), (-0.2, 1), (0.2, -1))
    labels = torch.tensor([0, 0, 1, 1, 1])
    test = unit((1, 0))
    predictions = weighted_knn_predict(train, labels, test, k=(2, 5, 50), temperature=T)
    # k=5 > |class 0|: three class-1 votes, but exp(sim/T) weighting keeps class 0 ahead
    assert predictions[2].tolist() == predictions[5].tolist() == predictions[50].tolist() == [0]
    # with a huge temperature every vote weighs ~1: plain majority -> class 1
    assert weighted_knn_predict(train, labels, test, k=5, temperature=1e6)[5].tolist() == [1]
    # the same thing through knn_accuracy, num_classes larger than the labels seen
    accuracies = knn_accuracy(train, labels, test, torch.tensor([0]), k=(1, 5), num_classes=7)
    assert accuracies == {1: 1.0, 5: 1.0}


@pytest.mark.parametrize("chunk_size", [None, 1, 7])
def test_weighted_knn_matches_reference_for_several_k(chunk_size):
    generator = torch.Generator().manual_seed(0)
    train = F.normalize(torch.randn(60, 8, generator=generator), dim=1)
    labels = torch.randint(0, 5, (60,), generator=generator)
    test = F.normalize(torch.randn(23, 8, generator=generator), dim=1)
    ks = (1, 3, 10, 20)
    predictions = weighted_knn_predict(train, labels, test, ks, T, num_classes=5, chunk_size=chunk_size)
    for k in ks:
        assert torch.equal(predictions[k], reference_knn(train, labels, test, k, T, 5)), k
        single = weighted_knn_predict(train, labels, test, k, T, num_classes=5)
        assert torch.equal(single[k], predictions[k])


def test_knn_accuracy_counts_and_validates():
    train = unit((1, 0), (0, 1))
    labels = torch.tensor([0, 1])
    test = unit((1, 0.1), (0.1, 1), (1, 0), (1, 0.2))
    test_labels = torch.tensor([0, 1, 1, 2])  # class 2 never seen in train: an error
    assert knn_accuracy(train, labels, test, test_labels, k=1) == {1: 0.5}
    with pytest.raises(ValueError):
        knn_accuracy(train, labels, test, test_labels, k=0)
    with pytest.raises(ValueError):
        knn_accuracy(train, torch.tensor([0, -1]), test, test_labels, k=1)


def test_label_encoder_keeps_ints_and_maps_strings():
    encoder = LabelEncoder()
    assert [encoder(3), encoder(torch.tensor(1))] == [3, 1]
    strings = LabelEncoder()
    assert [strings(x) for x in ("cat", "dog", "cat", "bird")] == [0, 1, 0, 2]


def test_eval_dataloader_converts_to_rgb_and_encodes_string_labels():
    import datasets

    images = [Image.new("L", (10, 12), value) for value in (0, 100, 200)]  # grayscale, not square
    dataset = datasets.Dataset.from_dict(
        {"picture": images, "kind": ["dog", "cat", "dog"]},
        features=datasets.Features({"picture": datasets.Image(), "kind": datasets.Value("string")}),
    )
    processor = ViTImageProcessor(image_mean=[0.5] * 3, image_std=[0.5] * 3, size={"height": 16, "width": 16})
    loader = make_eval_dataloader(dataset, processor, image_column="picture", label_column="kind", batch_size=2)
    batches = list(loader)
    assert batches[0]["pixel_values"].shape == (2, 3, 16, 16)
    assert torch.cat([batch["labels"] for batch in batches]).tolist() == [1, 0, 1]  # sorted: cat 0, dog 1
    with pytest.raises(ValueError, match="no column 'label'"):
        make_eval_dataloader(dataset, processor, image_column="picture")


# ------------------------------------------------------------------------------------ linear probe


def test_linear_probe_on_separable_features():
    generator = torch.Generator().manual_seed(0)
    centres = torch.randn(3, 16, generator=generator) * 4
    train_labels = torch.arange(90) % 3
    test_labels = torch.arange(30) % 3
    train = centres[train_labels] + torch.randn(90, 16, generator=generator)
    test = centres[test_labels] + torch.randn(30, 16, generator=generator)
    assert linear_probe_accuracy(train, train_labels, test, test_labels, max_iterations=50) == 1.0
    # feature scale does not matter (standardisation); inference tensors are accepted
    with torch.inference_mode():
        big_train, big_test = train * 1e3 + 50, test * 1e3 + 50
    assert linear_probe_accuracy(big_train, train_labels, big_test, test_labels, max_iterations=50) == 1.0
    # labels unrelated to the features: near chance on the test set
    shuffled = test_labels[torch.randperm(30, generator=generator)]
    assert linear_probe_accuracy(train, train_labels, test, shuffled, max_iterations=50) < 0.8


# --------------------------------------------------------------------------------------- features


def test_extract_features_normalised_and_matching_cls_token():
    model = tiny_vit()
    pixels = torch.randn(10, 3, 32, 32)
    labels = torch.arange(10)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(pixels, labels), batch_size=4)
    model.train()
    features, out_labels = extract_features(model, loader)
    assert model.training  # mode restored
    assert features.shape == (10, 32) and torch.equal(out_labels, labels)
    torch.testing.assert_close(features.norm(dim=1), torch.ones(10))
    with torch.no_grad():
        expected = F.normalize(model.eval()(pixels).last_hidden_state[:, 0], dim=1)
    torch.testing.assert_close(features, expected, atol=1e-5, rtol=1e-5)
    # a larger resolution goes through position-embedding interpolation
    batch = [{"pixel_values": torch.randn(2, 3, 48, 48), "labels": torch.tensor([0, 1])}]
    assert extract_features(model, batch)[0].shape == (2, 32)


def _distributed_extract(result_dir: str) -> None:
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=True)
    model = tiny_vit()
    pixels = torch.randn(11, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(pixels, torch.arange(11)), batch_size=2)
    features, labels = extract_features(model, loader, accelerator)
    if accelerator.is_main_process:
        torch.save(
            {"features": features, "labels": labels, "n": accelerator.num_processes},
            Path(result_dir) / "result.pt",
        )


def test_extract_features_two_processes_gather_everything_once(tmp_path):
    # In a fresh interpreter: forking this one (which has run torch ops) can deadlock OpenMP.
    code = (
        "import sys; from accelerate import debug_launcher; from tests.eval.test_evaluation import "
        f"_distributed_extract; debug_launcher(_distributed_extract, args=({str(tmp_path)!r},), num_processes=2)"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, check=False, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    result = torch.load(tmp_path / "result.pt")
    assert result["n"] == 2
    assert sorted(result["labels"].tolist()) == list(range(11))  # padding duplicates dropped
    pixels = torch.randn(11, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = F.normalize(tiny_vit()(pixels).last_hidden_state[:, 0], dim=1)
    torch.testing.assert_close(result["features"], expected[result["labels"]], atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------------------ scripts + monitor


def run_script(name: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(REPO_ROOT / "scripts" / name), *args],
        capture_output=True,
        text=True,
        check=False,
        cwd=REPO_ROOT,
        env={**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"},
        timeout=300,
    )


@pytest.mark.slow  # the script in a process; the dino-hf-eval CLI test runs it in the default run
def test_eval_knn_script_on_saved_backbone(tmp_path, tiny_backbone, labelled_parquet):
    output = tmp_path / "results.json"
    common = ["--model", str(tiny_backbone), "--dataset_name", str(labelled_parquet)]
    result = run_script(
        "eval_knn.py",
        *common,
        "--k",
        "1",
        "5",
        "--output_file",
        str(output),
        "--batch_size",
        "5",
        "--linear_probe",
    )
    assert result.returncode == 0, result.stderr
    summary = json.loads(output.read_text())
    assert summary["num_train_samples"] == 24 and summary["num_test_samples"] == 12
    assert summary["num_classes"] == 3 and summary["feature_dim"] == 32
    assert "knn_top1_k5: " in result.stdout

    # the same figures in-process (the script is the library's functions, deterministic on CPU)
    monitor = KnnMonitor(str(labelled_parquet), k=(1, 5), batch_size=7, linear_probe=True)
    metrics = monitor.evaluate(load_backbone(tiny_backbone))
    for key in ("knn_top1_k1", "knn_top1_k5", "linear_probe_top1"):
        assert summary[key] == pytest.approx(metrics[key], abs=1e-6), key


def test_eval_knn_script_input_errors(tmp_path, tiny_backbone, labelled_parquet, capsys, import_script):
    eval_knn = import_script("eval_knn")
    cases = [
        (
            ["--model", str(tmp_path / "nowhere"), "--dataset_name", str(labelled_parquet)],
            "--model",
        ),
        (
            [
                "--model",
                str(tiny_backbone),
                "--dataset_name",
                str(labelled_parquet),
                "--label_column",
                "fine_label",
            ],
            "fine_label",
        ),
        (
            ["--model", str(tiny_backbone), "--dataset_name", str(tmp_path / "missing")],
            "--dataset_name",
        ),
        (
            [
                "--model",
                str(tiny_backbone),
                "--dataset_name",
                str(labelled_parquet),
                "--test_split",
                "validation",
            ],
            "validation",
        ),
    ]
    for argv, needle in cases:
        assert eval_knn.main(argv, prog="eval_knn.py") == 2
        error = capsys.readouterr().err.strip().splitlines()[-1]  # after any log line
        assert error.startswith("eval_knn.py: error: ") and needle in error, error


def test_knn_monitor_caches_and_reports(tiny_backbone, labelled_parquet):
    monitor = KnnMonitor(
        str(labelled_parquet),
        test_split="train",
        k=(1, 20),
        max_train_samples=16,
        max_test_samples=8,
        batch_size=4,
    )
    backbone = ViTModel.from_pretrained(tiny_backbone, add_pooling_layer=False)
    backbone.train()
    first = monitor.evaluate(backbone)
    assert set(first) == {"knn_top1_k1", "knn_top1_k20"}
    assert first["knn_top1_k1"] == 1.0  # the 8 test images are among the 16 train images
    assert backbone.training
    assert set(monitor._cache) == {"train", "test"}
    assert monitor.evaluate(backbone) == first  # from the cache
    with pytest.raises(ValueError, match="no column"):
        KnnMonitor(str(labelled_parquet), label_column="fine_label")


def test_knn_monitor_attention_snapshot(tmp_path):
    """The fixed-image attention maps the training loop saves at eval steps."""
    from transformers import ViTConfig, ViTModel

    from dino_hf.eval.evaluation import KnnMonitor
    from tests.image_datasets import write_parquet_dataset

    data_dir = write_parquet_dataset(tmp_path / "data", num_images=8, image_size=40, num_shards=1)
    backbone = ViTModel(
        ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                  image_size=32, patch_size=8, layer_norm_eps=1e-6),
        add_pooling_layer=False,
    )
    monitor = KnnMonitor(str(data_dir), train_split="train", test_split="train")
    grids = monitor.attention_snapshot(backbone, tmp_path / "attention", num_images=3)
    assert len(grids) == 3
    assert (tmp_path / "attention" / "image2-mean-mask.png").is_file()
    assert backbone.config._attn_implementation != "eager"  # switched back after drawing


@pytest.mark.usefixtures("fresh_accelerate_state")
def test_the_in_training_figure_is_the_one_dino_hf_eval_gives_on_the_export(tmp_path):
    """On the same folder, subset and seed: the monitor of a bf16 run (its second evaluation, from its
    cache) and dino-hf-eval on the exported backbone agree to 3 decimals, feature for feature. They did
    not while the monitor ran under the run's autocast and on float16-cached pixels (features off by 2e-3
    and 3e-5 here; on Fashion-MNIST a bf16 run's 20-NN read 0.689 against dino-hf-eval's 0.690)."""
    from accelerate import Accelerator

    from dino_hf.cli import evaluate
    from dino_hf.models.modeling_dino import DinoForPreTraining
    from tests.image_datasets import write_imagefolder_dataset
    from tests.tiny_models import tiny_dino_config

    folder = tmp_path / "images"
    write_imagefolder_dataset(folder / "train", num_images=48, num_classes=3, seed=0)
    write_imagefolder_dataset(folder / "test", num_images=36, num_classes=3, seed=1)
    torch.manual_seed(0)
    model = DinoForPreTraining(tiny_dino_config())
    model.save_backbone(tmp_path / "backbone")
    monitor = KnnMonitor(str(folder), k=(1, 3, 20), batch_size=16, max_train_samples=40, max_test_samples=30, seed=3)
    accelerator = Accelerator(mixed_precision="bf16")
    teacher = model.teacher.backbone
    first = monitor.evaluate(teacher, accelerator)
    in_training = monitor.evaluate(teacher, accelerator)  # from the cache, as every later evaluation
    assert in_training == first and set(monitor._cache) == {"train", "test"}
    cached_features = monitor.features(teacher, accelerator)["test"][0]

    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)  # the command builds its own Accelerator
    GradientState._reset_state()
    output = tmp_path / "eval.json"
    assert evaluate.main(["--model_name_or_path", str(tmp_path / "backbone"), "--dataset_name", str(folder), "--k", "1",
                          "3", "20", "--max_train_samples", "40", "--max_eval_samples", "30", "--seed", "3",
                          "--output_file", str(output)]) == 0
    command = json.loads(output.read_text())
    assert (command["num_train_samples"], command["num_test_samples"]) == (40, 30)
    for key, value in in_training.items():
        assert round(command[key], 3) == round(value, 3), (key, command[key], value)
    # feature for feature: the cached pixels and the fp32 forward are the export's own
    exported = load_backbone(tmp_path / "backbone")
    from dino_hf.eval.loading import load_image_processor

    loader = make_eval_dataloader(monitor.datasets["test"], load_image_processor(tmp_path / "backbone", exported.config),
                                  batch_size=16)
    expected, _ = extract_features(exported, loader)
    torch.testing.assert_close(cached_features, expected, rtol=0, atol=1e-6)

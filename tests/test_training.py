"""The training loop in one process (CPU, tiny model): end to end, the optimiser step, non-finite
steps, checkpoints, and the bad-input behaviour of scripts/train.py.

Multi-process, kill-and-resume and signal tests live in tests/test_training_processes.py.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import math
from pathlib import Path

import pytest
import torch
from image_datasets import write_parquet_dataset, write_webdataset_dataset
from tiny_models import tiny_dino_config

from dino_hf import checkpointing
from dino_hf.builders import apply_config_overrides, build_optimizer
from dino_hf.checkpointing import list_checkpoints
from dino_hf.metrics import CollapseMonitor
from dino_hf.modeling_dino import DinoForPreTraining
from dino_hf.schedules import DinoSchedules, ScheduleValues
from dino_hf.train_step import DinoTrainStep
from dino_hf.training import NonFiniteLossError, train
from dino_hf.training_args import DinoTrainingArguments

REPO = Path(__file__).resolve().parents[1]
METRIC_KEYS = {"step", "loss", "learning_rate", "weight_decay", "teacher_momentum", "teacher_temperature",
               "grad_norm", "teacher_entropy", "teacher_mean_entropy", "images_per_second", "data_wait_fraction"}


@pytest.fixture(autouse=True)
def fresh_accelerate_state():
    """Accelerate keeps process-wide singletons; each in-process run starts from a clean state."""
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    yield
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    return write_parquet_dataset(tmp_path_factory.mktemp("data"), num_images=48, image_size=40, num_shards=2)


@pytest.fixture(scope="module")
def tiny_config_file(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("tiny_config")
    tiny_dino_config().save_pretrained(folder)
    return folder / "config.json"


def tiny_args(dataset: Path, output_dir: Path, config_file: Path, **overrides) -> DinoTrainingArguments:
    values = {
        "dataset_name": str(dataset),
        "output_dir": str(output_dir),
        "model_config": str(config_file),
        "global_crop_size": 32,
        "local_crop_size": 16,
        "num_local_crops": 2,
        "per_device_train_batch_size": 8,
        "max_steps": 4,
        "logging_steps": 2,
        "checkpointing_steps": 2,
        "dataloader_num_workers": 0,
        "warmup_steps": 1,
        "freeze_last_layer_steps": 1,
        "shuffle_buffer_size": 16,
    }
    values.update(overrides)
    return DinoTrainingArguments(**values)


def read_rows(output_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]


# ------------------------------------------------------------------------------ end to end
@pytest.mark.parametrize("mixed_precision", ["no", "bf16"])
def test_a_few_steps_from_local_parquet(dataset, tiny_config_file, tmp_path, mixed_precision):
    from transformers import AutoModel

    output_dir = tmp_path / "run"
    result = train(tiny_args(dataset, output_dir, tiny_config_file, mixed_precision=mixed_precision))
    assert result.step == 4 and result.interrupted_by is None and result.exit_status == 0

    rows = read_rows(output_dir)
    assert [row["step"] for row in rows] == [2, 4]
    for row in rows:
        assert METRIC_KEYS <= set(row)
        assert math.isfinite(row["loss"]) and row["nonfinite_steps"] == 0
    schedules = DinoSchedules(total_steps=4, learning_rate=5e-4 * 8 / 256, warmup_steps=1, freeze_last_layer_steps=1)
    for row in rows:  # each row carries the schedule values of its last step
        expected = schedules.at(row["step"] - 1)
        assert row["learning_rate"] == pytest.approx(expected.learning_rate)
        assert row["weight_decay"] == pytest.approx(expected.weight_decay)
        assert row["teacher_momentum"] == pytest.approx(expected.teacher_momentum)

    # checkpoints: complete, named by step, pruned to the limit
    assert [path.name for path in list_checkpoints(output_dir)] == ["step_2", "step_4"]
    # end outputs
    saved = json.loads((output_dir / "training_args.json").read_text())
    assert saved["mixed_precision"] == mixed_precision and saved["max_steps"] == 4
    assert saved["num_processes"] == 1 and saved["global_batch_size"] == 8
    reloaded = DinoForPreTraining.from_pretrained(output_dir)
    torch.testing.assert_close(reloaded.teacher.state_dict(), result.model.teacher.state_dict())
    backbone = AutoModel.from_pretrained(output_dir / "backbone", add_pooling_layer=False)
    pixels = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        features = backbone(pixel_values=pixels).last_hidden_state[:, 0]
        expected = result.model.embed(pixels.to(next(result.model.parameters()).device))
    torch.testing.assert_close(features, expected.float(), rtol=1e-4, atol=1e-4)
    # the teacher moved away from its initialisation (EMA of a trained student)
    fresh = DinoForPreTraining(tiny_dino_config())
    assert not torch.equal(fresh.teacher.head.mlp[0].weight, result.model.teacher.head.mlp[0].weight)


def test_on_device_augmentation_trains_with_the_same_recipe(dataset, tiny_config_file, tmp_path):
    """--augmentation_device cpu: the loader only decodes, the batched multi-crop runs in the loop."""
    from dino_hf.builders import build_augmentation, build_device_augmentation

    args = tiny_args(dataset, tmp_path / "run", tiny_config_file, augmentation_device="cpu",
                     color_jitter_strength=0.5, blur_probability_scale=0.0, solarize_probability=0.1)
    device_augmentation = build_device_augmentation(args, torch.device("cpu"), process_index=0)
    per_image = build_augmentation(args)
    batched = device_augmentation.augmentation
    for name in ("global_crop_size", "local_crop_size", "num_local_crops", "global_crop_scale", "local_crop_scale",
                 "brightness", "contrast", "saturation", "hue", "grayscale_probability", "blur_sigma",
                 "global_blur_probabilities", "local_blur_probability", "global_solarize_probabilities"):
        assert getattr(batched, name) == getattr(per_image, name), name
    views = device_augmentation({"images": torch.randint(0, 256, (3, 3, 37, 37), dtype=torch.uint8),
                                 "image_sizes": torch.tensor([[37, 37], [20, 37], [37, 9]])})
    assert views["global_crops"].shape == (2, 3, 3, 32, 32) and views["local_crops"].shape == (2, 3, 3, 16, 16)

    result = train(args)
    assert result.step == 4 and result.exit_status == 0
    rows = read_rows(tmp_path / "run")
    assert [row["step"] for row in rows] == [2, 4] and all(math.isfinite(row["loss"]) for row in rows)
    assert json.loads((tmp_path / "run" / "training_args.json").read_text())["augmentation_device"] == "cpu"


def test_existing_checkpoints_need_resume_or_overwrite(dataset, tiny_config_file, tmp_path):
    output_dir = tmp_path / "run"
    train(tiny_args(dataset, output_dir, tiny_config_file, max_steps=2))
    with pytest.raises(ValueError, match="--resume_from_checkpoint latest"):
        train(tiny_args(dataset, output_dir, tiny_config_file, max_steps=2))
    result = train(tiny_args(dataset, output_dir, tiny_config_file, max_steps=2, overwrite_output_dir=True))
    assert result.step == 2
    # resuming a finished run is a no-op that rewrites the outputs
    result = train(tiny_args(dataset, output_dir, tiny_config_file, max_steps=2, resume_from_checkpoint="latest"))
    assert result.step == 2 and [row["step"] for row in read_rows(output_dir)] == [2]
    # the per-process state is read with weights_only=True: a file that needs unsafe unpickling is refused
    import numpy as np

    with pytest.raises(ValueError, match="--augmentation_device"):
        train(tiny_args(dataset, output_dir, tiny_config_file, max_steps=2, resume_from_checkpoint="latest",
                        augmentation_device="cpu"))
    process_state = list_checkpoints(output_dir)[-1] / "process_state_0.pt"
    torch.save({"rng": {"numpy": np.random.get_state()}}, process_state)
    with pytest.raises(ValueError, match="unsafe unpickling"):
        train(tiny_args(dataset, output_dir, tiny_config_file, max_steps=2, resume_from_checkpoint="latest"))


# ------------------------------------------------------------------------------ the step itself
def _prepared_step(accumulation: int, clip_mode: str = "per_parameter", seed: int = 0):
    from accelerate import Accelerator

    torch.manual_seed(seed)
    model = DinoForPreTraining(tiny_dino_config(drop_path_rate=0.0))
    accelerator = Accelerator(cpu=True)
    optimizer = build_optimizer(model, accelerator.device)
    model, optimizer = accelerator.prepare(model, optimizer)
    return DinoTrainStep(accelerator, model, optimizer, accumulation, 3.0, clip_mode), accelerator.unwrap_model(model)


def _values(freeze_last_layer: bool = False) -> ScheduleValues:
    return ScheduleValues(learning_rate=1e-3, weight_decay=0.04, teacher_momentum=0.9,
                          teacher_temperature=0.04, freeze_last_layer=freeze_last_layer)


def _crops(batch: int, seed: int) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return {"global_crops": torch.randn(2, batch, 3, 32, 32, generator=generator),
            "local_crops": torch.randn(2, batch, 3, 16, 16, generator=generator)}


def _split(batch: dict[str, torch.Tensor], parts: int) -> list[dict[str, torch.Tensor]]:
    return [{key: value.chunk(parts, dim=1)[index] for key, value in batch.items()} for index in range(parts)]


def test_gradient_accumulation_matches_the_full_batch():
    full_step, full_model = _prepared_step(accumulation=1)
    accumulated_step, accumulated_model = _prepared_step(accumulation=2)
    for step in range(3):
        batch = _crops(8, seed=step)
        full_step(iter([batch]).__next__, _values())
        accumulated_step(iter(_split(batch, 2)).__next__, _values())
    assert full_model.loss_fn.center.abs().sum() > 0
    # The attention key bias has a mathematically zero gradient (softmax ignores a shift); Adam turns
    # its rounding noise into full-size updates, so it is the one tensor that cannot match.
    def comparable(model):
        return {name: value for name, value in model.state_dict().items() if not name.endswith("k_proj.bias")}

    torch.testing.assert_close(comparable(accumulated_model), comparable(full_model), rtol=1e-4, atol=1e-5)


def test_frozen_last_layer_is_not_updated():
    step, model = _prepared_step(accumulation=1)
    last_before = copy.deepcopy(model.student.head.last_layer.state_dict())
    mlp_before = model.student.head.mlp[0].weight.detach().clone()
    step(iter([_crops(4, seed=0)]).__next__, _values(freeze_last_layer=True))
    torch.testing.assert_close(model.student.head.last_layer.state_dict(), last_before, rtol=0, atol=0)
    assert not torch.equal(model.student.head.mlp[0].weight, mlp_before)


@pytest.mark.parametrize("clip_mode", ["per_parameter", "global"])
def test_clipping(clip_mode):
    step, model = _prepared_step(accumulation=1, clip_mode=clip_mode)
    step.max_grad_norm = 0.5
    for index, parameter in enumerate(step.parameters):
        parameter.grad = torch.full_like(parameter, float(index + 1))
    norm_before = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in step.parameters]))
    grad_norm, finite = step._prepare_gradients(freeze_last_layer=False)
    assert bool(finite) and grad_norm == pytest.approx(norm_before.item(), rel=1e-5)
    norms = torch.stack([p.grad.norm() for p in step.parameters])
    if clip_mode == "per_parameter":
        assert torch.all(norms <= 0.5 + 1e-5) and torch.all(norms >= 0.5 - 1e-3)
    else:
        assert torch.linalg.vector_norm(norms) == pytest.approx(0.5, rel=1e-4)


def test_a_non_finite_step_changes_nothing():
    step, model = _prepared_step(accumulation=1)
    step(iter([_crops(4, seed=0)]).__next__, _values())  # a good step: optimiser state exists
    model_before = copy.deepcopy(model.state_dict())
    optimizer_before = copy.deepcopy(step.optimizer.state_dict())
    bad = _crops(4, seed=1)
    bad["global_crops"][0, 0, 0, 0, 0] = float("nan")
    statistics = step(iter([bad]).__next__, _values())
    assert not bool(statistics.finite) and not math.isfinite(statistics.grad_norm.item())
    torch.testing.assert_close(model.state_dict(), model_before, rtol=0, atol=0)  # student, teacher, center
    torch.testing.assert_close(step.optimizer.state_dict()["state"], optimizer_before["state"], rtol=0, atol=0)
    assert all(p.grad is None for p in step.parameters)
    # and training goes on normally afterwards
    assert bool(step(iter([_crops(4, seed=2)]).__next__, _values()).finite)


# ------------------------------------------------------------------------------ non-finite runs
def _poison_forward(monkeypatch, bad_calls: set[int]) -> None:
    original = DinoForPreTraining.forward
    calls = {"count": 0}

    def forward(self, *args, **kwargs):
        output = original(self, *args, **kwargs)
        calls["count"] += 1
        if calls["count"] in bad_calls:
            output.loss = output.loss * float("nan")
        return output

    monkeypatch.setattr(DinoForPreTraining, "forward", forward)


def test_one_non_finite_step_is_skipped_and_logged(dataset, tiny_config_file, tmp_path, monkeypatch):
    _poison_forward(monkeypatch, bad_calls={3})
    output_dir = tmp_path / "run"
    result = train(tiny_args(dataset, output_dir, tiny_config_file, logging_steps=1))
    assert result.step == 4
    rows = read_rows(output_dir)
    assert [row["nonfinite_steps"] for row in rows] == [0, 0, 1, 0]
    assert rows[2]["loss"] is None and math.isfinite(rows[3]["loss"])


def test_consecutive_non_finite_steps_stop_the_run(dataset, tiny_config_file, tmp_path, monkeypatch):
    _poison_forward(monkeypatch, bad_calls=set(range(3, 100)))
    output_dir = tmp_path / "run"
    args = tiny_args(dataset, output_dir, tiny_config_file, logging_steps=1, max_steps=8,
                     max_consecutive_nonfinite_steps=2)
    with pytest.raises(NonFiniteLossError, match="2 optimiser steps in a row") as error:
        train(args)
    assert "step_2" in str(error.value)
    assert [path.name for path in list_checkpoints(output_dir)] == ["step_2"]
    state = json.loads((output_dir / "checkpoints" / "step_2" / "training_state.json").read_text())
    assert state["step"] == 2


# ------------------------------------------------------------------------------ checkpoints
def test_a_crash_during_a_save_leaves_no_complete_looking_folder(dataset, tiny_config_file, tmp_path, monkeypatch):
    original = checkpointing._fsync_folder
    calls = {"count": 0}

    def crash_on_second_save(folder):
        calls["count"] += 1
        if calls["count"] == 2:
            raise RuntimeError("simulated crash while saving")
        original(folder)

    monkeypatch.setattr(checkpointing, "_fsync_folder", crash_on_second_save)
    output_dir = tmp_path / "run"
    with pytest.raises(RuntimeError, match="simulated crash"):
        train(tiny_args(dataset, output_dir, tiny_config_file))
    checkpoints = output_dir / "checkpoints"
    assert sorted(path.name for path in checkpoints.iterdir()) == [".tmp-step_4", "step_2"]
    assert [path.name for path in list_checkpoints(output_dir)] == ["step_2"]
    monkeypatch.setattr(checkpointing, "_fsync_folder", original)
    result = train(tiny_args(dataset, output_dir, tiny_config_file, resume_from_checkpoint="latest"))
    assert result.step == 4
    assert sorted(path.name for path in checkpoints.iterdir()) == ["step_2", "step_4"]


# ------------------------------------------------------------------------------ small pieces
def test_config_overrides_nested_and_typed():
    config = tiny_dino_config()
    apply_config_overrides(config, "backbone_config.hidden_size=64, num_prototypes=128,norm_last_layer=false,"
                                   "drop_path_rate=0.2")
    assert config.backbone_config.hidden_size == 64 and config.num_prototypes == 128
    assert config.norm_last_layer is False and config.drop_path_rate == 0.2
    for bad, fragment in (("nonsense", "key=value"), ("no_such_key=1", "does not name"),
                          ("backbone_config.nope=1", "does not name"), ("num_prototypes=many", "not a valid")):
        with pytest.raises(ValueError, match="--config_overrides") as error:
            apply_config_overrides(config, bad)
        assert fragment in str(error.value)


def test_collapse_monitor_warns_once_after_patience():
    monitor = CollapseMonitor(num_prototypes=64, patience_steps=20)
    uniform = {"loss": math.log(64), "teacher_entropy": math.log(64) - 0.01, "teacher_mean_entropy": math.log(64)}
    assert monitor.update(10, uniform) is None
    assert monitor.update(20, uniform) is None
    message = monitor.update(30, uniform)
    assert message and "uniform" in message and "--teacher_temperature" in message
    assert monitor.update(40, uniform) is None  # once per episode
    healthy = {"loss": 2.0, "teacher_entropy": 1.0, "teacher_mean_entropy": 3.0}
    assert monitor.update(50, healthy) is None
    one_hot = {"loss": 0.1, "teacher_entropy": 0.0, "teacher_mean_entropy": 0.01}
    monitor.update(60, one_hot)
    assert "one-hot" in monitor.update(80, one_hot)


# ------------------------------------------------------------------------------ bad input
def _load_script():
    spec = importlib.util.spec_from_file_location("train_script", REPO / "scripts" / "train.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _bad_input_cases(webdataset: Path) -> list[tuple[list[str], str]]:
    """(extra flags, text the error must contain); every case but the stream one adds --max_steps 2."""
    cases = [
        (["--model_config", "vit_gigantic_patch3"], "--model_config"),
        (["--dataset_name", "/no/such/dataset"], "--dataset_name"),
        (["--image_column", "pixels"], "--image_column"),
        (["--local_crop_size", "12"], "--local_crop_size"),
        (["--local_crop_size", "64"], "--local_crop_size"),
        (["--global_crop_scale", "0.8", "0.2"], "--global_crop_scale"),
        (["--num_local_crops", "-2"], "--num_local_crops"),
        (["--per_device_train_batch_size", "-1"], "--per_device_train_batch_size"),
        (["--resume_from_checkpoint", "/no/such/checkpoint"], "--resume_from_checkpoint"),
        (["--config_overrides", "no_such_key=1"], "--config_overrides"),
        (["--train_split", "validation"], "--train_split"),
        (["--augmentation_working_size", "64"], "--augmentation_working_size"),
    ]
    if not torch.cuda.is_available():
        cases.append((["--mixed_precision", "fp16"], "--mixed_precision bf16"))
        cases.append((["--augmentation_device", "cuda"], "--augmentation_device loader or cpu"))
    if importlib.util.find_spec("tensorboard") is None:
        cases.append((["--report_to", "tensorboard"], "--report_to"))
    cases = [(extra + ["--max_steps", "2"], flag) for extra, flag in cases]
    # a stream of unknown length (webdataset shards) and no --max_steps
    cases.append((["--dataset_name", str(webdataset), "--image_column", "png"], "--max_steps"))
    return cases


def test_bad_inputs_exit_2_with_one_sentence(dataset, tiny_config_file, tmp_path, capsys):
    from accelerate.state import AcceleratorState

    webdataset = write_webdataset_dataset(tmp_path / "tars", num_images=16, image_size=40, num_shards=1)
    script = _load_script()
    base = ["--dataset_name", str(dataset), "--output_dir", str(tmp_path / "out"),
            "--model_config", str(tiny_config_file), "--global_crop_size", "32", "--local_crop_size", "16",
            "--num_local_crops", "2", "--dataloader_num_workers", "0"]
    for extra, flag in _bad_input_cases(webdataset):
        AcceleratorState._reset_state(reset_partial_state=True)
        status = script.main(base + extra)
        err = capsys.readouterr().err
        assert status == 2, (extra, err)
        lines = [line for line in err.splitlines() if line.strip()]
        assert len(lines) == 1, (extra, err)
        assert flag in lines[0] and "Traceback" not in err, (extra, err)


# ------------------------------------------------------------------------------ starting points and extras
def test_model_name_or_path_from_a_dino_folder_or_an_exported_backbone(dataset, tiny_config_file, tmp_path):
    from transformers import ViTModel

    from dino_hf.builders import build_model

    source = DinoForPreTraining(tiny_dino_config())
    source.save_pretrained(tmp_path / "dino")
    source.save_backbone(tmp_path / "backbone")

    resumed = build_model(tiny_args(dataset, tmp_path / "a", tiny_config_file, model_name_or_path=str(tmp_path / "dino"),
                                    student_temperature=0.2))
    torch.testing.assert_close(resumed.state_dict(), source.state_dict(), rtol=0, atol=0)
    assert resumed.loss_fn.student_temperature == 0.2

    from_backbone = build_model(tiny_args(dataset, tmp_path / "b", tiny_config_file,
                                          model_name_or_path=str(tmp_path / "backbone")))
    backbone = ViTModel.from_pretrained(tmp_path / "backbone", add_pooling_layer=False)
    for network in (from_backbone.student, from_backbone.teacher):
        torch.testing.assert_close(network.backbone.state_dict(), backbone.state_dict(), rtol=0, atol=0)

    with pytest.raises(ValueError, match="--model_name_or_path"):
        build_model(tiny_args(dataset, tmp_path / "c", tiny_config_file, model_name_or_path=str(tmp_path / "nothing")))


def test_model_config_as_a_folder_and_preset_sizes(dataset, tiny_config_file, tmp_path):
    from dino_hf.builders import build_model

    model = build_model(tiny_args(dataset, tmp_path / "a", tiny_config_file.parent,
                                  config_overrides="num_prototypes=32,backbone_config.num_hidden_layers=1"))
    assert model.config.num_prototypes == 32 and model.config.backbone_config.num_hidden_layers == 1
    assert model.config.backbone_config.image_size == 32  # follows --global_crop_size


def test_in_training_evaluation_plot_and_push(dataset, tiny_config_file, tmp_path, monkeypatch):
    import dino_hf.training

    pushes = []
    monkeypatch.setattr(dino_hf.training, "try_push_training_output",
                        lambda model_dir, repo_id, **kwargs: pushes.append((Path(model_dir), repo_id)) or True)
    output_dir = tmp_path / "run"
    train(tiny_args(dataset, output_dir, tiny_config_file, eval_dataset_name=str(dataset), eval_split="train",
                    eval_steps=2, eval_max_samples=16, push_to_hub=True, hub_model_id="someone/tiny-dino",
                    hub_strategy="checkpoint", activation_checkpointing=True))
    eval_rows = [row for row in read_rows(output_dir) if "knn_top1_k20" in row]
    assert [row["step"] for row in eval_rows] == [2, 4]
    assert 0.0 <= eval_rows[-1]["knn_top1_k20"] <= 1.0
    results = json.loads((output_dir / "eval_results.json").read_text())
    assert results["step"] == 4 and "knn_top1_k20" in results
    assert (output_dir / "training_curves.png").is_file()
    # the teacher's attention on the same few eval images at each eval step
    for step in (2, 4):
        assert (output_dir / "attention" / f"step_{step}" / "image0-grid.png").is_file()
        assert (output_dir / "attention" / f"step_{step}" / "image0-head0.png").is_file()
    # one push per checkpoint (steps 2 and 4) and one at the end, each with the exported backbone
    assert pushes == [(output_dir, "someone/tiny-dino")] * 3
    assert (output_dir / "backbone" / "config.json").is_file()


@pytest.mark.slow
def test_torch_compile_trains_and_exports_clean_keys(dataset, tiny_config_file, tmp_path):
    """Compiling takes about a minute on a CPU; the checkpoint and export keep the plain key names."""
    from safetensors.torch import load_file

    output_dir = tmp_path / "run"
    train(tiny_args(dataset, output_dir, tiny_config_file, torch_compile=True, max_steps=2))
    assert not [key for key in load_file(output_dir / "model.safetensors") if "_orig_mod" in key]
    assert not [key for key in load_file(output_dir / "backbone" / "model.safetensors") if "_orig_mod" in key]

"""DinoTrainer: DINO from Python with the user's own datasets, models and callbacks (dino_hf.train.trainer).

In-process runs of the tiny model; the kill-and-resume and two-process tests start
``tests/trainer_script.py`` (a user's own script) in subprocesses."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from tiny_models import read_rows, tiny_backbone_config
from trainer_script import in_memory_dataset, training_args
from transformers import AutoModel, ConvNextModel, TrainerCallback, ViTModel

from dino_hf import DinoForPreTraining, DinoTrainer, DinoTrainingArguments
from dino_hf.train.argument_parsing import parse_training_args

pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "tests" / "trainer_script.py"
BIN = Path(sys.executable).parent
TIMING = ("images_per_second", "data_wait_fraction", "elapsed_seconds")


def _environment() -> dict[str, str]:
    env = dict(os.environ)
    env.update({"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "PYTHONPATH": str(REPO), "TQDM_DISABLE": "1",
                "OMP_NUM_THREADS": "1"})
    return env


def _without_timing(rows: list[dict]) -> list[dict]:
    return [{key: value for key, value in row.items() if key not in TIMING} for row in rows]


class TorchImages(torch.utils.data.Dataset):
    """A torch dataset of dicts: a (3, H, W) uint8 tensor and a tensor label."""

    def __init__(self, count: int = 40) -> None:
        generator = torch.Generator().manual_seed(0)
        self.images = torch.randint(0, 256, (count, 3, 40, 40), dtype=torch.uint8, generator=generator)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> dict:
        return {"image": self.images[index], "label": torch.tensor(index % 3)}


def test_an_in_memory_dataset_trains_exports_and_evaluates(tmp_path):
    dataset = in_memory_dataset()
    args = training_args(tmp_path / "run", max_steps=4)
    trainer = DinoTrainer(args=args, train_dataset=dataset, eval_dataset=datasets.DatasetDict(train=dataset,
                                                                                              test=dataset))
    result = trainer.train()
    assert result.step == 4 and [row["step"] for row in read_rows(tmp_path / "run") if "loss" in row] == [1, 2, 3, 4]
    backbone = AutoModel.from_pretrained(tmp_path / "run" / "backbone")
    assert isinstance(backbone, ViTModel)
    metrics = trainer.evaluate()
    assert 0.0 <= metrics["knn_top1_k20"] <= 1.0
    recorded = json.loads((tmp_path / "run" / "eval_results.json").read_text())
    assert recorded["eval_dataset_name"].startswith("an in-memory datasets.DatasetDict")
    assert trainer.state.global_step == 4 and trainer.state.log_history

    saved = trainer.save_model(tmp_path / "saved")
    assert isinstance(DinoForPreTraining.from_pretrained(saved), DinoForPreTraining)
    export = trainer.embed(dataset, tmp_path / "embeddings")
    assert export.num_rows == len(dataset)
    assert len(datasets.load_dataset(str(tmp_path / "embeddings"), split="train")) == len(dataset)


@pytest.mark.parametrize("kind", ["iterable", "dataset_dict", "save_to_disk", "torch"])
def test_every_kind_of_dataset_object_trains(kind, tmp_path):
    dataset = in_memory_dataset()
    if kind == "iterable":
        source = dataset.to_iterable_dataset(num_shards=4)
    elif kind == "dataset_dict":
        source = datasets.DatasetDict(train=dataset)
    elif kind == "save_to_disk":
        dataset.save_to_disk(str(tmp_path / "saved"))
        source = str(tmp_path / "saved")
    else:
        source = TorchImages()
    # a stream of unknown length (the iterable) needs a step count, which every run here has
    result = DinoTrainer(args=training_args(tmp_path / "run", max_steps=2), train_dataset=source).train()
    assert result.step == 2 and (tmp_path / "run" / "backbone" / "model.safetensors").is_file()


def test_bad_images_in_memory_are_skipped_and_counted(tmp_path):
    rng = np.random.default_rng(1)
    images = [Image.fromarray(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)) for _ in range(40)]
    cells = [{"bytes": b"not an image", "path": None} if index % 10 == 0 else image for index, image in enumerate(images)]
    broken = datasets.Dataset.from_dict({"image": cells}, features=datasets.Features({"image": datasets.Image()}))
    DinoTrainer(args=training_args(tmp_path / "run", max_steps=2), train_dataset=broken).train()
    assert read_rows(tmp_path / "run")[-1]["bad_images"] > 0


class StopAt(TrainerCallback):
    """Stops the run at ``step``; keeps every row it is given and the events it saw."""

    def __init__(self, step: int) -> None:
        self.step = step
        self.rows: list[dict] = []
        self.events: list[str] = []

    def on_train_begin(self, args, state, control, **kwargs):
        self.events.append("train_begin")

    def on_log(self, args, state, control, logs=None, **kwargs):
        self.rows.append(logs)

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        self.events.append("evaluate")

    def on_save(self, args, state, control, **kwargs):
        self.events.append(f"save {state.global_step}")

    def on_step_end(self, args, state, control, **kwargs):
        assert state.max_steps == 6 and isinstance(kwargs["model"], DinoForPreTraining)
        if state.global_step == self.step:
            control.should_training_stop = True
        if state.global_step == 1:
            control.should_save = True

    def on_train_end(self, args, state, control, **kwargs):
        self.events.append("train_end")


def test_a_callback_stops_the_run_with_a_checkpoint_and_the_export_and_sees_every_row(tmp_path):
    dataset = in_memory_dataset()
    callback = StopAt(4)
    args = training_args(tmp_path / "run", checkpointing_steps=100)
    result = DinoTrainer(args=args, train_dataset=dataset, callbacks=[callback],
                         eval_dataset=datasets.DatasetDict(train=dataset, test=dataset)).train()
    assert result.step == 4
    assert callback.rows == read_rows(tmp_path / "run")  # every logged row, the evaluation's included
    assert sorted(path.name for path in (tmp_path / "run" / "checkpoints").iterdir()) == ["step_1", "step_4"]
    assert (tmp_path / "run" / "backbone" / "model.safetensors").is_file()
    assert callback.events == ["train_begin", "save 1", "save 4", "evaluate", "train_end"]


def test_a_convnext_instance_continues_pretraining_and_exports_as_convnext(tmp_path):
    torch.manual_seed(0)
    convnext = ConvNextModel(tiny_backbone_config("convnext"))
    args = training_args(tmp_path / "run", max_steps=2, model_config="vit_small_patch16")
    DinoTrainer(model=convnext, args=args, train_dataset=in_memory_dataset()).train()
    exported = AutoModel.from_pretrained(tmp_path / "run" / "backbone")
    assert isinstance(exported, ConvNextModel)
    training = json.loads((tmp_path / "run" / "training_args.json").read_text())
    assert training["model_name_or_path"].endswith("initial_model")
    start = ConvNextModel.from_pretrained(tmp_path / "run" / "initial_model")
    for name, value in convnext.state_dict().items():
        assert torch.equal(start.state_dict()[name], value), name


def test_config_in_python_is_the_command_line_config(tmp_path):
    flags = ["--config", "fashion_mnist_cpu", "--output_dir", str(tmp_path), "--max_steps", "7"]
    assert DinoTrainingArguments(config="fashion_mnist_cpu", output_dir=str(tmp_path), max_steps=7) == \
        parse_training_args(flags)
    args = DinoTrainingArguments.from_recipe("fashion_mnist_cpu", output_dir=str(tmp_path))
    assert args.model_config == "vit_tiny_patch16" and args.max_train_minutes == 8 and args.global_crop_size == 28
    assert dataclasses.replace(args, seed=3).max_train_minutes == 8
    with pytest.raises(ValueError, match="neither a YAML/JSON file nor a shipped recipe"):
        DinoTrainingArguments(config="no_such_recipe")


def test_global_state_is_as_it_was_after_train(tmp_path):
    root = logging.getLogger()
    state_before = (list(root.handlers), root.level, logging.getLogger("dino_hf").level, torch.get_num_threads(),
                    datasets.utils.are_progress_bars_disabled(), list(warnings.filters), warnings.showwarning)
    DinoTrainer(args=training_args(tmp_path / "run", max_steps=1), train_dataset=in_memory_dataset()).train()
    state_after = (list(root.handlers), root.level, logging.getLogger("dino_hf").level, torch.get_num_threads(),
                   datasets.utils.are_progress_bars_disabled(), list(warnings.filters), warnings.showwarning)
    assert state_after == state_before


def test_bad_trainer_inputs_are_one_sentence(tmp_path):
    with pytest.raises(ValueError, match="needs args=DinoTrainingArguments"):
        DinoTrainer(train_dataset=in_memory_dataset())
    with pytest.raises(ValueError, match="model must be None"):
        DinoTrainer(model=3, args=training_args(tmp_path / "run"))
    with pytest.raises(ValueError, match="has no split 'train'"):
        DinoTrainer(args=training_args(tmp_path / "run"), train_dataset=datasets.DatasetDict(test=in_memory_dataset())
                    ).train()
    with pytest.raises(ValueError, match="--dataset_name is required"):
        DinoTrainer(args=training_args(tmp_path / "other")).train()


def test_sigkill_and_resume_with_an_in_memory_dataset_is_bit_identical(tmp_path):
    def run(*extra: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, str(SCRIPT), *extra], env=_environment(), cwd=REPO,
                              capture_output=True, text=True, timeout=240)

    reference, resumed = tmp_path / "reference", tmp_path / "resumed"
    assert run(str(reference)).returncode == 0
    killed = run(str(resumed), "--kill_after_checkpoint", "3")
    assert killed.returncode != 0 and not (resumed / "model.safetensors").exists()
    result = run(str(resumed), "--resume")
    assert result.returncode == 0, result.stderr[-3000:]
    expected, actual = load_file(reference / "model.safetensors"), load_file(resumed / "model.safetensors")
    assert expected.keys() == actual.keys()
    for name in expected:
        assert torch.equal(expected[name], actual[name]), name
    assert _without_timing(read_rows(resumed)) == _without_timing(read_rows(reference))


def test_a_user_script_runs_unchanged_under_accelerate_launch_with_two_processes(tmp_path):
    output_dir = tmp_path / "run"
    training_args(output_dir)  # writes the model config once, before the processes start
    env = {**_environment(), "ACCELERATE_USE_CPU": "true"}
    command = [str(BIN / "accelerate"), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
               "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "0",
               str(SCRIPT), str(output_dir)]
    result = subprocess.run(command, env=env, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    training = json.loads((output_dir / "training_args.json").read_text())
    assert training["num_processes"] == 2 and training["global_batch_size"] == 16
    teachers = [torch.load(output_dir / f"teacher_rank{rank}.pt", weights_only=True) for rank in (0, 1)]
    for name, tensor in teachers[0].items():
        assert torch.equal(tensor, teachers[1][name]), name
    shutil.rmtree(output_dir)


def test_the_command_without_data_is_one_sentence(tmp_path, capsys):
    from dino_hf.cli import train as train_command

    assert train_command.main(["--output_dir", str(tmp_path / "run")]) == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert error.startswith("dino-hf-train: error: --dataset_name is required")


def test_notebook_launcher_runs_a_trainer_on_two_cpu_processes(tmp_path):
    """``accelerate.notebook_launcher`` (what a notebook calls) forks two CPU processes that train together."""
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    code = f"""
import sys
sys.path.insert(0, {str(REPO / "tests")!r})
from pathlib import Path
from accelerate import notebook_launcher
from trainer_script import in_memory_dataset, training_args

def train_in_processes(output_dir):
    from dino_hf import DinoTrainer
    DinoTrainer(args=training_args(Path(output_dir), max_steps=2), train_dataset=in_memory_dataset()).train()

training_args(Path({str(tmp_path / "run")!r}))
notebook_launcher(train_in_processes, args=({str(tmp_path / "run")!r},), num_processes=2, use_port="{port}")
"""
    result = subprocess.run([sys.executable, "-c", code], env=_environment(), cwd=REPO, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    training = json.loads((tmp_path / "run" / "training_args.json").read_text())
    assert training["num_processes"] == 2 and (tmp_path / "run" / "backbone" / "model.safetensors").is_file()


def test_push_to_hub_sends_the_run_to_the_loopback_hub(tmp_path, monkeypatch):
    import huggingface_hub
    from hub_server import LoopbackHub
    from tiny_models import TOKEN

    trainer = DinoTrainer(args=training_args(tmp_path / "run", max_steps=1), train_dataset=in_memory_dataset())
    with pytest.raises(ValueError, match="needs a repo_id"):
        trainer.push_to_hub()
    trainer.train()
    with LoopbackHub(token=TOKEN) as hub:
        monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", hub.url)
        monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_DISABLE_XET", True)
        monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
        url = trainer.push_to_hub(f"{hub.user}/from-python", token=TOKEN)
        files = hub.files(f"{hub.user}/from-python")
        assert url.startswith(hub.url)
    assert "model.safetensors" in files and "README.md" in files
    assert TOKEN.encode() not in b"".join(files.values())

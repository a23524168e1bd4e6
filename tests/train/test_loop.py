"""The training loop (dino_hf.train.loop.train) in one process, CPU, tiny model: end to end, non-finite
steps, the in-training evaluation, what each optimiser step receives from the schedules, and the
bad-input behaviour of scripts/train.py.

Multi-process, kill-and-resume and signal tests live in tests/test_training_processes.py; the step
itself in test_train_step.py, checkpoints in test_checkpointing.py.
"""

from __future__ import annotations

import importlib.util
import inspect
import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from image_datasets import write_webdataset_dataset
from safetensors.torch import load_file
from tiny_models import read_rows, tiny_args, tiny_dino_config
from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook

from dino_hf.losses.dino import DinoLoss
from dino_hf.models.modeling_dino import DinoForPreTraining
from dino_hf.train.arguments import DinoTrainingArguments
from dino_hf.train.checkpointing import list_checkpoints
from dino_hf.train.loop import NonFiniteLossError, train
from dino_hf.train.schedules import DinoSchedules
from dino_hf.train.step import DinoTrainStep

pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")

REPO = Path(__file__).resolve().parents[2]
METRIC_KEYS = {"step", "loss", "learning_rate", "weight_decay", "teacher_momentum", "teacher_temperature",
               "grad_norm", "teacher_entropy", "teacher_mean_entropy", "images_per_second", "data_wait_fraction"}


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
    backbone = AutoModel.from_pretrained(output_dir / "backbone")
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
    from dino_hf.train.builders import build_augmentation, build_device_augmentation

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


# ------------------------------------------------------------------------------ the schedules reach each step
# What each optimiser step of the loop hands the model, the teacher and the optimiser, checked on the
# tensors rather than on the logged values. Every scheduled value differs from step to step: the
# teacher temperature warms up 0.04 -> 0.07 over the 4 steps, momentum (0.9 -> 1) and weight decay
# (0.04 -> 0.4) follow their cosines; no learning-rate warm-up, and a learning rate (0.01 after batch
# scaling) large enough for the student to move well away from the teacher. fp32, for exact checks.
WIRING_SCHEDULE = {
    "learning_rate": 0.32, "min_learning_rate": 1e-6, "warmup_steps": 0, "weight_decay": 0.04,
    "weight_decay_end": 0.4, "teacher_momentum": 0.9, "warmup_teacher_temperature": 0.04,
    "teacher_temperature": 0.07, "warmup_teacher_temperature_steps": 4,
}


def _wiring_run(dataset: Path, config_file: Path, output_dir: Path) -> tuple[DinoTrainingArguments, DinoSchedules]:
    """The arguments of a 4-step run with WIRING_SCHEDULE and the schedules it must follow (built here,
    not by the library: batch 8 on one process scales the learning rate by 8 / 256)."""
    flags = {("base_learning_rate" if name == "learning_rate" else name): value for name, value in WIRING_SCHEDULE.items()}
    args = tiny_args(dataset, output_dir, config_file, logging_steps=1, mixed_precision="no", **flags)
    schedules = DinoSchedules(total_steps=4, freeze_last_layer_steps=1,
                              **{**WIRING_SCHEDULE, "learning_rate": WIRING_SCHEDULE["learning_rate"] * 8 / 256})
    return args, schedules


def _recording(function, calls: list):
    """``function`` that also appends its bound arguments (defaults applied) to ``calls``."""
    signature = inspect.signature(function)

    def record(*args, **kwargs):
        bound = signature.bind(*args, **kwargs)
        bound.apply_defaults()
        calls.append(bound.arguments)
        return function(*args, **kwargs)

    return record


def test_each_step_sharpens_the_teacher_with_the_scheduled_temperature(dataset, tiny_config_file, tmp_path,
                                                                       monkeypatch):
    args, schedules = _wiring_run(dataset, tiny_config_file, tmp_path / "run")
    forward_calls, loss_calls = [], []
    monkeypatch.setattr(DinoForPreTraining, "forward", _recording(DinoForPreTraining.forward, forward_calls))
    monkeypatch.setattr(DinoLoss, "teacher_probabilities", _recording(DinoLoss.teacher_probabilities, loss_calls))
    train(args)

    expected = [schedules.at(step).teacher_temperature for step in range(4)]
    assert len(set(expected)) == 4  # a warm-up: every step has its own temperature
    # what the model was given, and what the loss divided the teacher's logits by
    assert [float(call["teacher_temperature"]) for call in forward_calls] == pytest.approx(expected, rel=1e-6)
    assert [float(call["teacher_temperature"]) for call in loss_calls] == pytest.approx(expected, rel=1e-6)


def _parameters(network: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: parameter.detach().clone() for name, parameter in network.named_parameters()}


def test_each_step_moves_the_teacher_by_the_scheduled_momentum(dataset, tiny_config_file, tmp_path, monkeypatch):
    args, schedules = _wiring_run(dataset, tiny_config_file, tmp_path / "run")
    steps = []  # per optimiser step: (teacher before, student after, teacher after, step applied)
    call = DinoTrainStep.__call__

    def recording_call(self, *call_args, **call_kwargs):
        teacher_before = _parameters(self.unwrapped.teacher)
        statistics = call(self, *call_args, **call_kwargs)
        steps.append((teacher_before, _parameters(self.unwrapped.student), _parameters(self.unwrapped.teacher),
                      bool(statistics.finite)))
        return statistics

    monkeypatch.setattr(DinoTrainStep, "__call__", recording_call)
    train(args)

    momenta = [schedules.at(step).teacher_momentum for step in range(4)]
    assert len(steps) == 4 and len(set(momenta)) == 4
    for step, (before, student, after, applied) in enumerate(steps):
        momentum = momenta[step]
        assert applied, step
        assert before.keys() == student.keys() == after.keys()
        for name in after:
            expected = momentum * before[name] + (1 - momentum) * student[name]
            torch.testing.assert_close(after[name], expected, rtol=0, atol=1e-6, msg=f"step {step}: {name}")
        # not vacuous: the student is far enough from the teacher for another momentum to show
        assert max((student[name] - before[name]).abs().max().item() for name in student) > 1e-3, step


def test_each_step_decays_weights_by_the_schedule_and_never_biases_or_norms(dataset, tiny_config_file, tmp_path):
    """The optimiser's parameter groups at each step, and the decay each parameter actually got.

    AdamW (decoupled decay) does ``p <- p - lr * wd * p - adam_update``; ``adam_update`` is rebuilt from
    the optimiser state after the step, so ``wd`` can be read back from each parameter's change.
    """
    args, schedules = _wiring_run(dataset, tiny_config_file, tmp_path / "run")
    before: dict[int, torch.Tensor] = {}
    steps = []  # per optimiser step, per group: (lr, weight_decay, parameter ids, {id: weight decay applied})

    def remember(optimizer, *_):
        before.clear()
        before.update({id(p): p.detach().double() for group in optimizer.param_groups for p in group["params"]
                       if p.grad is not None})

    def measure(optimizer, *_):
        groups = []
        for group in optimizer.param_groups:
            lr, (beta1, beta2), eps = group["lr"], group["betas"], group["eps"]
            applied = {}
            for p in group["params"]:
                old = before.get(id(p))
                if old is None or lr == 0 or not old.abs().sum() > 0:
                    continue  # no gradient (the frozen last layer), or nothing to decay (a zero bias)
                state = optimizer.state[p]
                t = float(state["step"])
                adam_update = (lr / (1 - beta1**t)) * state["exp_avg"].double() / (
                    state["exp_avg_sq"].double().sqrt() / math.sqrt(1 - beta2**t) + eps)
                decay = old - p.detach().double() - adam_update  # lr * wd * old
                applied[id(p)] = (decay * old).sum().item() / (lr * old.square().sum().item())
            groups.append((lr, group["weight_decay"], [id(p) for p in group["params"]], applied))
        steps.append(groups)

    pre_hook = register_optimizer_step_pre_hook(remember)
    post_hook = register_optimizer_step_post_hook(measure)
    try:
        result = train(args)
    finally:
        pre_hook.remove()
        post_hook.remove()

    trainable = {id(p): (name, p) for name, p in result.model.student.named_parameters() if p.requires_grad}
    decays = [schedules.at(step).weight_decay for step in range(4)]
    assert len(steps) == 4 and len(set(decays)) == 4
    checked = {"decayed": set(), "not decayed": set()}
    for step, groups in enumerate(steps):
        values = schedules.at(step)
        # every trainable student parameter exactly once, and nothing else (no teacher parameter)
        assert sorted(pid for _, _, ids, _ in groups for pid in ids) == sorted(trainable), step
        for lr, weight_decay, ids, applied in groups:
            assert lr == pytest.approx(values.learning_rate, rel=1e-9), step
            for pid in ids:
                name, parameter = trainable[pid]
                decayed = not (name.endswith(".bias") or parameter.ndim <= 1)
                expected = values.weight_decay if decayed else 0.0
                assert weight_decay == pytest.approx(expected, rel=1e-9), (step, name)
                if pid in applied:
                    assert applied[pid] == pytest.approx(expected, rel=1e-3, abs=1e-4), (step, name)
                    checked["decayed" if decayed else "not decayed"].add(name)
    # not vacuous: weights, biases and norm weights were all measured
    assert any(name.endswith(".bias") for name in checked["not decayed"])
    assert any("layernorm" in name and name.endswith(".weight") for name in checked["not decayed"])
    assert len(checked["decayed"]) >= 10


@pytest.mark.parametrize("optimizer", ["sgd", "lars"])
def test_the_sgd_and_lars_optimisers_train_with_the_schedules(optimizer, dataset, tiny_config_file, tmp_path):
    """--optimizer sgd|lars (the official ResNet-50 recipes): the weights move and the rows are finite."""
    result = train(tiny_args(dataset, tmp_path / "run", tiny_config_file, optimizer=optimizer, base_learning_rate=0.03,
                             weight_decay=1e-4, weight_decay_end=1e-4, mixed_precision="no"))
    inner = result.model  # the unwrapped model; the optimiser's type is recorded in training_args.json
    assert json.loads((tmp_path / "run" / "training_args.json").read_text())["optimizer"] == optimizer
    rows = [row for row in read_rows(tmp_path / "run") if "loss" in row]
    assert rows and all(math.isfinite(row["loss"]) for row in rows)
    assert rows[-1]["weight_decay"] == pytest.approx(1e-4)
    fresh = DinoForPreTraining(tiny_dino_config())
    assert not torch.equal(fresh.student.head.mlp[0].weight, inner.student.head.mlp[0].weight)

# ------------------------------------------------------------------------------ time budget
class SteppedClock:
    """A fake clock whose time moves with the optimiser steps: each step takes ``seconds(step)`` (reading
    it takes no time). Installed on the loop's step function with :meth:`install`."""

    def __init__(self, seconds) -> None:
        self.now, self.steps, self.seconds = 0.0, 0, seconds

    def __call__(self) -> float:
        return self.now

    def install(self, monkeypatch) -> SteppedClock:
        step = DinoTrainStep.__call__

        def timed_step(step_fn, *args, **kwargs):
            result = step(step_fn, *args, **kwargs)
            self.steps += 1
            self.now += self.seconds(self.steps)
            return result

        monkeypatch.setattr(DinoTrainStep, "__call__", timed_step)
        return self


def test_a_time_budgeted_run_plans_its_steps_from_the_calibration_and_resume_keeps_the_plan(
    dataset, tiny_config_file, tmp_path, monkeypatch
):
    from dino_hf.train.step_plan import TIME_BUDGET_MARGIN

    output_dir = tmp_path / "run"
    # 1.5 s of budget at 0.02 s per step: 5 warm-up steps, a 20-step window (>= 0.03 s), and the rest of
    # the budget filled: about 25 + 1 / 0.02 steps in all, whatever the real speed.
    budget = dict(max_steps=None, max_train_minutes=0.025, logging_steps=1000, checkpointing_steps=40,
                  warmup_steps=None, warmup_epochs=1.0, freeze_last_layer_steps=None, mixed_precision="no")
    clock = SteppedClock(lambda step: 0.02).install(monkeypatch)
    result = train(tiny_args(dataset, output_dir, tiny_config_file, **budget), clock=clock)
    recorded = json.loads((output_dir / "training_args.json").read_text())
    planned = recorded["planned_total_steps"]
    assert recorded["max_steps"] is None and recorded["max_train_minutes"] == 0.025
    assert recorded["calibrated_seconds_per_step"] == pytest.approx(0.02)
    assert result.step == planned
    # the budget left after the calibration is filled with 0.02 s steps: the calibration's plan, then
    # re-plans at the same speed that each spend some of the margin it kept
    calibrated_at, used = recorded["calibration_steps"], recorded["calibration_seconds"]
    assert 5 < calibrated_at < 30 and used == pytest.approx(0.02 * calibrated_at)
    first_plan = calibrated_at + int((1.5 - used) * (1 - TIME_BUDGET_MARGIN) / 0.02 + 1e-9)
    assert first_plan <= planned <= int(1.5 / 0.02) and recorded["replans"] >= 1
    last = [row for row in read_rows(output_dir) if "loss" in row][-1]
    assert last["step"] == planned and last["learning_rate"] == pytest.approx(1e-6, rel=0.05)  # the cosine's end
    state = json.loads((output_dir / "checkpoints" / "step_40" / "training_state.json").read_text())
    assert state["plan"]["calibrated"] and abs(state["plan"]["total_steps"] - planned) <= 2  # a re-plan may follow

    # resuming from step 40 with another budget on the command line keeps the saved plan and budget
    resumed = train(tiny_args(dataset, output_dir, tiny_config_file, **{**budget, "max_train_minutes": 5.0},
                              resume_from_checkpoint=str(output_dir / "checkpoints" / "step_40")),
                    clock=SteppedClock(lambda step: 0.02).install(monkeypatch))
    assert resumed.step == planned


def test_a_step_time_that_drops_after_the_calibration_still_fills_the_budget_and_resume_is_exact(
    dataset, tiny_config_file, tmp_path, monkeypatch
):
    """The calibration sees 0.03 s steps, the rest of the run takes 0.02 s (kernels warmed up): without
    re-planning the run would end at about 70% of its budget."""
    budget_seconds = 3.0
    flags = dict(max_steps=None, max_train_minutes=budget_seconds / 60, logging_steps=1, checkpointing_steps=60,
                 checkpoints_total_limit=None, warmup_steps=None, warmup_epochs=1.0, freeze_last_layer_steps=None,
                 mixed_precision="no")

    def seconds(step: int) -> float:
        return 0.03 if step <= 30 else 0.02

    reference = SteppedClock(seconds).install(monkeypatch)
    result = train(tiny_args(dataset, tmp_path / "reference", tiny_config_file, **flags), clock=reference)
    recorded = json.loads((tmp_path / "reference" / "training_args.json").read_text())
    assert recorded["calibrated_seconds_per_step"] == pytest.approx(0.03)
    span = reference.now / budget_seconds
    assert 0.97 <= span <= 1.03, span
    state = json.loads((tmp_path / "reference" / "checkpoints" / "step_60" / "training_state.json").read_text())
    assert state["plan"]["replans"] >= 1 and state["plan"]["total_steps"] > 60  # re-planned before step 60
    assert result.step == recorded["planned_total_steps"] > state["plan"]["total_steps"] - 5

    # the same run stopped at step 60 and resumed: the same re-plans, the same weights and rows
    resumed_dir = tmp_path / "resumed"
    shutil.copytree(tmp_path / "reference" / "checkpoints" / "step_60", resumed_dir / "checkpoints" / "step_60")
    shutil.copy(tmp_path / "reference" / "metrics.jsonl", resumed_dir / "metrics.jsonl")
    clock = SteppedClock(lambda step: 0.02)
    clock.now = state["training_seconds"]  # the clock a resumed process starts from does not matter
    resumed = train(tiny_args(dataset, resumed_dir, tiny_config_file, **flags, resume_from_checkpoint="latest"),
                    clock=clock.install(monkeypatch))
    assert resumed.step == result.step
    expected, actual = load_file(tmp_path / "reference" / "model.safetensors"), load_file(resumed_dir / "model.safetensors")
    for name in expected:
        assert torch.equal(expected[name], actual[name]), name
    timing = ("images_per_second", "data_wait_fraction", "elapsed_seconds")
    assert [{k: v for k, v in row.items() if k not in timing} for row in read_rows(resumed_dir)] == \
        [{k: v for k, v in row.items() if k not in timing} for row in read_rows(tmp_path / "reference")]


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
        # DINOv2's objective
        (["--ibot_loss_weight", "1", "--mask_ratio_min_max", "0.1", "1.5"], "--mask_ratio_min_max"),
        (["--ibot_loss_weight", "1", "--mask_ratio_min_max", "0.5", "0.1"], "--mask_ratio_min_max"),
        (["--ibot_loss_weight", "1", "--mask_sample_probability", "0"], "--mask_sample_probability 0"),
        (["--model_config", "resnet50", "--ibot_loss_weight", "1"], "--ibot_loss_weight: iBOT masks patch tokens"),
        (["--ibot_loss_weight", "1", "--ibot_num_prototypes", "32"], "--ibot_separate_head true"),
        (["--teacher_centering", "sinkhorn"], "--teacher_centering"),
    ]
    if not torch.cuda.is_available():
        cases.append((["--mixed_precision", "fp16"], "--mixed_precision bf16"))
        cases.append((["--augmentation_device", "cuda"], "--augmentation_device loader or cpu"))
    cases.append((["--report_to", "nosuch_tracker"], "--report_to"))
    if importlib.util.find_spec("mlflow") is None:  # named but not installed: what to install
        cases.append((["--report_to", "mlflow"], "dino_hf[mlflow]"))
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


def _assert_one_sentence(script, argv: list[str], capsys, expected: str) -> str:
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    status = script.main(argv, prog="train.py")  # the name scripts/train.py gives when run as a script
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    error_lines = [line for line in lines if line.startswith("train.py: error:")]
    assert status == 2, (argv, err)
    assert len(error_lines) == 1 and error_lines[0] == lines[-1], (argv, err)
    assert expected in error_lines[0] and "Traceback" not in err, (argv, err)
    return error_lines[0]


def test_expected_failures_exit_2_with_one_sentence(dataset, tiny_config_file, tmp_path, capsys, monkeypatch):
    """Defects 4 and 8 of issue 14, through scripts/train.py: each exits 2 with one sentence that names
    the path or flag and the remedy, and no traceback."""
    import huggingface_hub
    from image_datasets import write_parquet_dataset
    from transformers import ResNetConfig

    script = _load_script()
    output_dir = tmp_path / "out"
    base = ["--dataset_name", str(dataset), "--output_dir", str(output_dir), "--model_config", str(tiny_config_file),
            "--global_crop_size", "32", "--local_crop_size", "16", "--num_local_crops", "2",
            "--dataloader_num_workers", "0", "--max_steps", "2", "--checkpointing_steps", "2",
            "--per_device_train_batch_size", "2"]
    a_file = tmp_path / "a_file"
    a_file.write_text("not a folder")
    _assert_one_sentence(script, [*base, "--output_dir", str(a_file)], capsys, f"{a_file} (or a folder above it) is a "
                         "file, not a folder; pass a folder as --output_dir")
    ResNetConfig().save_pretrained(tmp_path / "resnet")
    _assert_one_sentence(script, [*base, "--model_config", str(tmp_path / "resnet")], capsys,
                         "holds a 'resnet' config, not a DinoConfig")
    corrupt = write_parquet_dataset(tmp_path / "corrupt", num_images=0, num_shards=1, corrupt=True)
    _assert_one_sentence(script, [*base, "--dataset_name", str(corrupt)], capsys,
                         "yielded no readable image in a whole epoch: all")
    _assert_one_sentence(script, [*base, "--checkpoints_total_limit", "-1"], capsys, "--checkpoints_total_limit")
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_TOKEN_PATH", str(tmp_path / "no_token"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_STORED_TOKENS_PATH", str(tmp_path / "no_tokens"))
    _assert_one_sentence(script, [*base, "--push_to_hub", "--hub_model_id", "someone/model"], capsys,
                         "--push_to_hub needs a Hugging Face token")
    monkeypatch.setenv("HF_TOKEN", "hf_SomeTokenSomeToken0123456789")
    sentence = _assert_one_sentence(script, [*base, "--push_to_hub", "--hub_model_id", "not a/valid/id"], capsys,
                                    "--hub_model_id 'not a/valid/id' is not a valid Hub repository id")
    assert "hf_SomeToken" not in sentence
    monkeypatch.delenv("HF_TOKEN")
    assert not (output_dir / "checkpoints").exists()  # none of these trained

    # a run to resume from, then resumes that cannot work
    assert script.main(base) == 0
    capsys.readouterr()
    checkpoint = output_dir / "checkpoints" / "step_2"
    _assert_one_sentence(script, [*base, "--resume_from_checkpoint", "latest",
                                  "--config_overrides", "backbone_config.intermediate_size=96"], capsys,
                         "holds another model (")
    state = (checkpoint / "training_state.json").read_text()
    (checkpoint / "training_state.json").write_text(state[: len(state) // 2])
    _assert_one_sentence(script, [*base, "--resume_from_checkpoint", str(checkpoint)], capsys,
                         f"--resume_from_checkpoint {checkpoint} is damaged (training_state.json has")
    _assert_one_sentence(script, [*base, "--resume_from_checkpoint", "latest"], capsys,
                         "is damaged (the oldest, step_2, because training_state.json has")


def test_no_token_is_kept_in_training_args_json(dataset, tiny_config_file, tmp_path, monkeypatch):
    token = "hf_PassedAsAnArgumentValue0123456789"
    monkeypatch.setenv("HF_TOKEN", "not-hf-shaped-but-secret-token")
    train(tiny_args(dataset, tmp_path / "run", tiny_config_file, max_steps=2,
                    tracker_project_name=f"{token} not-hf-shaped-but-secret-token"))
    text = (tmp_path / "run" / "training_args.json").read_text()
    assert token not in text and "not-hf-shaped-but-secret-token" not in text
    assert json.loads(text)["tracker_project_name"] == "hf_*** ***"


def test_fsdp_on_a_single_process_exits_2_with_one_sentence(dataset, tiny_config_file, tmp_path, capsys, monkeypatch):
    """What ``accelerate launch --use_fsdp --num_processes 1`` passes on: refused, naming --use_fsdp."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    monkeypatch.setenv("FSDP_VERSION", "2")
    status = _load_script().main(["--dataset_name", str(dataset), "--output_dir", str(tmp_path / "out"),
                                  "--model_config", str(tiny_config_file), "--max_steps", "2"])
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert status == 2 and len(lines) == 1 and "--use_fsdp" in lines[0] and "Traceback" not in err, err
    AcceleratorState._reset_state(reset_partial_state=True)


# ------------------------------------------------------------------------------ extras
def test_in_training_evaluation_plot_and_push(dataset, tiny_config_file, tmp_path, monkeypatch):
    import dino_hf.train.loop

    pushes, checked = [], []
    monkeypatch.setattr(dino_hf.train.loop, "try_push_training_output",
                        lambda model_dir, repo_id, **kwargs: pushes.append((Path(model_dir), repo_id)) or True)
    monkeypatch.setattr(dino_hf.train.loop, "check_push_target", checked.append)  # Hub checks: tests/hub/test_push.py
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
    assert pushes == [(output_dir, "someone/tiny-dino")] * 3 and checked == ["someone/tiny-dino"]
    assert (output_dir / "backbone" / "config.json").is_file()


@pytest.mark.slow
def test_torch_compile_trains_and_exports_clean_keys(dataset, tiny_config_file, tmp_path):
    """Compiling takes about a minute on a CPU; the checkpoint and export keep the plain key names."""
    from safetensors.torch import load_file

    output_dir = tmp_path / "run"
    train(tiny_args(dataset, output_dir, tiny_config_file, torch_compile=True, max_steps=2))
    assert not [key for key in load_file(output_dir / "model.safetensors") if "_orig_mod" in key]
    assert not [key for key in load_file(output_dir / "backbone" / "model.safetensors") if "_orig_mod" in key]


def test_plan_warnings_resume_replan_evaluation_flags_and_portable_output_files(
    dataset, tiny_config_file, tmp_path, caplog
):
    """A warm-up covering the whole run warns; ``--eval_k`` (several) and ``--eval_linear_probe`` reach
    the evaluation, its file and the card (k-NN rows, local data named in prose only); no output file
    holds an absolute path; a resume with another ``--max_steps`` warns that the schedules re-plan."""
    import logging
    import os

    from dino_hf.hub.model_card import render_model_card

    output_dir = tmp_path / "run"
    evaluation = dict(eval_dataset_name=str(dataset), eval_split="train", eval_max_samples=16, eval_k=[1, 3],
                      eval_linear_probe=True)
    with caplog.at_level(logging.WARNING, logger="dino_hf"):
        train(tiny_args(dataset, output_dir, tiny_config_file, warmup_steps=4, min_learning_rate=1e-3, **evaluation))
    assert "The learning-rate warm-up lasts 4 steps and the run 4: it covers the whole run" in caplog.text
    assert "--min_learning_rate 0.001 exceeds the peak learning rate" in caplog.text
    assert "frozen last layer" not in caplog.text  # 1 of 4 steps
    results = json.loads((output_dir / "eval_results.json").read_text())
    assert {"knn_top1_k1", "knn_top1_k3", "linear_probe_top1"} <= set(results)
    for name in ("training_args.json", "eval_results.json"):
        values = json.loads((output_dir / name).read_text())
        assert not [key for key, value in values.items() if isinstance(value, str) and os.path.isabs(value)], name
    saved = json.loads((output_dir / "training_args.json").read_text())
    assert os.path.samefile(saved["dataset_name"], dataset)  # relative to where the run started: still replayable
    card = render_model_card(output_dir, "tester/tiny").content
    assert "1-NN top-1 accuracy" in card and "3-NN top-1 accuracy" in card and "linear probe top-1" in card
    assert str(tmp_path) not in card and "model-index" not in card  # local evaluation data: no Hub id to name

    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="dino_hf"):
        train(tiny_args(dataset, output_dir, tiny_config_file, max_steps=6, warmup_steps=1,
                        resume_from_checkpoint=str(output_dir / "checkpoints" / "step_2")))
    assert "planned for 4 steps and this run plans 6" in caplog.text and "jump at step 2" in caplog.text

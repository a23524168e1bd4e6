"""Smoke tests of the performance benchmarks' CPU paths (tiny models, results to a temporary file).

They check that the scripts run end to end and record what they promise, not how fast anything is.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest
import torch

REPOSITORY = Path(__file__).resolve().parents[1]
BENCHMARKS = REPOSITORY / "benchmarks"
TINY_STEP = [
    "--preset", "vit_tiny_patch16", "--config_overrides", "num_hidden_layers=2,head_hidden_size=64",
    "--num_prototypes", "64", "--global_crop_size", "32", "--local_crop_size", "16", "--num_local_crops", "2",
    "--batch_size", "2", "--device", "cpu", "--threads", "1",
]  # fmt: skip


def _load(name: str) -> ModuleType:
    """Import ``benchmarks/<name>.py`` as a module (the scripts are not a package)."""
    spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def bench_train_step() -> ModuleType:
    return _load("bench_train_step")


@pytest.fixture(autouse=True)
def _restore_torch_threads():
    """The scripts' ``--threads`` sets torch's global thread count: give the next tests theirs back."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def _rows(results_file: Path, benchmark: str) -> list[str]:
    return [line for line in results_file.read_text().splitlines() if f"| {benchmark} |" in line]


def test_train_step_benchmark_runs_every_variant_and_records(tmp_path: Path, bench_train_step: ModuleType) -> None:
    results_file, json_file = tmp_path / "RESULTS.md", tmp_path / "metrics.json"
    metrics = bench_train_step.main(
        TINY_STEP
        + ["--gradient_checkpointing", "--device_augmentation", "--augmentation_image_size", "40",
           "--repeats", "1", "--steps_per_repeat", "1", "--skip_memory",
           "--results_file", str(results_file), "--json_output", str(json_file)]
    )  # fmt: skip
    for variant in ("reference", "ours", "ours_checkpointing", "ours_device_augmentation"):
        assert metrics[f"{variant}_images_per_second"] > 0
    assert metrics["speedup_ours_vs_reference"] > 0
    # Reference and ours start from the same weights, seeds and crops: the same first loss.
    assert metrics["first_step_loss_difference"] < 1e-4
    assert json.loads(json_file.read_text())["crops"] == "2x32+2x16"
    assert len(_rows(results_file, "bench_train_step")) == 1


def test_train_step_memory_probe_reports_growth(bench_train_step: ModuleType) -> None:
    args = bench_train_step.parse_args(TINY_STEP)
    peaks = bench_train_step.measure_memory(args, ["ours"])  # one fresh process
    assert peaks["ours"] > 0


def test_train_step_refuses_fp16_on_cpu(bench_train_step: ModuleType) -> None:
    with pytest.raises(SystemExit, match="fp16"):
        bench_train_step.main(TINY_STEP + ["--mixed_precision", "fp16"])


def test_sync_free_clipping_equals_official_clip_gradients(bench_train_step: ModuleType) -> None:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Linear(16, 4))
    twin = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Linear(16, 4))
    for parameter, other in zip(model.parameters(), twin.parameters(), strict=True):
        parameter.grad = torch.randn_like(parameter) * torch.rand(()) * 4
        other.grad = parameter.grad.clone()
    bench_train_step.official_clip_gradients(model, 3.0)
    bench_train_step.clip_gradients_per_parameter_(list(twin.parameters()), 3.0)
    for parameter, other in zip(model.parameters(), twin.parameters(), strict=True):
        torch.testing.assert_close(parameter.grad, other.grad)
        assert parameter.grad.norm() <= 3.0 + 1e-4


def test_batched_augmentation_benchmark_records(tmp_path: Path) -> None:
    results_file = tmp_path / "RESULTS.md"
    metrics = _load("bench_batched_augmentation").main(
        ["--device", "cpu", "--threads", "1", "--batch_size", "3", "--image_size", "40", "--global_crop_size", "32",
         "--local_crop_size", "16", "--num_local_crops", "2", "--repeats", "1",
         "--results_file", str(results_file)]
    )  # fmt: skip
    assert metrics["reference_images_per_second"] > 0
    assert metrics["batched_cpu_images_per_second"] > 0
    assert metrics["speedup_batched_cpu_1thread_vs_reference"] > 0
    assert len(_rows(results_file, "bench_batched_augmentation")) == 1


@pytest.mark.slow  # 30 s of three short CPU trainings; the script's GPU half needs a GPU anyway
def test_gpu_check_cpu_path(tmp_path: Path) -> None:
    results_table = BENCHMARKS / "RESULTS.md"
    before = results_table.read_text() if results_table.exists() else None
    out = tmp_path / "out"
    environment = {**os.environ, "OUT": str(out), "PYTHON": sys.executable}
    environment.pop("RESULTS_FILE", None)
    completed = subprocess.run(
        ["bash", str(BENCHMARKS / "gpu_check.sh"), "--cpu"],
        env=environment,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["mode"] == "cpu" and summary["failures"] == 0
    assert set(summary["steps"]) == {
        "bench_batched_augmentation",
        "bench_train_step_tiny",
        "bench_end_to_end_tiny_cpu_augmentation",
    }
    assert (
        json.loads((out / "bench_train_step_tiny.json").read_text())["ours_device_augmentation_images_per_second"] > 0
    )
    end_to_end = json.loads((out / "bench_end_to_end_tiny_cpu_augmentation.json").read_text())
    assert end_to_end["images_per_second_median"] > 0 and "--augmentation_device cpu" in end_to_end["train_arguments"]
    assert len(_rows(out / "RESULTS.md", "bench_train_step")) == 1
    assert len(_rows(out / "RESULTS.md", "bench_end_to_end")) == 1
    assert len(_rows(out / "RESULTS.md", "bench_batched_augmentation")) == 1
    # The CPU path never writes to the project's results table.
    assert (results_table.read_text() if results_table.exists() else None) == before


@pytest.mark.slow
def test_train_step_benchmark_with_torch_compile(tmp_path: Path, bench_train_step: ModuleType) -> None:
    metrics = bench_train_step.main(
        TINY_STEP + ["--torch_compile", "--repeats", "1", "--steps_per_repeat", "1", "--skip_memory",
                     "--results_file", str(tmp_path / "RESULTS.md")]
    )  # fmt: skip
    assert metrics["compile_seconds"] > 0
    assert metrics["ours_compiled_images_per_second"] > 0


@pytest.mark.slow  # a benchmark's smoke run (15 s); the loop it drives is tested in the default run
def test_bench_end_to_end_smoke(tmp_path):
    """The end-to-end benchmark drives scripts/train.py and reads its metrics (tiny parquet data)."""
    from tests.image_datasets import write_parquet_dataset

    data_dir = write_parquet_dataset(tmp_path / "data", num_images=64, image_size=40, num_shards=2)
    results_file = tmp_path / "RESULTS.md"
    result = subprocess.run(
        [sys.executable, str(BENCHMARKS / "bench_end_to_end.py"), "--data_dir", str(data_dir),
         "--max_steps", "6", "--logging_steps", "2", "--results_file", str(results_file), "--",
         "--per_device_train_batch_size", "8", "--dataloader_num_workers", "0",
         "--config_overrides", "backbone_config.patch_size=7,backbone_config.hidden_size=32,"
         "backbone_config.num_hidden_layers=1,backbone_config.num_attention_heads=2,"
         "backbone_config.intermediate_size=64,num_prototypes=32,head_hidden_size=32,head_bottleneck_size=16"],
        capture_output=True, text=True, timeout=300, check=False,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    record = json.loads(result.stdout.strip().splitlines()[-1])
    assert record["images_per_second_median"] > 0
    assert 0.0 <= record["data_wait_fraction_median"] <= 1.0
    assert "bench_end_to_end" in results_file.read_text()


def test_checkpoint_benchmark_saves_verifies_and_records(tmp_path: Path) -> None:
    results_file, json_file = tmp_path / "RESULTS.md", tmp_path / "metrics.json"
    metrics = _load("bench_checkpoint").main(
        ["--preset", "vit_tiny_patch16",
         "--config_overrides", "backbone_config.num_hidden_layers=1,num_prototypes=64,head_hidden_size=64",
         "--repeats", "1", "--output_dir", str(tmp_path), "--results_file", str(results_file),
         "--json_output", str(json_file)]
    )  # fmt: skip
    assert json.loads(json_file.read_text()) == metrics
    assert metrics["checkpoint_mb"] > 0 and metrics["save_seconds"] > metrics["full_sha256_seconds"] > 0
    assert metrics["verify_cold_seconds"] > 0 and metrics["header_and_size_seconds"] > 0
    assert len(_rows(results_file, "bench_checkpoint")) == 1


def test_mfu_benchmark_counts_times_profiles_and_records(tmp_path: Path) -> None:
    """One tiny DINO step counted, timed and profiled (a process of its own: it makes an Accelerator)."""
    results_file = tmp_path / "RESULTS.md"
    completed = subprocess.run(
        [sys.executable, str(BENCHMARKS / "bench_mfu.py"), "--model_config", "vit_tiny_patch16",
         "--config_overrides", "backbone_config.num_hidden_layers=2,head_hidden_size=64", "--num_prototypes", "64",
         "--global_crop_size", "32", "--local_crop_size", "16", "--num_local_crops", "2",
         "--per_device_train_batch_size", "2", "--mixed_precision", "no", "--steps", "1", "--threads", "1",
         "--peak_size", "256", "--profile", "--record", "--results_file", str(results_file)],
        capture_output=True, text=True, timeout=300, check=False,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )  # fmt: skip
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-3000:]
    assert "MFU" in completed.stdout and "profile of one step" in completed.stdout
    record = json.loads(completed.stdout.strip().splitlines()[-1])  # the last line is the JSON record
    assert 0 < record["mfu"] and record["step_flops"] > 0 and record["peak_flops_per_s"] > 0
    assert record["achieved_flops_per_s"] == pytest.approx(record["step_flops"] / record["step_seconds_median"])
    assert record["attention_flop_share"] > 0  # the CPU SDPA kernel is counted
    assert record["dtype"] == "float32" and record["threads"] == 1 and record["num_prototypes"] == 64
    assert record["cpu"] and record["torch"] == torch.__version__
    shares = {key.removeprefix("profile_share_"): value for key, value in record.items()
              if key.startswith("profile_share_")}
    assert sum(shares.values()) == pytest.approx(1.0, abs=1e-3)
    for category in ("attention", "last_layer", "layer_norm", "other_matmuls", "clipping", "optimizer", "ema"):
        assert shares[category] > 0, category
    assert len(_rows(results_file, "bench_mfu")) == 1


def test_time_to_quality_interpolates_the_first_crossing() -> None:
    minutes_to_reach = _load("time_to_quality").minutes_to_reach
    curve = [(1.0, 0.80), (2.0, 0.84), (3.0, 0.85), (4.0, 0.83), (5.0, 0.86)]
    assert minutes_to_reach(curve, 0.846) == pytest.approx(2.6)  # between minute 2 (0.84) and 3 (0.85)
    assert minutes_to_reach(curve, 0.80) == pytest.approx(1.0)  # the first snapshot already reaches it
    assert minutes_to_reach(curve, 0.87) is None  # never reached in the budget
    assert minutes_to_reach([(0.5, 0.9), (1.0, 0.95)], 0.846) == pytest.approx(0.5)  # an upper bound


def test_channels_last_benchmark_times_both_layouts_and_restores_the_family(labelled_parquet, tmp_path,
                                                                             fresh_accelerate_state) -> None:
    from dino_hf.models.backbones import family_of

    bench = _load("bench_channels_last")
    with bench.resnet_channels_last(False):
        assert family_of("resnet").channels_last is False
    assert family_of("resnet").channels_last is True  # restored
    metrics = bench.main(["--data_dir", str(labelled_parquet), "--steps", "3", "--skip_steps", "1", "--repeats", "1",
                          "--per_device_train_batch_size", "8", "--output_dir", str(tmp_path / "run")])
    assert metrics["precision"] == "no" and metrics["steps_timed"] == 2
    assert metrics["nchw_seconds_per_step"] > 0 and metrics["channels_last_seconds_per_step"] > 0
    assert metrics["speedup_channels_last_vs_nchw"] == pytest.approx(
        metrics["nchw_seconds_per_step"] / metrics["channels_last_seconds_per_step"], rel=1e-2)
    assert family_of("resnet").channels_last is True

"""The package as users get it (dino_hf/__init__.py, pyproject.toml): the auto classes after a plain
``import dino_hf``, and a built wheel installed in a fresh virtual environment, away from the source
tree, whose console scripts train, evaluate and push (loopback Hub) with the recipes and the card
template it ships."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
from hub_server import LoopbackHub
from tiny_models import TOKEN

REPO_ROOT = Path(__file__).resolve().parents[1]


def _clean_env(**extra: str) -> dict[str, str]:
    """The environment without PYTHONPATH (which would point back at a source tree)."""
    env = {key: value for key, value in os.environ.items() if key not in ("PYTHONPATH", "HF_TOKEN")}
    env.update({"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", **extra})
    return env


def test_auto_classes_after_a_plain_import(tmp_path):
    """``import dino_hf`` alone registers DinoConfig with AutoConfig, AutoModel and AutoModelForPreTraining."""
    code = f"""
import torch, dino_hf
from dino_hf import DinoForPreTraining
from transformers import AutoConfig, AutoModel, AutoModelForPreTraining
import sys; sys.path.insert(0, {str(REPO_ROOT / "tests")!r})
from tiny_models import tiny_dino_config
DinoForPreTraining(tiny_dino_config()).save_pretrained({str(tmp_path / "dino")!r})
for auto in (AutoModel, AutoModelForPreTraining):
    model = auto.from_pretrained({str(tmp_path / "dino")!r})
    assert type(model).__name__ == "DinoForPreTraining", type(model)
print(type(AutoConfig.from_pretrained({str(tmp_path / "dino")!r})).__name__)
"""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                            cwd=tmp_path, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().splitlines()[-1] == "DinoConfig"


@pytest.mark.slow  # builds a wheel and a venv (36 s); make test's editable install covers the package's own files
def test_the_wheel_installs_in_a_fresh_venv_and_its_commands_train_eval_and_push(
    tmp_path, dataset, tiny_config_file, labelled_parquet
):
    # build from a copy of the sources, so that the checkout gets no build/ or egg-info
    source = tmp_path / "source"
    shutil.copytree(REPO_ROOT / "dino_hf", source / "dino_hf", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO_ROOT / name, source / name)
    built = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--quiet",
                            "--wheel-dir", str(tmp_path / "wheels"), str(source)],
                           capture_output=True, text=True, timeout=300, env=_clean_env())
    assert built.returncode == 0, built.stderr[-3000:]
    [wheel] = (tmp_path / "wheels").glob("dino_hf-*.whl")

    # a fresh venv that sees the dev environment's packages through a plain path line: .pth files inside
    # that directory (the editable dino_hf's finder) are then not processed
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    python = venv / "bin" / "python"
    site_packages = Path(subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                                        capture_output=True, text=True, check=True).stdout.strip())
    (site_packages / "dev_environment.pth").write_text(sysconfig.get_path("purelib") + "\n")
    installed = subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps",
                                "--quiet", str(wheel)], capture_output=True, text=True, timeout=300, env=_clean_env())
    assert installed.returncode == 0, installed.stderr[-3000:]

    work = tmp_path / "elsewhere"  # no source tree here or above
    work.mkdir()
    where = subprocess.run(
        [str(python), "-c", "import dino_hf, dino_hf.train.recipes as t; print(dino_hf.__file__); "
                            "print(t.resolve_config_path('fashion_mnist_cpu'))"],
        capture_output=True, text=True, cwd=work, env=_clean_env())
    assert where.returncode == 0, where.stderr[-3000:]
    module_file, recipe = where.stdout.split()
    assert module_file.startswith(str(site_packages)) and recipe.startswith(str(site_packages))

    def run(command: str, *args: str, **env: str) -> subprocess.CompletedProcess:
        result = subprocess.run([str(venv / "bin" / command), *args], capture_output=True, text=True, cwd=work,
                                timeout=300, env=_clean_env(**env))
        assert result.returncode == 0, (command, result.stderr[-3000:])
        return result

    run("dino-hf-train", "--dataset_name", str(dataset), "--output_dir", "run", "--model_config",
        str(tiny_config_file), "--global_crop_size", "32", "--local_crop_size", "16", "--num_local_crops", "2",
        "--per_device_train_batch_size", "8", "--max_steps", "2", "--logging_steps", "1",
        "--dataloader_num_workers", "0", "--shuffle_buffer_size", "16")
    assert (work / "run" / "backbone" / "model.safetensors").is_file()
    args = json.loads((work / "run" / "training_args.json").read_text())
    assert not [key for key, value in args.items() if isinstance(value, str) and os.path.isabs(value)]
    evaluated = run("dino-hf-eval", "--model_name_or_path", "run", "--dataset_name", str(labelled_parquet),
                    "--k", "1")
    assert "knn_top1_k1: " in evaluated.stdout
    with LoopbackHub(token=TOKEN) as hub:
        pushed = run("dino-hf-push", "--output_dir", "run", "--hub_model_id", f"{hub.user}/from-wheel",
                     HF_HUB_OFFLINE="0", HF_ENDPOINT=hub.url, HF_HUB_DISABLE_XET="1", HF_TOKEN=TOKEN,
                     HF_HOME=str(tmp_path / "hf_home"), NO_PROXY="127.0.0.1,localhost")
        files = hub.files(f"{hub.user}/from-wheel")
        assert pushed.stdout.strip().startswith(f"{hub.url}/{hub.user}/from-wheel/commit/")
    assert "DINO" in files["README.md"].decode() and "model.safetensors" in files  # the shipped card template

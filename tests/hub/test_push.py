"""Hub sharing (dino_hf.hub.push), end to end with the real huggingface_hub / transformers clients on a loopback Hub.

The Hub cannot be reached from the test machines, so ``tests/hub_server.py`` serves the part of the
Hub API the clients use on 127.0.0.1. ``HF_ENDPOINT`` is read by huggingface_hub at import time, so
client code runs in subprocesses with the environment set; the few in-process tests patch
``huggingface_hub.constants``.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import huggingface_hub
import numpy as np
import pytest
import torch
from hub_server import LoopbackHub
from PIL import Image
from tiny_models import KNN_ACCURACY, TOKEN, tiny_dino_config, write_training_output
from transformers import AutoImageProcessor, AutoModel

from dino_hf.base.errors import RunError
from dino_hf.base.run_folder import TRAINING_MODEL_SUBFOLDER
from dino_hf.hub.push import (
    LOGIN_HINT,
    HubPushError,
    MissingTokenError,
    check_push_target,
    push_training_output,
    try_push_training_output,
)
from dino_hf.models.modeling_dino import DinoForPreTraining

# huggingface_hub's own LFS upload passes a file object as `data=` to httpx2.
pytestmark = pytest.mark.filterwarnings("ignore:Use 'content=<...>':DeprecationWarning")

REPO_ROOT = Path(__file__).resolve().parents[2]
PUSH_SCRIPT = REPO_ROOT / "scripts" / "push_to_hub.py"


def _test_image() -> Image.Image:
    """A fixed 40x48 RGB image (not the model's 32 px, so the processor's resize is exercised)."""
    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8))


def _cls_features(model_dir: Path | str) -> np.ndarray:
    processor = AutoImageProcessor.from_pretrained(model_dir)
    model = AutoModel.from_pretrained(model_dir, add_pooling_layer=False).eval()
    with torch.inference_mode():
        outputs = model(**processor(images=_test_image(), return_tensors="pt"))
    return outputs.last_hidden_state[0, 0].numpy()


def _client_env(hub: LoopbackHub, tmp_path: Path, token: str | None = TOKEN) -> dict[str, str]:
    """Environment of a client subprocess: loopback endpoint, no Xet, private HF_HOME and cache."""
    env = {
        key: value
        for key, value in os.environ.items()
        if key
        not in (
            "HF_TOKEN",
            "HUGGING_FACE_HUB_TOKEN",
            "HF_HUB_OFFLINE",
            "TRANSFORMERS_OFFLINE",
            "HF_HUB_CACHE",
            "HF_HOME",
            "HF_TOKEN_PATH",
            "HF_OIDC_RESOURCE",
        )
    }
    env.update(
        {
            "HF_ENDPOINT": hub.url,
            "HF_HUB_DISABLE_XET": "1",
            "HF_HOME": str(tmp_path / "hf_home"),
            "HF_HUB_CACHE": str(tmp_path / "hub_cache"),
            "HF_HUB_DISABLE_TELEMETRY": "1",
            "HF_HUB_DISABLE_PROGRESS_BARS": "1",
            "NO_PROXY": "127.0.0.1,localhost",
        }
    )
    if token is not None:
        env["HF_TOKEN"] = token
    return env


def _run(args: list[str], env: dict[str, str], timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, *args],
        check=False,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=REPO_ROOT,
    )


@pytest.fixture(scope="module")
def hub():
    with LoopbackHub(token=TOKEN) as server:
        yield server


@pytest.fixture
def in_process_endpoint(hub, monkeypatch):
    """Point this process's huggingface_hub at the loopback Hub (HF_ENDPOINT was read at import)."""
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", hub.url)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_DISABLE_XET", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    yield hub
    hub.clear_failures()


# Runs in a fresh interpreter that never imports dino_hf: plain transformers / huggingface_hub only.
LOAD_SCRIPT = r"""
import json, sys
import numpy as np
import torch
from PIL import Image
from huggingface_hub import HfApi, ModelCard, hf_hub_download, metadata_load
from transformers import AutoImageProcessor, AutoModel, pipeline

repo_id = sys.argv[1]
rng = np.random.default_rng(0)
image = Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8))
processor = AutoImageProcessor.from_pretrained(repo_id)
model = AutoModel.from_pretrained(repo_id, add_pooling_layer=False).eval()
with torch.inference_mode():
    cls = model(**processor(images=image, return_tensors="pt")).last_hidden_state[0, 0]
extractor = pipeline("image-feature-extraction", model=repo_id)
pipeline_cls = extractor(image, return_tensors=True)[0, 0]
card = ModelCard.load(repo_id)
print(json.dumps({
    "model_class": type(model).__name__,
    "processor_class": type(processor).__name__,
    "cls": cls.tolist(),
    "pipeline_cls": pipeline_cls.tolist(),
    "card_metadata": card.data.to_dict(),
    "readme_metadata": metadata_load(hf_hub_download(repo_id, "README.md")),
    "files": sorted(HfApi().list_repo_files(repo_id)),
    "dino_hf_imported": any(name.split(".")[0] == "dino_hf" for name in sys.modules),
}))
"""


@pytest.mark.slow  # a fresh interpreter (16 s); push and load against the loopback Hub run in the default run
def test_push_then_load_by_repo_id_in_a_fresh_process(hub, training_output, tmp_path):
    repo_id = f"{hub.user}/tiny-dino"
    reference = _cls_features(training_output / "backbone")
    # Cached login (`hf auth login` writes HF_HOME/token) rather than HF_TOKEN.
    env = _client_env(hub, tmp_path, token=None)
    (tmp_path / "hf_home").mkdir()
    (tmp_path / "hf_home" / "token").write_text(TOKEN)

    pushed = _run([str(PUSH_SCRIPT), "--model_dir", str(training_output), "--repo_id", repo_id], env)
    assert pushed.returncode == 0, pushed.stderr
    assert pushed.stdout.strip().startswith(f"{hub.url}/{repo_id}/commit/")
    assert TOKEN not in pushed.stdout + pushed.stderr

    files = hub.files(repo_id)
    assert set(files) == {
        ".gitattributes",
        "README.md",
        "config.json",
        "model.safetensors",
        "preprocessor_config.json",
        "training_args.json",
        "eval_results.json",
        "metrics.jsonl",
        "training_curves.png",
    }
    assert files["model.safetensors"] == (training_output / "backbone" / "model.safetensors").read_bytes()
    assert hub.repos[repo_id].resolve("main").files["model.safetensors"].lfs  # went through LFS
    for path, content in files.items():
        assert TOKEN.encode() not in content, path
    pushed_args = json.loads(files["training_args.json"])
    assert "hub_token" not in pushed_args
    assert pushed_args["num_local_crops"] == 6

    loaded = _run(["-c", LOAD_SCRIPT, repo_id], _client_env(hub, tmp_path / "reader", token=None))
    assert loaded.returncode == 0, loaded.stderr
    result = json.loads(loaded.stdout.strip().splitlines()[-1])
    assert not result["dino_hf_imported"]
    assert result["model_class"] == "ViTModel"
    np.testing.assert_allclose(result["cls"], reference, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(result["pipeline_cls"], reference, rtol=1e-5, atol=1e-5)
    assert set(result["files"]) == set(files)

    metadata = result["readme_metadata"]
    assert metadata == result["card_metadata"]
    assert metadata["library_name"] == "transformers"
    assert metadata["pipeline_tag"] == "image-feature-extraction"
    assert {"dino", "self-supervised", "vision", "dino_hf"} <= set(metadata["tags"])
    assert metadata["datasets"] == ["zalando-datasets/fashion_mnist"]
    assert metadata["license"] == "apache-2.0"
    assert "base_model" not in metadata  # trained from scratch
    [entry] = metadata["model-index"]
    [knn_result] = entry["results"]
    assert knn_result["metrics"][0]["value"] == KNN_ACCURACY
    assert knn_result["dataset"]["split"] == "test"
    assert hub.unhandled == []


def test_push_without_a_token_exits_2_with_one_sentence(hub, training_output, tmp_path):
    before = len(hub.requests)
    result = _run(
        [str(PUSH_SCRIPT), "--model_dir", str(training_output), "--repo_id", "tester/no-token"],
        _client_env(hub, tmp_path, token=None),
    )
    assert result.returncode == 2
    assert result.stdout == ""
    assert result.stderr.strip() == LOGIN_HINT
    assert "hf auth login" in LOGIN_HINT and "HF_TOKEN" in LOGIN_HINT
    assert not any(path.startswith("/api/repos/create") for _, path, _ in hub.requests[before:])


@pytest.mark.parametrize(("status", "route"), [(403, "create_repo"), (500, "commit")])
def test_rejected_push_names_repo_and_status_without_the_token(hub, training_output, tmp_path, status, route):
    repo_id = f"{hub.user}/rejected-{status}"
    # The server even echoes the token in its error message: it must still not be printed.
    hub.fail(status, route, message=f"Rejected request authenticated with {TOKEN}")
    try:
        result = _run(
            [str(PUSH_SCRIPT), "--model_dir", str(training_output), "--repo_id", repo_id],
            _client_env(hub, tmp_path),
        )
    finally:
        hub.clear_failures()
    assert result.returncode == 2, result.stderr
    assert repo_id in result.stderr
    assert f"HTTP {status}" in result.stderr
    assert "Traceback" not in result.stderr
    assert TOKEN not in result.stdout + result.stderr


def test_push_to_a_branch_with_training_model_and_repush_in_process(in_process_endpoint, training_output, tmp_path):
    hub = in_process_endpoint
    repo_id = f"{hub.user}/tiny-dino-branch"
    url = push_training_output(
        training_output,
        repo_id,
        revision="dev",
        include_training_model=True,
        token=TOKEN,
        commit_message="Step 100",
    )
    assert url.startswith(f"{hub.url}/{repo_id}/commit/")
    files = hub.files(repo_id, revision="dev")
    assert (
        files[f"{TRAINING_MODEL_SUBFOLDER}/model.safetensors"] == (training_output / "model.safetensors").read_bytes()
    )
    assert f"{TRAINING_MODEL_SUBFOLDER}/config.json" in files
    assert f'subfolder="{TRAINING_MODEL_SUBFOLDER}"' in files["README.md"].decode()
    assert set(hub.files(repo_id, revision="main")) == {".gitattributes"}  # main untouched
    assert hub.commit_messages(repo_id, revision="dev")[0] == "Step 100"
    # Pushing the same output again succeeds without an empty commit.
    again = push_training_output(training_output, repo_id, revision="dev", include_training_model=True, token=TOKEN)
    assert again.endswith(url.rsplit("/", 1)[-1])
    assert len(hub.commit_messages(repo_id, revision="dev")) == 2
    # A later run without evaluation results replaces the card and drops the old eval_results.json.
    later = write_training_output(tmp_path / "later", eval_results=False)
    push_training_output(later, repo_id, revision="dev", token=TOKEN)
    files = hub.files(repo_id, revision="dev")
    assert "eval_results.json" not in files and "metrics.jsonl" in files
    assert "No evaluation results were recorded" in files["README.md"].decode()
    assert f"{TRAINING_MODEL_SUBFOLDER}/config.json" in files  # left alone
    # A bare name goes under the token's account.
    push_training_output(training_output / "backbone", "bare-name", token=TOKEN)
    assert "model.safetensors" in hub.files(f"{hub.user}/bare-name")
    assert hub.unhandled == []


def test_real_dino_training_output_round_trips(in_process_endpoint, tmp_path):
    """A real DinoForPreTraining export, pushed with include_training_model, loads back."""
    hub = in_process_endpoint
    torch.manual_seed(0)
    model = DinoForPreTraining(tiny_dino_config()).eval()
    output_dir = tmp_path / "run"
    model.save_pretrained(output_dir)
    model.save_backbone(output_dir / "backbone")
    push_training_output(output_dir, "tester/real-dino", include_training_model=True, token=TOKEN)

    checkout = tmp_path / "checkout"
    for path, content in hub.files("tester/real-dino").items():
        (checkout / path).parent.mkdir(parents=True, exist_ok=True)
        (checkout / path).write_bytes(content)
    pixel_values = torch.randn(2, 3, 32, 32)
    with torch.inference_mode():
        expected = model.embed(pixel_values, which="teacher")
        backbone = AutoModel.from_pretrained(checkout).eval()
        torch.testing.assert_close(backbone(pixel_values).last_hidden_state[:, 0], expected)
        restored = DinoForPreTraining.from_pretrained(checkout / TRAINING_MODEL_SUBFOLDER).eval()
        torch.testing.assert_close(restored.embed(pixel_values, which="teacher"), expected)
    assert "Prototypes (K) | 64" in (checkout / "README.md").read_text()


def test_training_loop_wrapper_warns_and_returns_false(in_process_endpoint, training_output, caplog):
    hub = in_process_endpoint
    repo_id = f"{hub.user}/from-training"
    hub.fail(500, "commit", times=1, message=f"storage unavailable for {TOKEN}")
    with caplog.at_level(logging.WARNING, logger="dino_hf.hub.push"):
        assert try_push_training_output(training_output, repo_id, token=TOKEN) is False
    assert repo_id in caplog.text and "HTTP 500" in caplog.text
    assert TOKEN not in caplog.text
    # The next opportunity succeeds.
    assert try_push_training_output(training_output, repo_id, token=TOKEN) is True
    assert "model.safetensors" in hub.files(repo_id)


def test_push_errors_are_typed_and_scrubbed(in_process_endpoint, training_output, monkeypatch, tmp_path):
    hub = in_process_endpoint
    hub.fail(403, "create_repo", message=f"no write access for {TOKEN}")
    with pytest.raises(HubPushError) as error:
        push_training_output(training_output, f"{hub.user}/forbidden", token=TOKEN)
    assert error.value.status_code == 403 and error.value.repo_id == f"{hub.user}/forbidden"
    assert TOKEN not in str(error.value) and error.value.__cause__ is None
    hub.clear_failures()
    # A refused LFS upload (wrapped by huggingface_hub in a RuntimeError) still names repo and status.
    hub.fail(403, "lfs_upload", message="storage quota exceeded")
    with pytest.raises(HubPushError, match=r"tester/quota.*HTTP 403: storage quota exceeded"):
        push_training_output(training_output, f"{hub.user}/quota", token=TOKEN)
    hub.clear_failures()

    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.delenv("HUGGING_FACE_HUB_TOKEN", raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_TOKEN_PATH", str(tmp_path / "no-token"))
    with pytest.raises(MissingTokenError, match="hf auth login"):
        push_training_output(training_output, f"{hub.user}/anything")


# ------------------------------------------------------------------------------ --push_to_hub before and after training
def test_the_push_target_is_checked_before_training(in_process_endpoint, monkeypatch, tmp_path, caplog):
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.delenv("HUGGING_FACE_HUB_TOKEN", raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_TOKEN_PATH", str(tmp_path / "no_token"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_STORED_TOKENS_PATH", str(tmp_path / "no_tokens"))
    with pytest.raises(RunError, match="--push_to_hub needs a Hugging Face token .*hf auth login"):
        check_push_target("tester/model")
    with pytest.raises(RunError, match="--hub_model_id 'no/such/repo' is not a valid Hub repository id"):
        check_push_target("no/such/repo", token=TOKEN)
    with pytest.raises(RunError, match=r"rejected the Hugging Face token \(HTTP 401\)") as error:
        check_push_target("tester/model", token="hf_WrongTokenWrongToken0123")
    assert "hf_WrongTokenWrongToken0123" not in str(error.value)
    check_push_target("tester/model", token=TOKEN)  # a good token and id
    # a Hub that cannot answer now only warns: it may be back by the end of training
    in_process_endpoint.fail(503, routes="whoami")
    caplog.set_level(logging.WARNING, logger="dino_hf")
    check_push_target("tester/model", token=TOKEN)
    assert any("may fail" in record.getMessage() for record in caplog.records)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(RunError, match="HF_HUB_OFFLINE"):
        check_push_target("tester/model", token=TOKEN)


def _train_flags(dataset: Path, config_file: Path, output_dir: Path) -> list[str]:
    return ["--dataset_name", str(dataset), "--output_dir", str(output_dir), "--model_config", str(config_file),
            "--global_crop_size", "32", "--local_crop_size", "16", "--num_local_crops", "2",
            "--per_device_train_batch_size", "8", "--max_steps", "2", "--checkpointing_steps", "2",
            "--dataloader_num_workers", "0", "--push_to_hub", "--hub_model_id", "tester/tiny-dino"]


def test_push_to_hub_without_a_valid_token_is_refused_before_training(hub, dataset, tiny_config_file, tmp_path):
    result = _run(["scripts/train.py", *_train_flags(dataset, tiny_config_file, tmp_path / "run")],
                  _client_env(hub, tmp_path, token="hf_NotTheLoopbackToken0123456789"), timeout=180)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 2, result.stderr[-3000:]
    assert lines[-1].startswith("train.py: error: --push_to_hub: the Hub rejected the Hugging Face token")
    assert "Traceback" not in result.stderr and "hf_NotTheLoopbackToken0123456789" not in result.stderr
    assert not (tmp_path / "run" / "checkpoints").exists()  # nothing trained


def test_a_failed_final_push_is_said_plainly_without_promising_a_retry(hub, dataset, tiny_config_file, tmp_path):
    hub.fail(500, routes="commit")
    try:
        result = _run(["scripts/train.py", *_train_flags(dataset, tiny_config_file, tmp_path / "run")],
                      _client_env(hub, tmp_path), timeout=180)
    finally:
        hub.clear_failures()
    assert result.returncode == 0, result.stderr[-3000:]
    warnings = [line for line in result.stderr.splitlines() if "WARNING" in line]
    assert "will be retried" not in result.stderr and "tries again" not in result.stderr
    assert "final push to tester/tiny-dino failed" in warnings[-1] and "will not be retried" in warnings[-1]
    assert f"scripts/push_to_hub.py --model_dir {tmp_path / 'run'} --repo_id tester/tiny-dino" in warnings[-1]
    assert TOKEN not in result.stderr
    assert (tmp_path / "run" / "backbone" / "model.safetensors").is_file()  # the model is safe on disk

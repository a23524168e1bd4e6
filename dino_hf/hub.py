"""Sharing a trained DINO backbone on the Hugging Face Hub.

A dino_hf training run leaves (see ``CONTRACTS.md``)::

    output_dir/
      backbone/             exported teacher (config.json, model.safetensors, preprocessor_config.json)
      config.json, model.safetensors     the full DinoForPreTraining (student, teacher, head, center)
      training_args.json, metrics.jsonl, eval_results.json, training_curves.png

:func:`push_training_output` turns that into one Hub commit: the backbone files at the repository
root (so ``AutoModel.from_pretrained("user/name")`` works), a ``README.md`` model card rendered from
``model_cards/dino_backbone.md`` by :func:`render_model_card`, the training arguments (secrets
removed), the evaluation results, metrics and curves when they exist, and, with
``include_training_model=True``, the full ``DinoForPreTraining`` under ``training_model/`` so that
pre-training can continue from it.

Everything goes through ``huggingface_hub`` (``HfApi.create_repo(exist_ok=True)`` then one
``HfApi.create_commit``), so ``HF_ENDPOINT``, ``HF_TOKEN`` and the cached ``hf auth login`` token
are honoured. The token is never printed, logged, written into a pushed file or kept in an exception
message. This module does not import torch.
"""

from __future__ import annotations

import json
import logging
import math
import re
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from huggingface_hub import (
    CommitOperationAdd,
    CommitOperationDelete,
    EvalResult,
    HfApi,
    ModelCard,
    ModelCardData,
    get_token,
)
from huggingface_hub.errors import HfHubHTTPError, RepositoryNotFoundError, RevisionNotFoundError

logger = logging.getLogger(__name__)

MODEL_CARD_TEMPLATE = Path(__file__).resolve().parent.parent / "model_cards" / "dino_backbone.md"
"""Jinja template of the model card (rendered with ``huggingface_hub.ModelCard.from_template``)."""

TRAINING_MODEL_SUBFOLDER = "training_model"
"""Where ``include_training_model=True`` puts the full DinoForPreTraining inside the repository."""

CARD_TAGS = ["dino", "self-supervised", "vision", "dino_hf"]
DEFAULT_LICENSE = "apache-2.0"
LOGIN_HINT = (
    "No Hugging Face token found: run `hf auth login` or set the HF_TOKEN environment variable "
    "(a token with write access), then try again."
)

# Files copied next to the backbone when they exist in the training output directory.
_OPTIONAL_RUN_FILES = (
    "training_args.json",
    "eval_results.json",
    "metrics.jsonl",
    "training_curves.png",
)
# Text files are read, scrubbed of secrets and uploaded from memory; the rest go from disk.
_TEXT_SUFFIXES = (".json", ".jsonl", ".md", ".txt", ".yaml", ".yml")
_SHARD_INDEX = "model.safetensors.index.json"
_DATA_FILE_SUFFIXES = (".parquet", ".tar", ".arrow", ".csv", ".json", ".jsonl", ".zip")
_SECRET_KEY_PATTERN = re.compile(r"token|password|secret|api_key|apikey|credential", re.IGNORECASE)
_HF_TOKEN_PATTERN = re.compile(r"\bhf_[A-Za-z0-9]{16,}\b")


class HubPushError(RuntimeError):
    """A push that could not be done; the message names the repository and any HTTP status.

    Attributes:
        repo_id: the target repository.
        status_code: HTTP status returned by the Hub, None when the failure was not an HTTP answer.
    """

    def __init__(self, message: str, repo_id: str, status_code: int | None = None) -> None:
        super().__init__(message)
        self.repo_id = repo_id
        self.status_code = status_code


class MissingTokenError(HubPushError):
    """No token was given and none is configured (``HF_TOKEN`` or ``hf auth login``)."""


# --------------------------------------------------------------------------- secrets
def scrub_secrets(text: str, token: str | None = None) -> str:
    """Replace ``token`` and anything shaped like a Hugging Face token (``hf_...``) by ``***``."""
    if token:
        text = text.replace(token, "***")
    return _HF_TOKEN_PATTERN.sub("hf_***", text)


def _strip_secret_fields(value: Any, token: str | None) -> Any:
    """Copy of a JSON value without keys that name a secret and without the token in any string."""
    if isinstance(value, dict):
        return {
            key: _strip_secret_fields(item, token)
            for key, item in value.items()
            if not _SECRET_KEY_PATTERN.search(str(key))
        }
    if isinstance(value, list):
        return [_strip_secret_fields(item, token) for item in value]
    if isinstance(value, str):
        return scrub_secrets(value, token)
    return value


def _file_contains(path: Path, needle: bytes, chunk_size: int = 1 << 24) -> bool:
    """Whether ``needle`` occurs in the file, read in chunks (with overlap) to bound memory."""
    overlap = b""
    with path.open("rb") as handle:
        while chunk := handle.read(chunk_size):
            if needle in overlap + chunk:
                return True
            overlap = chunk[-(len(needle) - 1) :] if len(needle) > 1 else b""
    return False


def resolve_token(token: str | None = None) -> str:
    """The token to push with: ``token`` if given, else ``HF_TOKEN`` or the cached login.

    Raises:
        MissingTokenError: with :data:`LOGIN_HINT` when there is none.
    """
    resolved = token or get_token()
    if not resolved:
        raise MissingTokenError(LOGIN_HINT, repo_id="")
    return resolved


# --------------------------------------------------------------------------- reading a run
@dataclass(frozen=True)
class TrainingOutput:
    """What a training output directory holds, as far as sharing is concerned.

    Attributes:
        model_dir: the directory given by the user.
        backbone_dir: the exported ViT backbone folder (``model_dir/backbone``, or ``model_dir``
            itself when it is a bare exported backbone).
        files: ``{path_in_repo: local_path}`` of every file to push, README excluded.
        training_args: parsed ``training_args.json`` (secrets removed), or ``{}``.
        eval_results: parsed ``eval_results.json``, or ``{}``.
        metrics: rows of ``metrics.jsonl``, or ``[]``.
        backbone_config: parsed backbone ``config.json``.
        dino_config: parsed ``model_dir/config.json`` of the full DinoForPreTraining, or ``{}``.
    """

    model_dir: Path
    backbone_dir: Path
    files: dict[str, Path]
    training_args: dict[str, Any]
    eval_results: dict[str, Any]
    metrics: list[dict[str, Any]]
    backbone_config: dict[str, Any]
    dino_config: dict[str, Any]


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"{path} is not valid JSON ({error}).") from None
    return value if isinstance(value, dict) else {}


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut short by a killed run
        if isinstance(row, dict):
            rows.append(row)
    return rows


def _weight_files(folder: Path) -> list[Path]:
    """The safetensors weights of a ``save_pretrained`` folder (one file, or shards and index)."""
    if (folder / "model.safetensors").is_file():
        return [folder / "model.safetensors"]
    index = folder / _SHARD_INDEX
    if index.is_file():
        shards = sorted(set(_read_json(index).get("weight_map", {}).values()))
        return [index, *(folder / shard for shard in shards)]
    return []


def read_training_output(model_dir: str | Path, *, include_training_model: bool = False) -> TrainingOutput:
    """Find what to push in a training output directory (or in a bare exported backbone folder).

    Raises:
        FileNotFoundError: no backbone or a missing file; the message says what to pass.
        ValueError: weights that are not safetensors, or unreadable JSON.
    """
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise FileNotFoundError(
            f"--model_dir {model_dir} is not a directory; pass the --output_dir of a dino_hf training run."
        )
    backbone_dir = model_dir / "backbone"
    if not backbone_dir.is_dir():
        if _read_json(model_dir / "config.json").get("model_type") == "vit":
            # an exported backbone on its own (e.g. a converted official checkpoint)
            backbone_dir = model_dir
        else:
            raise FileNotFoundError(
                f"{model_dir} has no backbone/ folder; pass the --output_dir of a finished dino_hf "
                "training run (or a folder written by DinoForPreTraining.save_backbone) as "
                "--model_dir."
            )
    for name in ("config.json", "preprocessor_config.json"):
        if not (backbone_dir / name).is_file():
            raise FileNotFoundError(
                f"{backbone_dir / name} is missing; re-export the backbone with DinoForPreTraining.save_backbone."
            )
    weights = _weight_files(backbone_dir)
    if not weights:
        raise ValueError(
            f"{backbone_dir} has no model.safetensors; only safetensors weights are pushed "
            "(re-save the backbone with save_pretrained(safe_serialization=True))."
        )

    files: dict[str, Path] = {name: backbone_dir / name for name in ("config.json", "preprocessor_config.json")}
    files.update({path.name: path for path in weights})
    for name in _OPTIONAL_RUN_FILES:
        if (model_dir / name).is_file():
            files[name] = model_dir / name
    if include_training_model:
        training_weights = _weight_files(model_dir)
        if backbone_dir == model_dir or not (model_dir / "config.json").is_file() or not training_weights:
            raise FileNotFoundError(
                f"{model_dir} holds no full DinoForPreTraining (config.json + model.safetensors); "
                "drop --include_training_model or pass the training --output_dir."
            )
        files[f"{TRAINING_MODEL_SUBFOLDER}/config.json"] = model_dir / "config.json"
        files.update({f"{TRAINING_MODEL_SUBFOLDER}/{path.name}": path for path in training_weights})

    training_args = _strip_secret_fields(_read_json(model_dir / "training_args.json"), None)
    return TrainingOutput(
        model_dir=model_dir,
        backbone_dir=backbone_dir,
        files=files,
        training_args=training_args,
        eval_results=_read_json(model_dir / "eval_results.json"),
        metrics=_read_jsonl(model_dir / "metrics.jsonl"),
        backbone_config=_read_json(backbone_dir / "config.json"),
        dino_config=_read_json(model_dir / "config.json") if backbone_dir != model_dir else {},
    )


def _safetensors_parameter_count(paths: list[Path]) -> int | None:
    """Number of parameters in safetensors files, read from their headers (no tensor loaded)."""
    total = 0
    for path in paths:
        if path.suffix != ".safetensors":
            continue
        try:
            with path.open("rb") as handle:
                (header_size,) = struct.unpack("<Q", handle.read(8))
                header = json.loads(handle.read(header_size))
        except (OSError, struct.error, json.JSONDecodeError, UnicodeDecodeError):
            return None
        total += sum(math.prod(entry["shape"]) for key, entry in header.items() if key != "__metadata__")
    return total


# --------------------------------------------------------------------------- the model card
def _looks_like_hub_id(name: Any) -> bool:
    """Whether a dataset/model reference is a Hub repo id rather than a local path."""
    if not isinstance(name, str) or not name:
        return False
    if name.startswith(("/", ".", "~")) or "\\" in name or name.count("/") > 1 or Path(name).exists():
        return False
    if Path(name).suffix.lower() in _DATA_FILE_SUFFIXES:
        return False
    return re.fullmatch(r"[\w.-]+(/[\w.-]+)?", name) is not None


def _format_number(value: Any) -> str:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return str(value)
    if isinstance(value, int):
        return f"{value:,}"
    return f"{value:.6g}"


def _format_duration(seconds: float) -> str:
    minutes, secs = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min" if hours else f"{minutes} min {secs:02d} s"


def _first(mappings: list[dict[str, Any]], *keys: str) -> Any:
    """First value found for any of ``keys`` in the mappings, in order; None when absent."""
    for mapping in mappings:
        for key in keys:
            if mapping.get(key) is not None:
                return mapping[key]
    return None


_METRIC_KEY = re.compile(
    r"^(?P<prefix>.*?_)?(?P<kind>knn|linear_probe)"
    r"(?:_top(?P<top>\d+))?(?:_k(?P<k>\d+))?(?:_accuracy|_acc)?$"
)
_OWN_PREFIXES = ("", "eval_", "test_", "teacher_")
_BASELINE_NAMES = {
    "raw_pixels_": "raw pixels",
    "pixels_": "raw pixels",
    "random_init_": "random weights",
    "random_": "random weights",
}


@dataclass(frozen=True)
class _Metric:
    key: str
    label: str  # e.g. "20-NN top-1 accuracy"
    value: float
    subject: str  # "this model" or a baseline ("raw pixels", ...)


def _parse_metrics(values: dict[str, Any]) -> list[_Metric]:
    """Accuracy entries of an evaluation dict.

    Recognised keys (numbers in ``eval_results.json`` or an eval row of ``metrics.jsonl``):
    ``knn_top1_k20``, ``knn_k20``, ``knn_top1`` (k from a ``k`` entry), ``linear_probe``,
    ``linear_probe_top1``, ``linear_probe_accuracy``, optionally prefixed
    ``eval_``/``test_``/``teacher_``; a ``raw_pixels_`` or ``random_init_`` prefix marks a baseline,
    other prefixes are ignored. A nested ``{"knn": {"20": 0.8}}`` (k -> accuracy) is read too.
    """
    flat: dict[str, Any] = {}
    for key, value in values.items():
        if isinstance(value, dict) and key in ("knn", "knn_accuracy", "knn_top1"):
            flat.update({f"knn_top1_k{k}": v for k, v in value.items() if str(k).isdigit()})
        else:
            flat[key] = value
    metrics = []
    for key, value in flat.items():
        match = _METRIC_KEY.match(key)
        if match is None or isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        top = match.group("top") or "1"
        if match.group("kind") == "knn":
            k = match.group("k") or (str(values["k"]) if isinstance(values.get("k"), int) else None)
            label = f"{k}-NN top-{top} accuracy" if k else f"k-NN top-{top} accuracy"
        else:
            label = f"linear probe top-{top} accuracy"
        prefix = match.group("prefix") or ""
        if prefix in _OWN_PREFIXES:
            subject = "this model"
        elif prefix in _BASELINE_NAMES:
            subject = _BASELINE_NAMES[prefix]
        else:
            continue  # a prefix whose meaning is unknown: better unstated than mislabelled
        metrics.append(_Metric(key=key, label=label, value=float(value), subject=subject))
    return metrics


def _evaluation(run: TrainingOutput) -> dict[str, Any]:
    """Results for the card: eval_results.json, else the last evaluation row of metrics.jsonl."""
    source = run.eval_results
    origin = "eval_results.json" + (f" (step {source['step']})" if source.get("step") is not None else "")
    metrics = _parse_metrics(source)
    if not metrics:
        eval_rows = [row for row in run.metrics if _parse_metrics(row)]
        if eval_rows:
            source = eval_rows[-1]
            origin = f"the in-training k-NN monitor at step {source.get('step', '?')} (metrics.jsonl)"
            metrics = _parse_metrics(source)
    # In the evaluation file, plain names describe the evaluation; in the training arguments only
    # the eval_* names do (dataset_name / train_split there are the pre-training data).
    args = run.training_args
    in_training = not origin.startswith("eval_results.json")
    return {
        "metrics": metrics,
        "origin": origin,
        "dataset": _first([source], "eval_dataset_name", "dataset_name") or args.get("eval_dataset_name"),
        "dataset_config": _first([source], "eval_dataset_config_name", "dataset_config_name")
        or args.get("eval_dataset_config_name"),
        "test_split": _first([source], "eval_split", "test_split", "split") or args.get("eval_split"),
        "train_split": _first([source], "eval_train_split", "train_split") or args.get("eval_train_split"),
        "num_samples": _first([source], "num_test_samples", "num_samples"),
        "extra": _first([source, args], "eval_max_samples") if in_training else None,
    }


def _eval_results_metadata(evaluation: dict[str, Any]) -> list[EvalResult]:
    """``model-index`` entries for this model's own accuracies (baselines stay in the card body)."""
    dataset = evaluation["dataset"]
    if not dataset:
        return []
    dataset_id = dataset if _looks_like_hub_id(dataset) else Path(str(dataset)).name or str(dataset)
    results = []
    for metric in evaluation["metrics"]:
        if metric.subject != "this model":
            continue
        knn = metric.key.startswith("knn")
        results.append(
            EvalResult(
                task_type="image-classification",
                task_name="k-NN classification on frozen features" if knn else "linear probe on frozen features",
                dataset_type=dataset_id,
                dataset_name=dataset_id,
                dataset_config=evaluation["dataset_config"],
                dataset_split=evaluation["test_split"],
                metric_type="accuracy",
                metric_name=metric.label,
                metric_value=metric.value,
            )
        )
    return results


def _architecture_rows(run: TrainingOutput) -> list[tuple[str, str]]:
    config = run.backbone_config
    rows = []
    if run.training_args.get("model_config"):
        rows.append(("Preset / config", f"`{run.training_args['model_config']}`"))
    shape = [
        (key, config.get(key))
        for key in (
            "hidden_size",
            "num_hidden_layers",
            "num_attention_heads",
            "intermediate_size",
            "patch_size",
            "image_size",
        )
    ]
    if all(value is not None for _, value in shape):
        hidden, layers, heads, mlp, patch, size = (value for _, value in shape)
        rows.append(
            (
                "Backbone",
                (f"ViT, width {hidden}, {layers} layers, {heads} heads, MLP {mlp}, patch {patch}, {size} px input"),
            )
        )
    parameters = _safetensors_parameter_count([p for p in run.files.values() if p.parent == run.backbone_dir])
    if parameters:
        rows.append(("Backbone parameters", f"{parameters / 1e6:.2f} M"))
    if config.get("layer_norm_eps") is not None:
        rows.append(("LayerNorm eps", _format_number(config["layer_norm_eps"])))
    head = run.dino_config
    if head.get("num_prototypes") is not None:
        rows.append(("Prototypes (K)", _format_number(head["num_prototypes"])))
    if head.get("head_hidden_size") is not None and head.get("head_bottleneck_size") is not None:
        norm = ", batch norm" if head.get("head_use_batch_norm") else ""
        rows.append(
            (
                "Projection head",
                (
                    f"{head.get('head_num_layers', '?')}-layer MLP, hidden "
                    f"{head['head_hidden_size']}, bottleneck "
                    f"{head['head_bottleneck_size']}{norm}"
                ),
            )
        )
    return rows


def _training_rows(run: TrainingOutput) -> list[tuple[str, str]]:
    """Recipe rows of the card, each only when the value was recorded."""
    args = run.training_args
    last = run.metrics[-1] if run.metrics else {}
    rows: list[tuple[str, str]] = []

    def add(label: str, text: str | None) -> None:
        if text is not None:
            rows.append((label, text))

    def steps_or_epochs(steps_key: str, epochs_key: str) -> str | None:
        steps = args.get(steps_key)
        if steps:
            return f"{_format_number(steps)} steps"
        epochs = args.get(epochs_key)
        return f"{_format_number(epochs)} epochs" if epochs else None

    dataset = args.get("dataset_name")
    if dataset:
        extra = ", ".join(f"{k} `{args[k]}`" for k in ("dataset_config_name", "train_split") if args.get(k))
        source = "Hub dataset" if _looks_like_hub_id(dataset) else "local dataset"
        add("Data", f"{source} `{dataset}`" + (f" ({extra})" if extra else ""))
    if args.get("model_name_or_path"):
        add("Initialised from", f"`{args['model_name_or_path']}`")
    if args.get("global_crop_size") is not None:
        scale = f", scale {tuple(args['global_crop_scale'])}" if args.get("global_crop_scale") else ""
        add("Global crops", f"2 x {args['global_crop_size']} px{scale}")
    if args.get("num_local_crops") is not None:
        size = f" x {args['local_crop_size']} px" if args.get("local_crop_size") is not None else ""
        scale = f", scale {tuple(args['local_crop_scale'])}" if args.get("local_crop_scale") else ""
        add("Local crops", f"{args['num_local_crops']}{size}{scale}")
    if args.get("teacher_temperature") is not None:
        text = _format_number(args["teacher_temperature"])
        warmup = steps_or_epochs("warmup_teacher_temperature_steps", "warmup_teacher_temperature_epochs")
        start = args.get("warmup_teacher_temperature")
        if start is not None and warmup and start != args["teacher_temperature"]:
            text = f"{_format_number(start)} -> {text} (linear over {warmup})"
        add("Teacher temperature", text)
    student_temperature = _first([args, run.dino_config], "student_temperature")
    if student_temperature is not None:
        add("Student temperature", _format_number(student_temperature))
    if args.get("teacher_momentum") is not None:
        add("Teacher EMA momentum", f"{_format_number(args['teacher_momentum'])} -> 1.0 (cosine)")
    center_momentum = _first([args, run.dino_config], "center_momentum")
    if center_momentum is not None:
        add("Center momentum", _format_number(center_momentum))
    if args.get("per_device_train_batch_size") is not None:
        parts = [f"{args['per_device_train_batch_size']} per device"]
        if (args.get("gradient_accumulation_steps") or 1) > 1:
            parts.append(f"x {args['gradient_accumulation_steps']} accumulation steps")
        processes = args.get("num_processes")
        if processes:
            parts.append(f"x {processes} processes")
        global_batch = args.get("global_batch_size")
        add(
            "Batch size",
            (f"{global_batch} images per step ({' '.join(parts)})" if global_batch else " ".join(parts)),
        )
    if args.get("learning_rate") is not None:
        text = f"{_format_number(args['learning_rate'])} per 256 images"
        peak = args.get("scaled_learning_rate")
        if peak is not None:
            text += f" (peak {_format_number(peak)} for the global batch)"
        if args.get("min_learning_rate") is not None:
            text += f", cosine to {_format_number(args['min_learning_rate'])}"
        warmup = steps_or_epochs("warmup_steps", "warmup_epochs")
        if warmup:
            text += f", {warmup} of linear warm-up"
        add("Learning rate (AdamW)", text)
    if args.get("weight_decay") is not None:
        end = args.get("weight_decay_end")
        add(
            "Weight decay",
            _format_number(args["weight_decay"])
            + (f" -> {_format_number(end)} (cosine)" if end is not None and end != args["weight_decay"] else ""),
        )
    if args.get("max_grad_norm") is not None:
        mode = f" ({args['clip_mode']})" if args.get("clip_mode") else ""
        add("Gradient clipping", f"{_format_number(args['max_grad_norm'])}{mode}")
    frozen = steps_or_epochs("freeze_last_layer_steps", "freeze_last_layer_epochs")
    if frozen:
        add("Last layer frozen", f"first {frozen}")
    if args.get("mixed_precision"):
        add("Mixed precision", str(args["mixed_precision"]))
    planned = args.get("max_steps")
    recorded_steps = [step for step in (last.get("step"), run.eval_results.get("step")) if isinstance(step, int)]
    if recorded_steps:
        add(
            "Optimiser steps",
            _format_number(max(recorded_steps)) + (f" (of {_format_number(planned)} planned)" if planned else ""),
        )
    elif planned:
        add("Optimiser steps (planned)", _format_number(planned))
    elif args.get("num_train_epochs") is not None:
        add("Epochs (planned)", _format_number(args["num_train_epochs"]))
    hardware = args.get("hardware")
    add("Hardware", str(hardware) if hardware else None)
    runtime = args.get("train_runtime")
    add(
        "Training time",
        _format_duration(float(runtime)) if isinstance(runtime, (int, float)) else None,
    )
    if args.get("seed") is not None:
        add("Seed", str(args["seed"]))
    return rows


def render_model_card(
    model_dir: str | Path,
    repo_id: str,
    *,
    license: str | None = None,
    include_training_model: bool = False,
    template_path: str | Path | None = None,
) -> ModelCard:
    """Render the model card of a training output directory for ``repo_id``.

    Only values present in the run's files are stated: the recipe from ``training_args.json``, K and
    the head from the DinoForPreTraining ``config.json``, the architecture from the backbone,
    accuracies from ``eval_results.json`` (else the last k-NN row of ``metrics.jsonl``, labelled as
    such).

    Args:
        model_dir: training output directory (or an exported backbone folder).
        repo_id: the ``user/name`` the card is for (used in the code samples).
        license: license id for the metadata; default ``training_args.json``'s
            ``hub_license``/``license``, else ``apache-2.0``.
        include_training_model: say that the full DinoForPreTraining is in ``training_model/``.
        template_path: Jinja template; default :data:`MODEL_CARD_TEMPLATE`.

    Returns:
        ``huggingface_hub.ModelCard`` whose metadata has library_name, pipeline_tag, tags, license,
        datasets (Hub ids only), base_model (when started from a Hub checkpoint) and model-index
        (when evaluated).
    """
    run = read_training_output(model_dir, include_training_model=include_training_model)
    return _render_card(run, repo_id, license=license, template_path=template_path)


def _render_card(
    run: TrainingOutput,
    repo_id: str,
    *,
    license: str | None = None,
    template_path: str | Path | None = None,
) -> ModelCard:
    args = run.training_args
    evaluation = _evaluation(run)
    model_name = repo_id.split("/")[-1]
    dataset = args.get("dataset_name")
    started_from = args.get("model_name_or_path")
    base_model = started_from if _looks_like_hub_id(started_from) else None
    datasets = [dataset] if _looks_like_hub_id(dataset) else []  # training data only
    eval_results = _eval_results_metadata(evaluation)

    card_data = ModelCardData(
        library_name="transformers",
        pipeline_tag="image-feature-extraction",
        tags=list(CARD_TAGS),
        license=license or args.get("hub_license") or args.get("license") or DEFAULT_LICENSE,
        datasets=datasets or None,
        base_model=base_model,
        model_name=model_name if eval_results else None,
        eval_results=eval_results or None,
    )
    template = Path(template_path) if template_path is not None else MODEL_CARD_TEMPLATE
    if not template.is_file():
        raise FileNotFoundError(
            f"Model card template {template} not found; dino_hf must be installed from a "
            "source checkout (pip install -e .) so that model_cards/ is present."
        )
    metrics = evaluation["metrics"]
    return ModelCard.from_template(
        card_data,
        template_path=str(template),
        repo_id=repo_id,
        model_name=model_name,
        base_model=base_model,
        started_from=started_from,
        dataset=dataset,
        dataset_is_hub=_looks_like_hub_id(dataset),
        architecture_rows=_architecture_rows(run),
        training_rows=_training_rows(run),
        results=[m for m in metrics if m.subject == "this model"],
        baselines=[m for m in metrics if m.subject != "this model"],
        has_knn=any(m.key.startswith("knn") or "_knn" in m.key for m in metrics),
        results_origin=evaluation["origin"],
        eval_dataset=evaluation["dataset"],
        eval_test_split=evaluation["test_split"],
        eval_train_split=evaluation["train_split"],
        eval_num_samples=evaluation["num_samples"],
        eval_max_samples=evaluation["extra"],
        image_size=run.backbone_config.get("image_size"),
        has_training_model=f"{TRAINING_MODEL_SUBFOLDER}/config.json" in run.files,
        training_model_subfolder=TRAINING_MODEL_SUBFOLDER,
        has_curves="training_curves.png" in run.files,
    )


# --------------------------------------------------------------------------- pushing
def _http_status(error: BaseException) -> tuple[int | None, str | None]:
    """HTTP status and server message of the first HfHubHTTPError in an exception's cause chain."""
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, HfHubHTTPError) and current.response is not None:
            return current.response.status_code, current.server_message
        current = current.__cause__ or current.__context__
    return None, None


def _commit_operations(run: TrainingOutput, card: ModelCard, token: str) -> list[CommitOperationAdd]:
    """One upload per file; text files are scrubbed in memory; nothing carrying the token is pushed."""
    needle = token.encode()
    operations = [CommitOperationAdd("README.md", scrub_secrets(str(card), token).encode("utf-8"))]
    for path_in_repo, local_path in sorted(run.files.items()):
        if local_path.suffix in _TEXT_SUFFIXES:
            text = local_path.read_text(encoding="utf-8")
            if path_in_repo == "training_args.json":
                text = json.dumps(_strip_secret_fields(json.loads(text), token), indent=2) + "\n"
            content = scrub_secrets(text, token).encode("utf-8")
            operations.append(CommitOperationAdd(path_in_repo, content))
        else:
            if _file_contains(local_path, needle):
                raise HubPushError(
                    f"Refusing to push {local_path}: it contains the Hugging Face token.",
                    repo_id="",
                )
            operations.append(CommitOperationAdd(path_in_repo, str(local_path)))
    return operations


def _stale_file_deletions(
    api: HfApi, repo_id: str, revision: str | None, pushed: set[str]
) -> list[CommitOperationDelete]:
    """Deletions of run files and root weights left in the repository by an earlier push.

    A re-push replaces the model card, so records it no longer describes (e.g. an old
    eval_results.json or the shards of a differently sharded backbone) must go too.
    ``training_model/`` is left alone.
    """
    try:
        remote = api.list_repo_files(repo_id, revision=revision)
    except (RepositoryNotFoundError, RevisionNotFoundError):
        return []
    managed = [
        path
        for path in remote
        if "/" not in path and (path in _OPTIONAL_RUN_FILES or path.endswith(".safetensors") or path == _SHARD_INDEX)
    ]
    return [CommitOperationDelete(path) for path in managed if path not in pushed]


def _default_commit_message(run: TrainingOutput) -> str:
    step = run.metrics[-1].get("step") if run.metrics else None
    return (
        f"Upload DINO backbone (step {step}) with dino_hf" if step is not None else "Upload DINO backbone with dino_hf"
    )


def push_training_output(
    model_dir: str | Path,
    repo_id: str,
    *,
    private: bool = False,
    revision: str | None = None,
    commit_message: str | None = None,
    token: str | None = None,
    include_training_model: bool = False,
    license: str | None = None,
) -> str:
    """Push a training output directory to the Hub as a plain ``transformers`` ViT model; return the commit URL.

    Creates the repository if needed (``exist_ok=True``; ``private`` only applies to a new
    repository) and the branch ``revision`` if it does not exist, then makes a single commit with
    the backbone (config.json, model.safetensors, preprocessor_config.json) at the root, README.md,
    training_args.json (secrets removed), and eval_results.json, metrics.jsonl and
    training_curves.png when they exist; with ``include_training_model``, also the full
    DinoForPreTraining under ``training_model/``.

    Args:
        model_dir: training output directory, or an exported backbone folder.
        repo_id: ``user/name`` (a bare ``name`` is put under the token's account).
        private: create a new repository as private.
        revision: branch to commit to (default ``main``); created from ``main`` when missing.
        commit_message: default "Upload DINO backbone (step N) with dino_hf".
        token: a Hub token; default ``HF_TOKEN`` or the cached ``hf auth login``.
        include_training_model: also push ``model_dir/config.json`` + ``model.safetensors``.
        license: license id for the card metadata (see :func:`render_model_card`).

    Raises:
        MissingTokenError: no token anywhere (message: how to log in).
        HubPushError: the Hub refused or the upload failed; the message names the repository and the
            HTTP status, and never contains the token.
        FileNotFoundError, ValueError: the directory does not hold a pushable backbone.
    """
    resolved_token = resolve_token(token)
    run = read_training_output(model_dir, include_training_model=include_training_model)
    api = HfApi(token=resolved_token)
    target = repo_id
    try:
        if "/" not in repo_id:
            target = f"{api.whoami()['name']}/{repo_id}"
        card = _render_card(run, target, license=license)
        additions = _commit_operations(run, card, resolved_token)
        api.create_repo(target, repo_type="model", private=True if private else None, exist_ok=True)
        if revision is not None and revision != "main":
            api.create_branch(target, branch=revision, repo_type="model", exist_ok=True)
        deletions = _stale_file_deletions(api, target, revision, {operation.path_in_repo for operation in additions})
        logger.info(
            "Pushing %d files from %s to %s (%s)%s",
            len(additions),
            run.model_dir,
            target,
            revision or "main",
            f", removing {len(deletions)} stale files" if deletions else "",
        )
        info = api.create_commit(
            target,
            [*deletions, *additions],
            commit_message=commit_message or _default_commit_message(run),
            repo_type="model",
            revision=revision,
        )
    except HubPushError as error:
        raise HubPushError(scrub_secrets(str(error), resolved_token), repo_id=target) from None
    except (FileNotFoundError, NotADirectoryError):
        raise
    except Exception as error:  # noqa: BLE001 - any transport/Hub failure becomes one sentence
        status, server_message = _http_status(error)
        if status is not None:
            if not server_message and not isinstance(error, HfHubHTTPError):
                server_message = str(error)  # e.g. "Invalid metadata in README.md ..." (HTTP 400)
            detail = f": {server_message}" if server_message else ""
            message = f"Pushing to {target} failed: the Hub answered HTTP {status}{detail}."
        else:
            message = f"Pushing to {target} failed: {type(error).__name__}: {error}"
        raise HubPushError(scrub_secrets(message, resolved_token), repo_id=target, status_code=status) from None
    logger.info("Pushed %s: %s", target, info.commit_url)
    return info.commit_url


def try_push_training_output(
    model_dir: str | Path,
    repo_id: str,
    *,
    private: bool = False,
    revision: str | None = None,
    commit_message: str | None = None,
    token: str | None = None,
    include_training_model: bool = False,
) -> bool:
    """:func:`push_training_output` for the training loop: never raises; on failure, warns and returns False.

    Call it on the main process only; on False, try again at the next opportunity (next checkpoint
    or the end of training). Returns True when the commit was made.
    """
    try:
        push_training_output(
            model_dir,
            repo_id,
            private=private,
            revision=revision,
            commit_message=commit_message,
            token=token,
            include_training_model=include_training_model,
        )
    except Exception as error:  # noqa: BLE001 - a failed push must never stop training
        logger.warning(
            "Push of %s to %s failed; training continues and the push will be retried: %s",
            model_dir,
            repo_id,
            scrub_secrets(str(error), token),
        )
        return False
    return True

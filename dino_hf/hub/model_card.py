"""The model card of a trained DINO backbone, rendered from ``model_cards/dino_backbone.md``.

:func:`render_model_card` reads a run's output folder (through :mod:`dino_hf.base.run_folder`) and fills
the Jinja template with ``huggingface_hub.ModelCard.from_template``: metadata (library, pipeline,
tags, license, Hub-id datasets, base model, ``model-index``) and the tables of the architecture, the
recipe and the results. Only values present in the run's files are stated. This module does not
import torch.
"""

from __future__ import annotations

import importlib.resources
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from huggingface_hub import EvalResult, ModelCard, ModelCardData

from dino_hf.base.run_folder import (
    EVAL_RESULTS_NAME,
    TRAINING_CURVES_NAME,
    TRAINING_MODEL_SUBFOLDER,
    TrainingOutput,
    read_training_output,
    safetensors_parameter_count,
)

__all__ = ["CARD_TAGS", "DEFAULT_LICENSE", "MODEL_CARD_TEMPLATE", "render_card", "render_model_card"]

MODEL_CARD_TEMPLATE = importlib.resources.files("dino_hf") / "model_cards" / "dino_backbone.md"
"""Jinja template of the model card, shipped inside the package (rendered with
``huggingface_hub.ModelCard.from_template``)."""

CARD_TAGS = ["dino", "self-supervised", "vision", "dino_hf"]
DEFAULT_LICENSE = "apache-2.0"
_DATA_FILE_SUFFIXES = (".parquet", ".tar", ".arrow", ".csv", ".json", ".jsonl", ".zip")


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
    origin = EVAL_RESULTS_NAME + (f" (step {source['step']})" if source.get("step") is not None else "")
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
    in_training = not origin.startswith(EVAL_RESULTS_NAME)
    return {
        "metrics": metrics,
        "origin": origin,
        "dataset": _first([source], "eval_dataset_name", "dataset_name") or args.get("eval_dataset_name"),
        "dataset_config": _first([source], "dataset_config_name"),
        "test_split": _first([source], "eval_split", "test_split", "split") or args.get("eval_split"),
        "train_split": _first([source], "eval_train_split", "train_split") or args.get("eval_train_split"),
        "num_samples": _first([source], "num_test_samples", "num_samples"),
        "extra": _first([source, args], "eval_max_samples") if in_training else None,
    }


def _eval_results_metadata(evaluation: dict[str, Any]) -> list[EvalResult]:
    """``model-index`` entries for this model's own accuracies (baselines stay in the card body)."""
    dataset = evaluation["dataset"]
    if not _looks_like_hub_id(dataset):
        return []  # model-index names Hub datasets only; a local set is named in the card's prose
    dataset_id = dataset
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


def _local_name(name: Any) -> str | None:
    """How the card names a dataset or model: a Hub id as it is, a local path by its last folder only
    (no path of the training machine leaves it)."""
    if not isinstance(name, str) or not name:
        return None
    return name if _looks_like_hub_id(name) else Path(name.rstrip("/\\")).name or name


#: Backbone config fields that make an architecture, for comparing a run's backbone with its preset.
_ARCHITECTURE_FIELDS = ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "patch_size")


def _preset_row(run: TrainingOutput) -> tuple[str, str] | None:
    """The "Preset" row: the preset's name when the backbone is that preset, else what changed."""
    name = run.training_args.get("model_config")
    if not name:
        return None
    from dino_hf.models.configuration_dino import preset_backbone_settings

    preset = preset_backbone_settings(name)
    if preset is None:  # a config folder or file: the rows below describe the architecture
        return None
    changed = [key for key in _ARCHITECTURE_FIELDS
               if run.backbone_config.get(key) is not None and run.backbone_config.get(key) != preset.get(key)]
    if not changed:
        return ("Preset", f"`{name}`")
    return ("Architecture", f"custom: `{name}` with {', '.join(changed)} changed (see Backbone)")


def _architecture_rows(run: TrainingOutput) -> list[tuple[str, str]]:
    config = run.backbone_config
    rows = []
    preset_row = _preset_row(run)
    if preset_row is not None:
        rows.append(preset_row)
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
    parameters = safetensors_parameter_count([p for p in run.files.values() if p.parent == run.backbone_dir])
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
    objective = _objective_text(head)
    if objective is not None:
        rows.append(("Objective", objective))
    return rows


def _objective_text(head: dict) -> str | None:
    """DINOv2's terms when the run used them (``None`` for DINO alone, whose card is unchanged)."""
    ibot, koleo = head.get("ibot_loss_weight") or 0, head.get("koleo_loss_weight") or 0
    if not ibot and not koleo:
        return None
    terms = ["DINO"]
    if ibot:
        own = head.get("ibot_separate_head")
        prototypes = head.get("ibot_num_prototypes") or head.get("num_prototypes")
        terms.append(f"iBOT masked patches (weight {_format_number(ibot)}, "
                     + (f"own head, K {_format_number(prototypes)})" if own else "shared head)"))
    if koleo:
        terms.append(f"KoLeo (weight {_format_number(koleo)})")
    return " + ".join(terms) + f", teachers: {head.get('teacher_centering', 'centering').replace('_', '-')}"


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
        add("Data", f"{source} `{_local_name(dataset)}`" + (f" ({extra})" if extra else ""))
    if args.get("model_name_or_path"):
        add("Initialised from", f"`{_local_name(args['model_name_or_path'])}`")
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
    backbone_dir: str | Path | None = None,
) -> ModelCard:
    """Render the model card of a training output directory for ``repo_id``.

    Only values present in the run's files are stated: the recipe from ``training_args.json``, K and
    the head from the DinoForPreTraining ``config.json``, the architecture from the backbone,
    accuracies from ``eval_results.json`` (else the last k-NN row of ``metrics.jsonl``, labelled as
    such).

    Args:
        model_dir: training output directory (or an exported backbone folder).
        repo_id: the ``user/name`` the card is for (used in the code samples).
        license: license id for the metadata; default ``apache-2.0``.
        include_training_model: say that the full DinoForPreTraining is in ``training_model/``.
        template_path: Jinja template; default :data:`MODEL_CARD_TEMPLATE`.

    Returns:
        ``huggingface_hub.ModelCard`` whose metadata has library_name, pipeline_tag, tags, license,
        datasets (Hub ids only), base_model (when started from a Hub checkpoint) and model-index
        (when evaluated).
    """
    run = read_training_output(model_dir, include_training_model=include_training_model, backbone_dir=backbone_dir)
    return render_card(run, repo_id, license=license, template_path=template_path)


def render_card(
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
    dataset_is_hub = _looks_like_hub_id(dataset)
    dataset, started_from = _local_name(dataset), _local_name(started_from)
    eval_results = _eval_results_metadata(evaluation)

    card_data = ModelCardData(
        library_name="transformers",
        pipeline_tag="image-feature-extraction",
        tags=list(CARD_TAGS),
        license=license or DEFAULT_LICENSE,
        datasets=datasets or None,
        base_model=base_model,
        model_name=model_name if eval_results else None,
        eval_results=eval_results or None,
    )
    template = Path(template_path) if template_path is not None else MODEL_CARD_TEMPLATE
    if not template.is_file():
        raise FileNotFoundError(f"Model card template {template} not found (pass an existing template_path).")
    metrics = evaluation["metrics"]
    with importlib.resources.as_file(template) as template_file:
        card = ModelCard.from_template(
            card_data,
            template_path=str(template_file),
            repo_id=repo_id,
            model_name=model_name,
            base_model=base_model,
            started_from=started_from,
            dataset=dataset,
            dataset_is_hub=dataset_is_hub,
            architecture_rows=_architecture_rows(run),
            training_rows=_training_rows(run),
            results=[m for m in metrics if m.subject == "this model"],
            baselines=[m for m in metrics if m.subject != "this model"],
            has_knn=any(m.key.startswith("knn") or "_knn" in m.key for m in metrics),
            results_origin=evaluation["origin"],
            eval_dataset=_local_name(evaluation["dataset"]),
            eval_test_split=evaluation["test_split"],
            eval_train_split=evaluation["train_split"],
            eval_num_samples=evaluation["num_samples"],
            eval_max_samples=evaluation["extra"],
            image_size=run.backbone_config.get("image_size"),
            has_training_model=f"{TRAINING_MODEL_SUBFOLDER}/config.json" in run.files,
            training_model_subfolder=TRAINING_MODEL_SUBFOLDER,
            has_curves=TRAINING_CURVES_NAME in run.files,
        )
    return card

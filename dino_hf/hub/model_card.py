"""The model card of a trained DINO backbone, rendered from ``model_cards/dino_backbone.md``.

:func:`render_model_card` reads a run's output folder (through :mod:`dino_hf.base.run_folder`) and fills
the Jinja template with ``huggingface_hub.ModelCard.from_template``: metadata (library, pipeline,
tags, license, Hub-id datasets, base model, ``model-index``) and the tables of the architecture, the
recipe and the results. Only values present in the run's files are stated. The card speaks of the
backbone's own family (its class, embedding, resolution and processor) and its code is the family's
(:meth:`dino_hf.models.backbones.BackboneFamily.usage`), code that runs with plain ``transformers``.
:func:`write_run_cards` writes the card into a finished run's folder (``README.md`` and
``backbone/README.md``). Importing this module does not import torch (rendering does).
"""

from __future__ import annotations

import importlib.resources
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from huggingface_hub import EvalResult, ModelCard, ModelCardData

from dino_hf.base.run_folder import (
    CONFIG_NAME,
    EVAL_RESULTS_NAME,
    PROCESSOR_CONFIG_NAME,
    TEACHER_HASH_KEY,
    TRAINING_ARGS_NAME,
    TRAINING_CURVES_NAME,
    TRAINING_MODEL_SUBFOLDER,
    TrainingOutput,
    portable_path,
    read_json,
    read_training_output,
    safetensors_parameter_count,
)

__all__ = [
    "CARD_TAGS",
    "DEFAULT_LICENSE",
    "MODEL_CARD_TEMPLATE",
    "bare_backbone_dir",
    "render_card",
    "render_model_card",
    "write_run_cards",
]

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
    """The "Preset" row: the preset's name when the backbone is that preset, else what changed (the
    presets are ViTs: a run of another family, or one that started from a model, has no such row)."""
    name = run.training_args.get("model_config")
    if not name or run.training_args.get("model_name_or_path") or run.backbone_config.get("model_type") != "vit":
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


def _backbone_row(config: dict[str, Any], name: str) -> str | None:
    """The architecture in one line, in the terms of the backbone's family."""
    hidden, layers, heads = config.get("hidden_size"), config.get("num_hidden_layers"), config.get("num_attention_heads")
    if hidden is not None and layers is not None and heads is not None:  # a transformer
        mlp = config.get("intermediate_size")
        if mlp is None and config.get("mlp_ratio") is not None:
            mlp = int(config["mlp_ratio"] * hidden)
        parts = [name, f"width {hidden}", f"{layers} layers", f"{heads} heads"]
        parts += [f"MLP {mlp}"] if mlp is not None else []
        parts += [f"patch {config['patch_size']}"] if config.get("patch_size") is not None else []
        if config.get("num_register_tokens"):
            parts.append(f"{config['num_register_tokens']} registers")
        if config.get("image_size") is not None:
            parts.append(f"{config['image_size']} px input")
        return ", ".join(parts)
    widths, depths = config.get("hidden_sizes"), config.get("depths")
    if widths and depths:  # a ConvNet
        blocks = f" ({config['layer_type']} blocks)" if config.get("layer_type") else ""
        return (f"{name}{blocks}, {len(widths)} stages of widths {', '.join(map(str, widths))} and depths "
                f"{', '.join(map(str, depths))}")
    return None


_RESAMPLING = {0: "nearest", 1: "Lanczos", 2: "bilinear", 3: "bicubic", 4: "box", 5: "Hamming"}
_IMAGENET_MEAN, _IMAGENET_STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]


def _size_text(size: Any) -> str | None:
    if not isinstance(size, dict):
        return f"{size} px" if isinstance(size, int) else None
    if size.get("height") and size.get("width"):
        return f"{size['height']} x {size['width']} px"
    if size.get("shortest_edge"):
        return f"shorter side {size['shortest_edge']} px"
    return None


def _processor_text(processor: dict[str, Any]) -> str | None:
    """What the exported ``preprocessor_config.json`` does to an image, in one line."""
    if not processor:
        return None
    steps = []
    resize = _size_text(processor.get("size")) if processor.get("do_resize", True) else None
    if resize:
        method = _RESAMPLING.get(processor.get("resample"))
        steps.append(f"resize to {resize}" + (f" ({method})" if method else ""))
    if processor.get("do_center_crop") and _size_text(processor.get("crop_size")):
        steps.append(f"centre crop {_size_text(processor.get('crop_size'))}")
    mean, std = processor.get("image_mean"), processor.get("image_std")
    if processor.get("do_normalize", True) and mean and std:
        close = all(abs(a - b) < 1e-3 for a, b in zip([*mean, *std], _IMAGENET_MEAN + _IMAGENET_STD, strict=False))
        steps.append("ImageNet mean/std" if close and len(mean) == 3 else f"mean {mean}, std {std}")
    kind = processor.get("image_processor_type")
    return (f"`{kind}`: " if kind else "") + (", ".join(steps) or "as configured")


def _input_size(run: TrainingOutput, processor: dict[str, Any]) -> int | None:
    """The resolution the exported processor feeds the model (its crop or its resize), else the config's."""
    for key in ("crop_size", "size") if processor.get("do_center_crop") else ("size",):
        size = processor.get(key)
        if isinstance(size, dict) and (size.get("height") or size.get("shortest_edge")):
            return int(size.get("height") or size.get("shortest_edge"))
    size = run.backbone_config.get("image_size")
    return int(size[0] if isinstance(size, list) else size) if size else None


def _architecture_rows(run: TrainingOutput, family: dict[str, Any], processor: dict[str, Any]) -> list[tuple[str, str]]:
    config = run.backbone_config
    rows = []
    preset_row = _preset_row(run)
    if preset_row is not None:
        rows.append(preset_row)
    backbone = _backbone_row(config, family["family_name"])
    if backbone is not None:
        rows.append(("Backbone", backbone))
    rows.append(("Class", f"`{family['model_class']}` (model type `{config.get('model_type')}`)"))
    processor_text = _processor_text(processor)
    if processor_text is not None:
        rows.append(("Input (processor)", processor_text))
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
    """DINOv2's terms and a frozen teacher's distillation when the run used them (``None`` for DINO alone,
    whose card is unchanged)."""
    ibot, koleo = head.get("ibot_loss_weight") or 0, head.get("koleo_loss_weight") or 0
    distils = head.get("distillation_embedding_size") is not None
    if not ibot and not koleo and not distils:
        return None
    dino = head.get("dino_loss_weight", 1)
    terms = [] if dino == 0 else ["DINO" if dino == 1 else f"DINO (weight {_format_number(dino)})"]
    if distils:
        weights = [f"{name} {_format_number(head.get(f'distillation_{name}_weight') or 0)}"
                   for name in ("cosine", "soft", "dense") if head.get(f"distillation_{name}_weight")]
        terms.append(f"distillation of a frozen teacher of width {head['distillation_embedding_size']} "
                     f"({', '.join(weights)}; the projectors are not part of this backbone)")
    if ibot:
        own = head.get("ibot_separate_head")
        prototypes = head.get("ibot_num_prototypes") or head.get("num_prototypes")
        terms.append(f"iBOT masked patches (weight {_format_number(ibot)}, "
                     + (f"own head, K {_format_number(prototypes)})" if own else "shared head)"))
    if koleo:
        terms.append(f"KoLeo (weight {_format_number(koleo)})")
    centering = f", teachers: {head.get('teacher_centering', 'centering').replace('_', '-')}" if dino or ibot else ""
    return " + ".join(terms) + centering


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
        add("Initialised from", _start_text(args, _base_model(args)))
    if args.get("distillation_teacher"):
        teacher = args["distillation_teacher"]
        digest = args.get(TEACHER_HASH_KEY)
        add("Distilled from", f"`{teacher if _looks_like_hub_id(teacher) else _local_name(teacher)}` (frozen"
            + (f"; weights SHA-256 `{digest[:16]}`" if digest else "") + ")")
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
    # a run of dino_hf < 0.2 recorded the per-256 value as learning_rate (no base_learning_rate key)
    base = args["base_learning_rate"] if "base_learning_rate" in args else args.get("learning_rate")
    absolute = args.get("learning_rate") if "base_learning_rate" in args else None
    peak = args.get("scaled_learning_rate")
    if base is not None or absolute is not None:
        if absolute is not None:
            text = f"{_format_number(absolute)} (absolute, `--learning_rate`)"
        else:
            text = f"{_format_number(base)} per 256 images"
            if peak is not None:
                text += f" (peak {_format_number(peak)} for the global batch)"
        if args.get("min_learning_rate") is not None:
            text += f", cosine to {_format_number(args['min_learning_rate'])}"
        warmup = steps_or_epochs("warmup_steps", "warmup_epochs")
        if warmup:
            text += f", {warmup} of linear warm-up"
        optimizer = {"adamw": "AdamW", "sgd": "SGD", "lars": "LARS"}.get(args.get("optimizer") or "adamw", args.get("optimizer"))
        add(f"Learning rate ({optimizer})", text)
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
    add("Mixed precision", _precision_text(args))
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


def _precision_text(args: dict[str, Any]) -> str | None:
    """The precision the run trained in (``resolved_mixed_precision``), and how it was chosen."""
    requested, resolved = args.get("mixed_precision"), args.get("resolved_mixed_precision")
    names = {"no": "fp32 (no autocast)", "bf16": "bf16 autocast", "fp16": "fp16 autocast with loss scaling"}
    if resolved:
        text = names.get(str(resolved), str(resolved))
        return text + (", chosen for the machine by `--mixed_precision auto`" if requested == "auto" else "")
    if requested and requested != "auto":
        return names.get(str(requested), str(requested))
    return None  # "auto" without what it chose: better unstated than "auto"


_HUB_CACHE_FOLDER = re.compile(r"(?:^|[/\\])models--([\w.-]+?)--([\w.-]+)(?:[/\\]|$)")


def _base_model(args: dict[str, Any], depth: int = 0) -> str | None:
    """The Hub model a run started from: ``--model_name_or_path`` when it is a Hub id, else the Hub id a local
    start records: a folder of the Hub cache (``models--org--name/snapshots/...``), a ``base_model`` the run
    recorded, a config's ``_name_or_path``, or, for a dino_hf run or export, what that run started from."""
    started = args.get("model_name_or_path")
    if _looks_like_hub_id(args.get("base_model")):
        return args["base_model"]
    if not isinstance(started, str) or not started:
        return None
    if _looks_like_hub_id(started):
        return started
    match = _HUB_CACHE_FOLDER.search(started)
    if match:
        return f"{match.group(1)}/{match.group(2)}"
    folder = Path(started).expanduser()
    if depth > 3 or not folder.is_dir():
        return None
    try:
        recorded = read_json(folder / CONFIG_NAME).get("_name_or_path")
        if _looks_like_hub_id(recorded):
            return recorded
        for run_folder in (folder, folder.parent):  # a run's --output_dir, or its backbone/ folder
            if (run_folder / TRAINING_ARGS_NAME).is_file():
                earlier = read_json(run_folder / TRAINING_ARGS_NAME)
                if earlier.get("push_to_hub") and _looks_like_hub_id(earlier.get("hub_model_id")):
                    return earlier["hub_model_id"]  # that run is on the Hub: the start is its repository
                return _base_model(earlier, depth + 1)
    except ValueError:  # an unreadable JSON file in the folder: nothing recorded
        return None
    return None


def _start_text(args: dict[str, Any], base_model: str | None) -> str | None:
    """What the run started from, in Markdown: the Hub model (itself, or its download in the Hub cache), or
    the local folder's name and the Hub model it came from."""
    started = args.get("model_name_or_path")
    if not started:
        return None
    if base_model and (base_model == started or _HUB_CACHE_FOLDER.search(str(started))):
        return f"`{base_model}`"
    return f"`{_local_name(started)}`" + (f" (which came from `{base_model}`)" if base_model else "")


def _family(run: TrainingOutput, repo_id: str, input_size: int | None) -> dict[str, Any]:
    """What the card says of the backbone's family, and its code (``repo_id`` in the calls)."""
    from dino_hf.models.backbones import SUPPORTED_MODEL_TYPES, family_of

    model_type = run.backbone_config.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(f"{run.backbone_dir} holds a {model_type!r} model, not a backbone of a family dino_hf trains "
                         f"({', '.join(SUPPORTED_MODEL_TYPES)}).")
    usage = family_of(model_type).usage(run.backbone_config)
    if usage.from_pretrained_kwargs:
        note = (f"this export has no pooler, so pass {_call_arguments(usage.from_pretrained_kwargs)} and no random "
                "one is created")
    else:
        note = "plain `AutoModel.from_pretrained` loads it with nothing missing or random"
    pooler_note = None
    if usage.model_type in ("vit", "deit"):
        pooler_note = (f"`{usage.model_class}`'s pooler is not part of DINO: this export's is the identity, so that "
                       "`pooler_output` is the CLS token" if not usage.from_pretrained_kwargs else
                       f"`{usage.model_class}`'s pooler is not part of DINO: it is randomly initialised unless "
                       "`add_pooling_layer=False` is passed, and `pipeline(..., pool=True)` would return it")
    return {
        "family_name": usage.name,
        "family_article": "An" if usage.name[0] in "AEIOU" else "A",
        "model_class": usage.model_class,
        "embedding_text": usage.embedding,
        "embedding_notes": usage.embedding_notes,
        "load_snippet": usage.load_snippet(repo_id),
        "pipeline_snippet": usage.pipeline_snippet(repo_id),
        "attention_snippet": usage.attention_snippet(repo_id),
        "usage_note": note,
        "resolution_text": usage.resolution(input_size),
        "pooler_note": pooler_note,
    }


def _call_arguments(kwargs: dict[str, Any]) -> str:
    return ", ".join(f"`{key}={value!r}`" for key, value in kwargs.items())


def _reproduce_command(run: TrainingOutput, evaluation: dict[str, Any], repo_id: str) -> str | None:
    """The ``dino-hf-eval`` command that measures the recorded k-NN figure again (same data, splits, subset)."""
    args = run.training_args
    dataset = evaluation["dataset"]
    ks = sorted({int(m.key.rsplit("_k", 1)[1]) for m in evaluation["metrics"]
                 if m.subject == "this model" and re.search(r"knn.*_k\d+$", m.key)})
    if not dataset or not ks:
        return None
    parts = ["dino-hf-eval", f"--model_name_or_path {repo_id}", f"--dataset_name {_local_name(dataset)}"]
    if evaluation["train_split"]:
        parts.append(f"--train_split {evaluation['train_split']}")
    if evaluation["test_split"]:
        parts.append(f"--eval_split {evaluation['test_split']}")
    parts.append("--k " + " ".join(map(str, ks)))
    if not evaluation["origin"].startswith(EVAL_RESULTS_NAME) or run.eval_results.get("eval_dataset_name"):
        # the in-training monitor's protocol: its subset, seed, columns and streaming
        if args.get("eval_max_samples"):
            parts.append(f"--max_train_samples {args['eval_max_samples']} --max_eval_samples {args['eval_max_samples']}")
            if args.get("seed"):
                parts.append(f"--seed {args['seed']}")
            if args.get("streaming") and _looks_like_hub_id(dataset):
                parts.append("--streaming")
        for flag in ("image_column", "label_column"):
            if args.get(flag) and not (flag == "label_column" and args[flag] == "label"):
                parts.append(f"--{flag} {args[flag]}")
    return " ".join(parts)


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
    run = read_training_output(model_dir, include_training_model=include_training_model,
                               backbone_dir=backbone_dir or bare_backbone_dir(model_dir))
    return render_card(run, repo_id, license=license, template_path=template_path)


def bare_backbone_dir(folder: str | Path) -> Path | None:
    """``folder`` itself when it is an exported backbone of any family on its own (a ``config.json`` of a
    backbone, no ``backbone/`` folder), else ``None`` (a run folder, or what
    :func:`~dino_hf.base.run_folder.read_training_output` explains)."""
    folder = Path(folder)
    if (folder / "backbone").is_dir() or not (folder / CONFIG_NAME).is_file():
        return None
    try:
        model_type = read_json(folder / CONFIG_NAME).get("model_type")
    except ValueError:
        return None
    return folder if model_type and model_type != "dino_hf" else None


def render_card(
    run: TrainingOutput,
    repo_id: str,
    *,
    license: str | None = None,
    template_path: str | Path | None = None,
) -> ModelCard:
    """The card of ``run`` (:func:`dino_hf.base.run_folder.read_training_output`) for ``repo_id`` (in its code)."""
    args = run.training_args
    evaluation = _evaluation(run)
    model_name = repo_id.rstrip("/").split("/")[-1]
    if not _looks_like_hub_id(repo_id):  # a card for a local folder (write_run_cards): the run's name
        model_name = run.model_dir.resolve().name
    dataset = args.get("dataset_name")
    base_model = _base_model(args)
    started_from = _start_text(args, base_model)
    datasets = [dataset] if _looks_like_hub_id(dataset) else []  # training data only
    dataset_is_hub = _looks_like_hub_id(dataset)
    dataset = _local_name(dataset)
    eval_results = _eval_results_metadata(evaluation)
    processor = read_json(run.backbone_dir / PROCESSOR_CONFIG_NAME)
    family = _family(run, repo_id, _input_size(run, processor))

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
    uses_dinov2_terms = bool(run.dino_config.get("ibot_loss_weight") or run.dino_config.get("koleo_loss_weight"))
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
            objective_extra=" with DINOv2's iBOT and KoLeo terms (Oquab et al., 2023)" if uses_dinov2_terms else None,
            architecture_rows=_architecture_rows(run, family, processor),
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
            reproduce_command=_reproduce_command(run, evaluation, repo_id),
            has_training_model=f"{TRAINING_MODEL_SUBFOLDER}/config.json" in run.files,
            training_model_subfolder=TRAINING_MODEL_SUBFOLDER,
            has_curves=TRAINING_CURVES_NAME in run.files,
            **family,
        )
    return card


#: The name of the card file in a run folder and in its exported backbone.
CARD_NAME = "README.md"


def write_run_cards(
    output_dir: str | Path,
    repo_id: str | None = None,
    *,
    license: str | None = None,
    backbone_dir: str | Path | None = None,
    include_training_model: bool = False,
) -> list[Path]:
    """Write the model card of a finished run into its folder: ``output_dir/backbone/README.md`` and
    ``output_dir/README.md`` (the same card), from the run's files as they are now.

    Call it after each export (the backbone, ``training_args.json`` and ``eval_results.json`` written);
    it reads nothing else and changes no other file. Its code loads ``repo_id``: default the run's
    ``--hub_model_id`` when it pushes, else the exported backbone folder's path (as the run's files
    write paths: relative to where the run started).

    Args:
        output_dir: a run's ``--output_dir`` (or an exported backbone folder: its ``README.md`` only).
        repo_id: the repository or folder the card's code loads.
        license: license id for the metadata (default ``apache-2.0``).
        backbone_dir: the backbone folder the card describes instead of ``output_dir/backbone``.
        include_training_model: the card says the repository also holds the full DinoForPreTraining
            (``dino-hf-push --include_training_model``).
    Returns:
        The files written.
    Raises:
        FileNotFoundError / ValueError: as :func:`dino_hf.base.run_folder.read_training_output` (no
            exported backbone yet, unreadable JSON).
    """
    run = read_training_output(output_dir, include_training_model=include_training_model,
                               backbone_dir=backbone_dir or bare_backbone_dir(output_dir))
    if repo_id is None:
        hub_id = run.training_args.get("hub_model_id")
        pushes = run.training_args.get("push_to_hub") and _looks_like_hub_id(hub_id)
        repo_id = hub_id if pushes else portable_path(str(run.backbone_dir.resolve()))
    text = str(render_card(run, repo_id, license=license))
    written = []
    for folder in dict.fromkeys([run.backbone_dir, run.model_dir]):
        path = folder / CARD_NAME
        temporary = path.with_name(f".{CARD_NAME}.tmp")
        temporary.write_text(text, encoding="utf-8")
        temporary.replace(path)  # a reader never sees half a card
        written.append(path)
    return written

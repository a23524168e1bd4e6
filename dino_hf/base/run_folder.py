"""The layout of a training run's output folder, its readers, and the scrubbing of secrets.

``scripts/train.py --output_dir DIR`` leaves::

    DIR/
      checkpoints/step_N/    complete, resumable checkpoints (layout: dino_hf.train.checkpointing)
      metrics.jsonl          one JSON row per logging step, plus k-NN rows at evaluation steps
      training_args.json     the resolved arguments and facts of the run (replayable with --config)
      config.json, model.safetensors   the full DinoForPreTraining (student, teacher, heads, center)
      backbone/              the exported teacher: config.json, model.safetensors, preprocessor_config.json
      eval_results.json      the final evaluation, when an evaluation set was given
      training_curves.png    loss, accuracy, entropies and learning rate against steps
      attention/step_N/      the teacher's attention on a few fixed evaluation images
      initial_model/         the model object a Python caller started from (DinoTrainer(model=...)), saved
      .dino_hf.lock          the run lock (dino_hf.train.checkpointing.RunLock): host, pid and start of its holder

This module is the one place that names those files (:class:`RunFolder`) and reads them back
(:func:`read_json`, :func:`read_metrics`, :func:`read_training_output`); the trainer writes through
the same names, the model card and the push read through them. It does not import torch.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

__all__ = [
    "RunFolder",
    "TrainingOutput",
    "portable_path",
    "portable_paths",
    "read_json",
    "read_metrics",
    "read_training_output",
    "safetensors_parameter_count",
    "scrub_secrets",
    "strip_secret_fields",
    "weight_files",
]

CHECKPOINTS_DIRNAME = "checkpoints"
METRICS_NAME = "metrics.jsonl"
TRAINING_ARGS_NAME = "training_args.json"
BACKBONE_DIRNAME = "backbone"
EVAL_RESULTS_NAME = "eval_results.json"
TRAINING_CURVES_NAME = "training_curves.png"
ATTENTION_DIRNAME = "attention"
INITIAL_MODEL_DIRNAME = "initial_model"
DISTILLATION_TEACHER_DIRNAME = "distillation_teacher"
LOCK_NAME = ".dino_hf.lock"
CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
SHARD_INDEX_NAME = "model.safetensors.index.json"
PROCESSOR_CONFIG_NAME = "preprocessor_config.json"
#: The key of ``training_args.json`` that identifies a distillation run's frozen teacher (its weights' SHA-256).
TEACHER_HASH_KEY = "distillation_teacher_sha256"
#: ``model_type`` of a DinoForPreTraining's ``config.json`` (``DinoConfig.model_type``); any other is a backbone's.
DINO_MODEL_TYPE = "dino_hf"
#: Next to a DinoForPreTraining imported from an official DINO ``checkpoint.pth``: how far that run had
#: come (``{"epoch": E}``), so that a run started from the folder continues its schedules at epoch E.
PRETRAINING_PROGRESS_NAME = "pretraining_progress.json"

# A checkpoint folder (checkpoints/step_N/; its contents: dino_hf.train.checkpointing). WEIGHTS_NAME is
# also accelerate's name for the first prepared model's weights (SAFE_MODEL_NAME + ".safetensors").
CHECKPOINT_PREFIX = "step_"
TEMPORARY_PREFIX = ".tmp-"
#: Folders on their way out (pruned checkpoints, an overwritten run's checkpoints): never resumed from.
DISCARDED_PREFIX = ".deleting-"
COMPLETE_MARKER = "checkpoint_complete.json"
TRAINING_STATE_NAME = "training_state.json"


def process_state_name(process_index: int) -> str:
    """The file of one process's stream position and RNG state in a checkpoint."""
    return f"process_state_{process_index}.pt"

#: Files of a run that are shared next to the backbone when they exist.
RUN_RECORD_NAMES = (TRAINING_ARGS_NAME, EVAL_RESULTS_NAME, METRICS_NAME, TRAINING_CURVES_NAME)

#: Keys that ``training_args.json`` adds to the arguments (facts of the run, not settings); a
#: config file may contain them (so that a run's ``training_args.json`` can be replayed) and they
#: are ignored, as is its ``config`` entry.
RUN_FACT_KEYS = (
    "num_processes",
    "global_batch_size",
    "scaled_learning_rate",
    TEACHER_HASH_KEY,
    "steps_per_epoch",
    "planned_total_steps",
    "calibrated_seconds_per_step",
    "calibrated_evaluation_seconds",
    "calibration_steps",
    "calibration_seconds",
    "replans",
    "replanned_seconds_per_step",
    "hardware",
    "train_runtime",
    "resolved_mixed_precision",
    "resolved_dataloader_num_workers",
    "resolved_torch_num_threads",
    "machine_device",
    "machine_cpu",
    "machine_cpu_bf16_speedup",
    "train_data",
    "eval_data",
)


class RunFolder:
    """Paths of one run's output folder (nothing is created or read by building it)."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)

    @property
    def initial_model(self) -> Path:
        """Where ``DinoTrainer`` saves a model object it was given, to start (and resume) from it."""
        return self.root / INITIAL_MODEL_DIRNAME

    @property
    def distillation_teacher(self) -> Path:
        """Where ``DinoTrainer`` saves a distillation teacher object it was given (the run reads it from there)."""
        return self.root / DISTILLATION_TEACHER_DIRNAME

    @property
    def checkpoints(self) -> Path:
        return self.root / CHECKPOINTS_DIRNAME

    @property
    def metrics(self) -> Path:
        return self.root / METRICS_NAME

    @property
    def training_args(self) -> Path:
        return self.root / TRAINING_ARGS_NAME

    @property
    def backbone(self) -> Path:
        return self.root / BACKBONE_DIRNAME

    @property
    def eval_results(self) -> Path:
        return self.root / EVAL_RESULTS_NAME

    @property
    def training_curves(self) -> Path:
        return self.root / TRAINING_CURVES_NAME

    @property
    def lock(self) -> Path:
        return self.root / LOCK_NAME

    @property
    def model_config(self) -> Path:
        return self.root / CONFIG_NAME

    def attention(self, step: int) -> Path:
        """Folder of the attention maps drawn at optimiser step ``step``."""
        return self.root / ATTENTION_DIRNAME / f"step_{step}"


# --------------------------------------------------------------------------------------------------
# Readers
# --------------------------------------------------------------------------------------------------
def read_json(path: Path) -> dict[str, Any]:
    """A JSON object file as a dict; ``{}`` when the file does not exist (or holds no object).

    Raises:
        ValueError: the file exists but is not valid JSON (the message names it).
    """
    if not path.is_file():
        return {}
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"{path} is not valid JSON ({error}).") from None
    return value if isinstance(value, dict) else {}


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """Rows of a ``metrics.jsonl`` (one JSON object per line), ``[]`` when it does not exist.

    Blank lines are skipped, and so are unreadable ones (a line cut short by a killed run), with one
    log line saying how many.
    """
    path = Path(path)
    if not path.is_file():
        return []
    rows, unreadable = [], 0
    for line in path.read_text(encoding="utf-8").splitlines():
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            unreadable += 1
            continue
        if isinstance(row, dict):
            rows.append(row)
    if unreadable:
        logger.info("Skipped %d unreadable line(s) of %s (a run killed while writing).", unreadable, path)
    return rows


def weight_files(folder: Path) -> list[Path]:
    """The safetensors weights of a ``save_pretrained`` folder (one file, or the index and its shards)."""
    if (folder / WEIGHTS_NAME).is_file():
        return [folder / WEIGHTS_NAME]
    index = folder / SHARD_INDEX_NAME
    if index.is_file():
        shards = sorted(set(read_json(index).get("weight_map", {}).values()))
        return [index, *(folder / shard for shard in shards)]
    return []


def safetensors_parameter_count(paths: list[Path]) -> int | None:
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


@dataclass(frozen=True)
class TrainingOutput:
    """What a training output folder holds, as far as sharing it is concerned.

    Attributes:
        model_dir: the folder given by the user.
        backbone_dir: the exported backbone folder (``model_dir/backbone``, or ``model_dir`` itself
            when it is a bare exported backbone).
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


#: Where ``include_training_model=True`` puts the full DinoForPreTraining inside a Hub repository.
TRAINING_MODEL_SUBFOLDER = "training_model"


def read_training_output(model_dir: str | Path, *, include_training_model: bool = False,
                         backbone_dir: str | Path | None = None) -> TrainingOutput:
    """Find what to share in a training output folder (or in a bare exported backbone folder).

    ``backbone_dir`` replaces the run's ``backbone/`` (e.g. the student exported from a
    ``DinoForPreTraining`` folder into a temporary folder).

    Raises:
        FileNotFoundError: no backbone or a missing file; the message says what to pass.
        ValueError: weights that are not safetensors, or unreadable JSON.
    """
    folder = RunFolder(model_dir)
    model_dir = folder.root
    if not model_dir.is_dir():
        raise FileNotFoundError(
            f"--output_dir {model_dir} is not a directory; pass the --output_dir of a dino_hf training run."
        )
    backbone_dir = Path(backbone_dir) if backbone_dir is not None else folder.backbone
    if not backbone_dir.is_dir():
        model_type = read_json(folder.model_config).get("model_type")
        if model_type and model_type != DINO_MODEL_TYPE:
            # an exported backbone of any family on its own (e.g. a converted official checkpoint)
            backbone_dir = model_dir
        else:
            raise FileNotFoundError(
                f"{model_dir} has no {BACKBONE_DIRNAME}/ folder; pass the --output_dir of a finished dino_hf "
                "training run, a DinoForPreTraining folder or a folder written by DinoForPreTraining.save_backbone."
            )
    for name in (CONFIG_NAME, PROCESSOR_CONFIG_NAME):
        if not (backbone_dir / name).is_file():
            raise FileNotFoundError(
                f"{backbone_dir / name} is missing; re-export the backbone with DinoForPreTraining.save_backbone."
            )
    weights = weight_files(backbone_dir)
    if not weights:
        raise ValueError(
            f"{backbone_dir} has no {WEIGHTS_NAME}; only safetensors weights are pushed "
            "(re-save the backbone with save_pretrained(safe_serialization=True))."
        )

    files: dict[str, Path] = {name: backbone_dir / name for name in (CONFIG_NAME, PROCESSOR_CONFIG_NAME)}
    files.update({path.name: path for path in weights})
    for name in RUN_RECORD_NAMES:
        if (model_dir / name).is_file():
            files[name] = model_dir / name
    if include_training_model:
        training_weights = weight_files(model_dir)
        if backbone_dir == model_dir or not folder.model_config.is_file() or not training_weights:
            raise FileNotFoundError(
                f"{model_dir} holds no full DinoForPreTraining ({CONFIG_NAME} + {WEIGHTS_NAME}); "
                "drop --include_training_model or pass the training --output_dir."
            )
        files[f"{TRAINING_MODEL_SUBFOLDER}/{CONFIG_NAME}"] = folder.model_config
        files.update({f"{TRAINING_MODEL_SUBFOLDER}/{path.name}": path for path in training_weights})

    return TrainingOutput(
        model_dir=model_dir,
        backbone_dir=backbone_dir,
        files=files,
        training_args=strip_secret_fields(read_json(folder.training_args), None),
        eval_results=read_json(folder.eval_results),
        metrics=read_metrics(folder.metrics),
        backbone_config=read_json(backbone_dir / CONFIG_NAME),
        dino_config=read_json(folder.model_config) if backbone_dir != model_dir else {},
    )


# --------------------------------------------------------------------------------------------------
# Paths in the files a run writes
# --------------------------------------------------------------------------------------------------
def portable_path(path: str) -> str:
    """An absolute path as a relative one: relative to the working directory when it lies below it,
    else ``~/...`` below the home folder, else relative to the working directory with ``..``.

    The files of a run (``training_args.json``, ``eval_results.json``, the card) are shared; an absolute
    path names the training machine's layout (and often its user), and a path relative to where the
    run was started still replays with ``--config training_args.json`` from there.
    """
    if not os.path.isabs(path):
        return path
    try:
        relative = os.path.relpath(path, os.getcwd())
    except ValueError:  # another drive (Windows): no relative form exists
        return Path(path).name
    home = os.path.expanduser("~")
    if relative.startswith("..") and home not in ("", "/") and path.startswith(home.rstrip(os.sep) + os.sep):
        return "~/" + os.path.relpath(path, home)
    return relative


def portable_paths(value: Any) -> Any:
    """Copy of a JSON value with every absolute path string made :func:`portable_path`."""
    if isinstance(value, dict):
        return {key: portable_paths(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [portable_paths(item) for item in value]
    if isinstance(value, str) and os.path.isabs(value):
        return portable_path(value)
    return value


# --------------------------------------------------------------------------------------------------
# Secrets
# --------------------------------------------------------------------------------------------------
_SECRET_KEY_PATTERN = re.compile(r"token|password|secret|api_key|apikey|credential", re.IGNORECASE)
_HF_TOKEN_PATTERN = re.compile(r"\bhf_[A-Za-z0-9]{16,}\b")


def scrub_secrets(text: str, token: str | None = None) -> str:
    """Replace ``token`` and anything shaped like a Hugging Face token (``hf_...``) by ``***``."""
    if token:
        text = text.replace(token, "***")
    return _HF_TOKEN_PATTERN.sub("hf_***", text)


def strip_secret_fields(value: Any, token: str | None) -> Any:
    """Copy of a JSON value without keys that name a secret and without the token in any string."""
    if isinstance(value, dict):
        return {
            key: strip_secret_fields(item, token)
            for key, item in value.items()
            if not _SECRET_KEY_PATTERN.search(str(key))
        }
    if isinstance(value, list):
        return [strip_secret_fields(item, token) for item in value]
    if isinstance(value, str):
        return scrub_secrets(value, token)
    return value

"""``DinoTrainer``: DINO pre-training from Python and notebooks, in the shape of HF's ``Trainer``.

    from dino_hf import DinoTrainer, DinoTrainingArguments

    args = DinoTrainingArguments.from_recipe("fashion_mnist_cpu", output_dir="runs/demo", max_train_minutes=3)
    trainer = DinoTrainer(args=args, train_dataset=dataset["train"], eval_dataset=dataset)
    result = trainer.train()            # checkpoints, evaluation, export as the command line does
    trainer.evaluate()                  # {"knn_top1_k20": ...}
    trainer.embed(dataset["test"], "runs/demo/embeddings")

``dino-hf-train`` is this class behind a parser: one code path. What the trainer is given:

- ``model``: ``None`` (built from ``args``), a Hub id or folder (as ``--model_name_or_path``), a
  ``DinoForPreTraining`` or a backbone ``PreTrainedModel`` of any supported family. An object is saved
  to the run's ``initial_model/`` folder first and trained from there, exactly as that folder given to
  ``--model_name_or_path`` would be (a backbone continues pre-training with fresh heads), so that a
  resumed run, the records and the card all see a path;
- ``train_dataset`` / ``eval_dataset``: anything :func:`dino_hf.data.sources.open_image_source` opens
  (a name, a ``save_to_disk`` folder, a ``datasets`` object, a torch dataset); by default
  ``args.dataset_name`` / ``args.eval_dataset_name``. The evaluation set needs both of its splits
  (``args.eval_train_split`` as the k-NN memory, ``args.eval_split`` classified);
- ``callbacks``: ``transformers.TrainerCallback`` instances (:mod:`dino_hf.train.callbacks`);
- ``teacher``: a frozen foundation model to distil (as ``--distillation_teacher``): a Hub id or folder, or a
  backbone ``PreTrainedModel`` / ``DinoForPreTraining`` object, saved to the run's ``distillation_teacher/``
  folder first (with its ``image_processor`` attribute, if any) so that the run records and checks one path.

``train()`` leaves the process as it found it: the root logger, the library loggers' levels, Python
warnings, the ``datasets`` / ``transformers`` / ``huggingface_hub`` progress bars and torch's thread
count are restored when it returns or raises.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedModel, TrainerCallback

from dino_hf.base.progress import output_restored
from dino_hf.base.run_folder import RunFolder
from dino_hf.data.sources import describe_image_source, open_image_source
from dino_hf.data.streaming import detect_image_column
from dino_hf.eval.embedding import EmbeddingExport, export_embeddings
from dino_hf.eval.loading import load_image_processor
from dino_hf.hub.push import push_training_output
from dino_hf.models.backbones import SUPPORTED_MODEL_TYPES
from dino_hf.models.modeling_dino import DinoForPreTraining
from dino_hf.train.arguments import DinoTrainingArguments
from dino_hf.train.builders import build_knn_monitor
from dino_hf.train.loop import TrainingInputs, TrainingResult, train

__all__ = ["DinoTrainer"]


class DinoTrainer:
    """Train, evaluate, save, push and embed with DINO (see the module docstring).

    Args:
        model: ``None``, a Hub id or folder, a ``DinoForPreTraining`` or a backbone ``PreTrainedModel``.
        args: the run's :class:`DinoTrainingArguments` (required).
        train_dataset: the training images (default ``args.dataset_name``).
        eval_dataset: a labelled set with both evaluation splits (default ``args.eval_dataset_name``).
        callbacks: ``transformers.TrainerCallback`` instances called by the loop.
        teacher: a frozen model to distil (``args.distillation_teacher`` by default).

    Raises:
        ValueError: no ``args``, or a ``model`` of another kind (one sentence).
    """

    def __init__(
        self,
        model: str | os.PathLike | PreTrainedModel | None = None,
        args: DinoTrainingArguments | None = None,
        train_dataset: Any = None,
        eval_dataset: Any = None,
        callbacks: Iterable[TrainerCallback] | None = None,
        teacher: str | os.PathLike | PreTrainedModel | None = None,
    ) -> None:
        if not isinstance(args, DinoTrainingArguments):
            raise ValueError("DinoTrainer needs args=DinoTrainingArguments(...) (e.g. "
                             "DinoTrainingArguments.from_recipe('fashion_mnist_cpu', output_dir=...)).")
        if model is not None and not isinstance(model, (str, os.PathLike, PreTrainedModel)):
            raise ValueError(f"model must be None, a Hub id or folder, a DinoForPreTraining or a backbone "
                             f"PreTrainedModel, not {type(model).__name__}.")
        if isinstance(model, PreTrainedModel) and not isinstance(model, DinoForPreTraining):
            model_type = getattr(model.config, "model_type", None)
            if model_type not in SUPPORTED_MODEL_TYPES:
                raise ValueError(f"model is a {type(model).__name__} ({model_type!r}), not a backbone family dino_hf "
                                 f"trains: {', '.join(SUPPORTED_MODEL_TYPES)}.")
        if teacher is not None and not isinstance(teacher, (str, os.PathLike, PreTrainedModel)):
            raise ValueError(f"teacher must be a Hub id or folder or a PreTrainedModel, not {type(teacher).__name__}.")
        self.teacher = teacher
        self.args = args
        self.model = model
        self.train_dataset = train_dataset
        self.eval_dataset = eval_dataset
        self.callbacks = list(callbacks or ())
        self.result: TrainingResult | None = None

    # ------------------------------------------------------------------ training
    def train(self, resume_from_checkpoint: str | os.PathLike | None = None) -> TrainingResult:
        """Train as ``args`` say, from ``resume_from_checkpoint`` (``"latest"``, a checkpoint folder) when
        given, else as ``args.resume_from_checkpoint``; returns when done, stopped by a callback or
        after a signal-triggered checkpoint. Errors as :func:`dino_hf.train.loop.train`."""
        args = self.args
        if resume_from_checkpoint is not None:
            args = dataclasses.replace(args, resume_from_checkpoint=os.fspath(resume_from_checkpoint))
        # the objects replace the names (a recipe's dataset_name would otherwise be recorded as the data)
        if self.train_dataset is not None:
            args = dataclasses.replace(args, dataset_name=None)
        if self.eval_dataset is not None:
            args = dataclasses.replace(args, eval_dataset_name=None)
        threads = torch.get_num_threads()
        try:
            with output_restored():
                args = self._start_from_model(args)
                args = self._with_teacher(args)
                inputs = TrainingInputs(train_dataset=self.train_dataset, eval_dataset=self.eval_dataset,
                                        callbacks=tuple(self.callbacks))
                self.result = train(args, inputs=inputs)
        finally:
            torch.set_num_threads(threads)
        self.model = self.result.model
        return self.result

    @property
    def state(self) -> Any:
        """transformers' ``TrainerState`` of the last ``train()`` (``log_history``...), else ``None``."""
        return None if self.result is None else self.result.state

    def _start_from_model(self, args: DinoTrainingArguments) -> DinoTrainingArguments:
        """``args`` with ``model_name_or_path`` set from ``self.model`` (an object is saved first)."""
        return _named_in_args(args, "model_name_or_path", self.model, RunFolder(args.output_dir).initial_model)

    def _with_teacher(self, args: DinoTrainingArguments) -> DinoTrainingArguments:
        """``args`` with ``distillation_teacher`` set from ``self.teacher`` (an object is saved first)."""
        return _named_in_args(args, "distillation_teacher", self.teacher, RunFolder(args.output_dir).distillation_teacher)

    # ------------------------------------------------------------------ after training
    def trained_model(self) -> DinoForPreTraining:
        """The ``DinoForPreTraining`` of the last ``train()``, else the one in ``args.output_dir``."""
        if isinstance(self.model, DinoForPreTraining):
            return self.model
        folder = RunFolder(self.args.output_dir)
        if not folder.model_config.is_file():
            raise ValueError(f"{folder.root} holds no trained model yet: call train() first.")
        return DinoForPreTraining.from_pretrained(folder.root)

    def evaluate(self, eval_dataset: Any = None) -> dict[str, float]:
        """The weighted k-NN (and, with ``args.eval_linear_probe``, linear probe) accuracy of the
        teacher on ``eval_dataset`` (default: the trainer's, else ``args.eval_dataset_name``)."""
        model = self.trained_model()
        source = eval_dataset if eval_dataset is not None else self.eval_dataset
        with output_restored():
            monitor = build_knn_monitor(self.args, image_processor=model.config.backbone_image_processor,
                                        dataset=source)
            if monitor is None:
                raise ValueError("evaluate() needs a labelled evaluation set: pass eval_dataset= (with both splits) "
                                 "or set args.eval_dataset_name.")
            return monitor.evaluate(model.teacher.backbone)

    def save_model(self, output_dir: str | os.PathLike | None = None) -> Path:
        """Write the ``DinoForPreTraining`` to ``output_dir`` (default ``args.output_dir``) and its teacher
        as a stock backbone folder in ``output_dir/backbone``; returns ``output_dir``."""
        folder = RunFolder(self.args.output_dir if output_dir is None else output_dir)
        model = self.trained_model()
        model.save_pretrained(folder.root)
        model.save_backbone(folder.backbone, image_size=self.args.global_crop_size)
        return folder.root

    def push_to_hub(self, repo_id: str | None = None, *, private: bool | None = None,
                    commit_message: str | None = None, token: str | None = None) -> str:
        """Push the run folder (backbone, card, arguments, evaluation) to ``repo_id`` (default
        ``args.hub_model_id``); returns the commit URL. The token is never printed or pushed."""
        repo_id = repo_id or self.args.hub_model_id
        if not repo_id:
            raise ValueError("push_to_hub() needs a repo_id (or args.hub_model_id), e.g. 'you/dino-vits16'.")
        return push_training_output(self.args.output_dir, repo_id,
                                    private=self.args.hub_private_repo if private is None else private,
                                    commit_message=commit_message, token=token)

    def embed(self, dataset: Any, output_dir: str | os.PathLike, *, split: str = "train",
              image_column: str | None = None, id_column: str | None = None, batch_size: int = 64,
              l2_normalize: bool = False, overwrite: bool = False) -> EmbeddingExport:
        """The teacher's embedding of every image of ``dataset`` (any kind ``train_dataset`` takes) as
        ``datasets`` parquet shards in ``output_dir`` (resumable; read back with
        ``datasets.load_dataset(output_dir, split=split)``)."""
        model = self.trained_model()
        opened = open_image_source(dataset, split, streaming=False, flag="dataset")
        column = detect_image_column(opened.dataset, image_column, opened.description)
        backbone = model.teacher.backbone.eval()
        exported = RunFolder(self.args.output_dir).backbone
        processor = load_image_processor(exported if exported.is_dir() else None, backbone.config,
                                         image_processor=model.config.backbone_image_processor)
        settings = {"model": str(self.args.output_dir), "which": "teacher",
                    "dataset_name": describe_image_source(dataset), "split": split}
        with output_restored():
            return export_embeddings(backbone, processor, opened.dataset, output_dir, split=split,
                                     image_column=column, id_column=id_column, batch_size=batch_size,
                                     l2_normalize=l2_normalize, settings=settings, overwrite=overwrite)


def _named_in_args(args: DinoTrainingArguments, field: str, value: str | os.PathLike | PreTrainedModel | None,
                   folder: Path) -> DinoTrainingArguments:
    """``args`` with ``field`` naming ``value``: a name or path as it is, a model object saved to ``folder`` first
    (so that the run, its records and a resume all see a path); ``None`` leaves ``args`` alone."""
    if value is None:
        return args
    if isinstance(value, (str, os.PathLike)):
        return dataclasses.replace(args, **{field: os.fspath(value)})
    _save_on_main_process(getattr(value, "module", value), folder)
    return dataclasses.replace(args, **{field: str(folder)})


def _save_on_main_process(model: PreTrainedModel, folder: Path) -> None:
    """``model.save_pretrained(folder)`` (with a backbone's ``image_processor`` attribute, if any) on the main
    process, the others waiting for it."""
    from accelerate import PartialState

    state = PartialState()
    if state.is_main_process:
        model.save_pretrained(folder)
        if not isinstance(model, DinoForPreTraining):
            processor = getattr(model, "image_processor", None)
            if processor is not None:
                processor.save_pretrained(folder)
    state.wait_for_everyone()

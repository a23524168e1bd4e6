"""Evaluation of (DINO) vision backbones: frozen features, weighted k-NN, linear probe, the in-training monitor.

Everything here works on any ``transformers.AutoModel``-loadable backbone (``ViTModel`` written by
``save_backbone``, ``facebook/dino-*``, ``facebook/dinov2-*``, ConvNeXt, ResNet...), as the official
DINO evaluation does:

- features: the DINO embedding (:func:`dino_hf.models.backbones.backbone_embedding`: the CLS token of
  ``last_hidden_state`` after the final norm, or a ConvNet's pooled output), L2-normalised;
- k-NN: cosine similarity to every training feature, the top-k neighbours vote for their class with
  weight ``exp(similarity / T)`` (T = 0.07), the class with the largest vote wins (official
  ``eval_knn.py``, ``knn_classifier``);
- linear probe: a logistic regression trained on standardised frozen features;
- :class:`KnnMonitor`: both, periodically during training, on a cached labelled set.

Loading backbones and their processors is :mod:`dino_hf.models.backbones`' job; attention maps and plots are
:mod:`dino_hf.eval.visualization`'s.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor, nn

from dino_hf.base.official_recipe import OFFICIAL_KNN_TEMPERATURE
from dino_hf.base.progress import progress_bar
from dino_hf.data.decoding import decode_image, to_pil_image
from dino_hf.data.loader import IgnoreStopSignals
from dino_hf.data.sources import describe_image_source, open_image_source
from dino_hf.data.streaming import detect_image_column
from dino_hf.eval.loading import load_image_processor
from dino_hf.eval.visualization import attention_grid, attention_maps, save_attention_maps
from dino_hf.models.backbones import SUPPORTED_MODEL_TYPES, backbone_embedding, backbone_forward, family_of

logger = logging.getLogger(__name__)



class LabelEncoder:
    """Maps dataset labels to class ids: non-negative ints (``ClassLabel``) stay as they are; any other
    hashable value (strings...) gets the next free id.

    Share one encoder between the train and the test split so both use the same ids. :meth:`fit` on a
    map-style split registers its values in sorted order up front, so that DataLoader workers and
    processes (which hold copies of the encoder) agree; values first met while iterating (streamed
    string labels) are numbered in order of appearance, which is only consistent with
    ``num_workers=0`` and one process.
    """

    def __init__(self) -> None:
        self.mapping: dict[Any, int] = {}

    def fit(self, dataset: Any, column: str) -> LabelEncoder:
        """Register the non-integer labels of a map-style ``datasets.Dataset`` column (sorted)."""
        import datasets

        if not isinstance(dataset, datasets.Dataset):
            return self
        feature = dataset.features.get(column)
        if isinstance(feature, datasets.ClassLabel) or (
            isinstance(feature, datasets.Value) and feature.dtype.startswith(("int", "uint"))
        ):
            return self
        for value in sorted(dataset.select_columns([column]).unique(column), key=str):
            if value not in self.mapping:
                self.mapping[value] = len(self.mapping)
        return self

    def __call__(self, label: Any) -> int:
        if isinstance(label, Tensor):
            label = label.item()
        if isinstance(label, (int, np.integer)) and not isinstance(label, (bool, np.bool_)):
            if label < 0:
                raise ValueError(f"Label {int(label)} is negative; k-NN needs labelled images (class ids >= 0).")
            return int(label)
        if label not in self.mapping:
            self.mapping[label] = len(self.mapping)
        return self.mapping[label]


class ImageClassificationCollator:
    """Collates dataset rows ``{image_column: image, label_column: label}`` into
    ``{"pixel_values": (B, 3, H, W) float32, "labels": (B,) int64}`` with an image processor."""

    def __init__(
        self,
        processor: Any,
        image_column: str = "image",
        label_column: str = "label",
        label_encoder: LabelEncoder | None = None,
    ) -> None:
        self.processor = processor
        self.image_column = image_column
        self.label_column = label_column
        self.label_encoder = label_encoder or LabelEncoder()

    def __call__(self, examples: list[Mapping[str, Any]]) -> dict[str, Tensor]:
        for column in (self.image_column, self.label_column):
            if column not in examples[0]:
                raise ValueError(f"The dataset has no column {column!r} (columns: {', '.join(map(str, examples[0]))}).")
        images = [to_pil_image(decode_image(example[self.image_column])) for example in examples]
        labels = [self.label_encoder(example[self.label_column]) for example in examples]
        pixel_values = self.processor(images=images, return_tensors="pt")["pixel_values"]
        return {
            "pixel_values": pixel_values.float(),
            "labels": torch.tensor(labels, dtype=torch.long),
        }


def check_columns(dataset: Any, columns: Sequence[str], flags: Sequence[str] | None = None) -> None:
    """Raise a one-sentence ``ValueError`` when ``dataset`` (map-style or streamed) lacks a column.

    Streamed datasets whose columns are unknown before reading are not checked here (the collator
    raises the same error on the first batch).
    """
    names = getattr(dataset, "column_names", None)
    if names is None:
        return
    for index, column in enumerate(columns):
        if column not in names:
            flag = f" (set {flags[index]})" if flags else ""
            raise ValueError(f"The dataset has no column {column!r}{flag}; its columns are: {', '.join(names)}.")


def limit_examples(dataset: Any, max_samples: int | None, seed: int = 0) -> Any:
    """At most ``max_samples`` rows of ``dataset``, drawn with a fixed seed (class-sorted folders would
    otherwise give one class only). Map-style: a seeded shuffle then ``select``; streamed: a seeded
    buffer shuffle then ``take``."""
    if max_samples is None:
        return dataset
    import datasets

    if isinstance(dataset, datasets.Dataset):
        if max_samples >= len(dataset):
            return dataset
        return dataset.shuffle(seed=seed).select(range(max_samples))
    return dataset.shuffle(seed=seed, buffer_size=10_000).take(max_samples)


def make_eval_dataloader(
    dataset: Any,
    processor: Any,
    *,
    image_column: str = "image",
    label_column: str = "label",
    batch_size: int = 64,
    num_workers: int = 0,
    label_encoder: LabelEncoder | None = None,
) -> torch.utils.data.DataLoader:
    """A non-shuffled ``DataLoader`` over a ``datasets`` (Iterable)Dataset of labelled images yielding
    ``{"pixel_values": (B, 3, H, W), "labels": (B,)}``. Raises ``ValueError`` for a missing column."""
    check_columns(dataset, [image_column, label_column], ["--image_column", "--label_column"])
    label_encoder = (label_encoder or LabelEncoder()).fit(dataset, label_column)
    collator = ImageClassificationCollator(processor, image_column, label_column, label_encoder)
    # workers ignore a process group's SIGTERM/SIGINT: an evaluation during training must not die of the
    # signal that asks the run for a checkpoint
    return torch.utils.data.DataLoader(
        dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers, collate_fn=collator,
        worker_init_fn=IgnoreStopSignals() if num_workers > 0 else None,
    )


# --------------------------------------------------------------------------------------------------
# Features
# --------------------------------------------------------------------------------------------------
def _split_batch(batch: Any) -> tuple[Tensor, Tensor]:
    if isinstance(batch, Mapping):
        return batch["pixel_values"], batch["labels"]
    pixel_values, labels = batch[0], batch[1]
    return pixel_values, labels


def _is_accelerate_loader(loader: Any) -> bool:
    from accelerate.data_loader import DataLoaderDispatcher, DataLoaderShard

    return isinstance(loader, (DataLoaderShard, DataLoaderDispatcher))


@torch.inference_mode()
def extract_features(
    backbone: nn.Module,
    images_loader: Iterable[Any],
    accelerator: Any | None = None,
    *,
    normalize: bool = True,
    description: str | None = "features",
    autocast: bool = True,
) -> tuple[Tensor, Tensor]:
    """DINO features (:func:`backbone_embedding`: a ViT's CLS token, a ConvNet's pooled output) of every
    image a loader yields.

    Args:
        backbone: a backbone of any family (or another model with ``last_hidden_state`` / ``pooler_output``).
        images_loader: yields ``{"pixel_values": (B, 3, H, W), "labels": (B,)}`` or
            ``(pixel_values, labels)``. With an ``accelerator`` of several processes, a torch
            ``DataLoader`` is sharded here (``accelerate.data_loader.prepare_data_loader``, without
            registering it with the accelerator's checkpointed state; an already prepared one is used
            as is) and the results are gathered with ``accelerator.gather_for_metrics`` (padding
            duplicates dropped), so every process returns all features. Any other iterable is run in
            full on every process.
        accelerator: optional ``accelerate.Accelerator``: device, autocast and gathering.
        normalize: L2-normalise the features (the official k-NN protocol).
        description: label of the progress bar (on a terminal, main process; ``None``: no bar).
        autocast: run the forward passes under the accelerator's mixed precision; ``False``: in the
            backbone's own dtype (fp32 for a model in training), whatever precision the run trains in.
    Returns:
        ``features`` (N, D) float32 and ``labels`` (N,) int64, on the compute device.
    """
    shard = False
    if accelerator is not None:
        backbone = accelerator.unwrap_model(backbone)
        device = accelerator.device
        shard = accelerator.num_processes > 1 and (
            isinstance(images_loader, torch.utils.data.DataLoader) or _is_accelerate_loader(images_loader)
        )
        if shard and not _is_accelerate_loader(images_loader):
            from accelerate.data_loader import prepare_data_loader

            images_loader = prepare_data_loader(
                images_loader,
                device=device,
                num_processes=accelerator.num_processes,
                process_index=accelerator.process_index,
                put_on_device=True,
            )
        autocast_context = accelerator.autocast if autocast else contextlib.nullcontext  # fresh per batch
    else:
        device = next(backbone.parameters()).device
        autocast_context = contextlib.nullcontext
    dtype = None if accelerator is not None and autocast else next(backbone.parameters()).dtype

    was_training = backbone.training
    backbone.eval()
    features_list: list[Tensor] = []
    labels_list: list[Tensor] = []
    main_process = accelerator is None or accelerator.is_local_main_process
    try:
        total = len(images_loader) if hasattr(images_loader, "__len__") else None
    except TypeError:  # a DataLoader over an IterableDataset of unknown length
        total = None
    batches = progress_bar(images_loader, total=total, desc=description or "", unit="batch",
                           enabled=description is not None and main_process)
    try:
        for batch in batches:
            pixel_values, labels = _split_batch(batch)
            pixel_values = pixel_values.to(device, dtype, non_blocking=True)
            labels = torch.as_tensor(labels).to(device, non_blocking=True)
            with autocast_context():
                output = backbone_forward(backbone, pixel_values)
            features = backbone_embedding(backbone, output).float()
            if normalize:
                features = F.normalize(features, dim=-1)
            if shard:  # gather inside the loop: gather_for_metrics drops the last batch's padding
                features, labels = accelerator.gather_for_metrics((features.contiguous(), labels.long()))
            features_list.append(features)
            labels_list.append(labels.long())
    finally:
        backbone.train(was_training)
    if not features_list:
        raise ValueError("The evaluation loader yielded no images.")
    return torch.cat(features_list), torch.cat(labels_list)


# --------------------------------------------------------------------------------------------------
# Weighted k-NN (official DINO eval_knn.py)
# --------------------------------------------------------------------------------------------------


def _normalise_ks(k: int | Sequence[int]) -> tuple[int, ...]:
    ks = (k,) if isinstance(k, int) else tuple(int(value) for value in k)
    if not ks or min(ks) < 1:
        raise ValueError(f"k must be positive integers, got {k!r}.")
    return ks


def _num_classes(*label_tensors: Tensor, num_classes: int | None) -> int:
    largest = max(int(labels.max()) for labels in label_tensors if labels.numel())
    if min(int(labels.min()) for labels in label_tensors if labels.numel()) < 0:
        raise ValueError("Labels must be class ids >= 0.")
    if num_classes is None:
        return largest + 1
    if largest >= num_classes:
        raise ValueError(f"Label {largest} does not fit num_classes={num_classes}.")
    return num_classes


def weighted_knn_predict(
    train_features: Tensor,
    train_labels: Tensor,
    test_features: Tensor,
    k: int | Sequence[int] = (20,),
    temperature: float = OFFICIAL_KNN_TEMPERATURE,
    num_classes: int | None = None,
    chunk_size: int | None = None,
) -> dict[int, Tensor]:
    """Weighted k-NN class predictions, as the official DINO ``knn_classifier``.

    For each test feature: similarities ``s = test @ train.T`` (cosine for L2-normalised features), the
    ``k`` most similar training samples, each voting for its class with weight ``exp(s / temperature)``;
    the prediction is the class with the largest summed vote. The top ``max(k)`` neighbours are found
    once and shared by every ``k``. The test set is processed in chunks to bound memory.

    Ties: equal votes go to the smaller class id (``argmax`` takes the first maximum); neighbours with
    exactly equal similarity at the k-th place are chosen by ``torch.topk``. A ``k`` larger than the
    training set uses every training sample.

    Args:
        train_features: (N, D) training features (L2-normalised for cosine similarity).
        train_labels: (N,) int class ids >= 0.
        test_features: (M, D).
        k: one or several numbers of neighbours.
        temperature: vote temperature T (official 0.07).
        num_classes: number of classes; default ``max(train_labels) + 1``.
        chunk_size: test rows per chunk; default keeps a chunk's similarity matrix at ~32 M entries.
    Returns:
        ``{k: predictions (M,) int64}`` on ``train_features.device``.
    """
    ks = _normalise_ks(k)
    device = train_features.device
    train_features = train_features.float()
    test_features = test_features.to(device=device, dtype=torch.float32)
    train_labels = train_labels.to(device=device, dtype=torch.long)
    num_classes = _num_classes(train_labels, num_classes=num_classes)
    num_train, num_test = train_features.shape[0], test_features.shape[0]
    if num_train == 0:
        raise ValueError("k-NN needs at least one training feature.")
    max_k = min(max(ks), num_train)
    chunk_size = chunk_size or max(1, min(num_test, 2**25 // num_train))
    predictions: dict[int, list[Tensor]] = {value: [] for value in ks}
    for start in range(0, num_test, chunk_size):
        features = test_features[start : start + chunk_size]
        similarity = features @ train_features.T  # (b, N)
        top_similarity, top_indices = similarity.topk(max_k, dim=1, largest=True, sorted=True)  # (b, max_k)
        neighbour_labels = train_labels[top_indices]  # (b, max_k)
        weights = (top_similarity / temperature).exp()  # (b, max_k)
        for value in ks:
            kk = min(value, max_k)
            votes = torch.zeros(features.shape[0], num_classes, device=device, dtype=torch.float32)
            votes.scatter_add_(1, neighbour_labels[:, :kk], weights[:, :kk])  # (b, C)
            predictions[value].append(votes.argmax(dim=1))
    return {
        value: torch.cat(chunks) if chunks else torch.empty(0, dtype=torch.long, device=device)
        for value, chunks in predictions.items()
    }


def knn_accuracy(
    train_features: Tensor,
    train_labels: Tensor,
    test_features: Tensor,
    test_labels: Tensor,
    k: int | Sequence[int] = (20,),
    temperature: float = OFFICIAL_KNN_TEMPERATURE,
    num_classes: int | None = None,
    chunk_size: int | None = None,
) -> dict[int, float]:
    """Top-1 accuracy of :func:`weighted_knn_predict` for each ``k``: ``{k: accuracy in [0, 1]}``.

    Test labels that never occur in the training set simply count as errors."""
    if test_labels.shape[0] != test_features.shape[0]:
        raise ValueError("test_features and test_labels differ in length.")
    if test_labels.numel() == 0:
        raise ValueError("k-NN accuracy needs at least one test sample.")
    test_labels = test_labels.to(train_features.device, dtype=torch.long)
    if num_classes is None:
        num_classes = _num_classes(train_labels, test_labels, num_classes=None)
    predictions = weighted_knn_predict(
        train_features, train_labels, test_features, k, temperature, num_classes, chunk_size
    )
    total = test_labels.shape[0]
    return {value: int((predicted == test_labels).sum()) / total for value, predicted in predictions.items()}


# --------------------------------------------------------------------------------------------------
# Linear probe
# --------------------------------------------------------------------------------------------------


def linear_probe_accuracy(
    train_features: Tensor,
    train_labels: Tensor,
    test_features: Tensor,
    test_labels: Tensor,
    *,
    num_classes: int | None = None,
    weight_decay: float = 1e-4,
    max_iterations: int = 300,
    standardize: bool = True,
) -> float:
    """Accuracy of a logistic-regression probe trained on frozen features.

    A ``nn.Linear(D, C)`` (zero-initialised, hence deterministic) is fitted full-batch with L-BFGS
    (strong-Wolfe line search) on the cross-entropy plus ``weight_decay / 2 * ||W||^2``. Features are
    standardised with the training mean / std first, which makes L-BFGS converge in a few hundred
    iterations whatever the feature scale.

    Args:
        train_features: (N, D); train_labels: (N,) class ids >= 0.
        test_features: (M, D); test_labels: (M,).
        num_classes: default ``max(labels) + 1``.
        weight_decay: L2 penalty on the weights (not the bias).
        max_iterations: L-BFGS iterations.
        standardize: subtract the training mean and divide by the training std per dimension.
    Returns:
        top-1 accuracy on the test set, in [0, 1].
    """
    device = train_features.device
    x_train = train_features.detach().clone().float()  # clone: inference tensors cannot enter autograd
    x_test = test_features.detach().clone().to(device=device, dtype=torch.float32)
    y_train = train_labels.detach().clone().to(device=device, dtype=torch.long)
    y_test = test_labels.detach().clone().to(device=device, dtype=torch.long)
    num_classes = _num_classes(y_train, y_test, num_classes=num_classes)
    if standardize:
        mean = x_train.mean(dim=0, keepdim=True)
        std = x_train.std(dim=0, keepdim=True).nan_to_num(1.0).clamp_min(1e-6)
        x_train, x_test = (x_train - mean) / std, (x_test - mean) / std
    classifier = nn.Linear(x_train.shape[1], num_classes).to(device)
    nn.init.zeros_(classifier.weight)
    nn.init.zeros_(classifier.bias)
    optimizer = torch.optim.LBFGS(
        classifier.parameters(),
        lr=1.0,
        max_iter=max_iterations,
        history_size=20,
        tolerance_grad=1e-7,
        tolerance_change=1e-10,
        line_search_fn="strong_wolfe",
    )

    def closure() -> Tensor:
        optimizer.zero_grad()
        loss = F.cross_entropy(classifier(x_train), y_train)
        loss = loss + 0.5 * weight_decay * classifier.weight.pow(2).sum()
        loss.backward()
        return loss

    with torch.inference_mode(False), torch.enable_grad():
        optimizer.step(closure)
    with torch.no_grad():
        predictions = classifier(x_test).argmax(dim=1)
    return int((predictions == y_test).sum()) / y_test.shape[0]


# --------------------------------------------------------------------------------------------------
# In-training monitor
# --------------------------------------------------------------------------------------------------


class KnnMonitor:
    """Periodic k-NN evaluation of a backbone on a labelled dataset (``--eval_dataset_name``).

    The datasets are opened (and their columns checked) at construction, so a wrong name fails before
    training starts. On the first :meth:`evaluate` the images are decoded and preprocessed once (RGB,
    resize to the backbone's resolution, ImageNet mean/std: what ``save_backbone``'s processor does)
    and kept, exactly (float32), when they fit in ``cache_max_bytes``; later evaluations only run the
    backbone. The features are computed in float32 whatever precision the run trains in (the official
    ``eval_knn.py`` and ``dino-hf-eval``'s default), so that the figure is the one ``dino-hf-eval`` gives
    on the exported backbone with the same data, subset (``max_*_samples``, ``seed``) and resolution.

    Args:
        dataset_name: local folder / parquet / tar / Hub id / ``save_to_disk`` folder, or a dataset object
            with both splits (``dino_hf.data.sources.open_image_source``).
        dataset_config_name: Hub configuration name.
        train_split: split whose features are the k-NN memory.
        test_split: split that is classified.
        image_column, label_column: column names (``image_column`` None: found by
            :func:`dino_hf.data.streaming.detect_image_column`).
        max_train_samples, max_test_samples: seeded random subsets (None: all).
        image_size: evaluation resolution; default the backbone's ``config.image_size``.
        k: numbers of neighbours; each gives a metric ``knn_top1_k{k}``.
        temperature: k-NN vote temperature (official 0.07).
        batch_size: images per forward pass and process.
        num_workers: DataLoader workers for decoding.
        streaming: stream the datasets instead of downloading / converting them first.
        linear_probe: also fit a linear probe (metric ``linear_probe_top1``).
        cache_max_bytes: largest preprocessed-image cache kept in memory (per process).
        seed: seed of the subset draw.
        image_processor: the preprocessor config dict a backbone came with (else what an export of a
            backbone trained from scratch gets: ImageNet mean/std at the backbone's resolution).
        hub_options: ``token`` and ``cache_dir`` for a Hub dataset.
    """

    def __init__(
        self,
        dataset_name: str,
        *,
        dataset_config_name: str | None = None,
        train_split: str = "train",
        test_split: str = "test",
        image_column: str | None = None,
        label_column: str = "label",
        max_train_samples: int | None = None,
        max_test_samples: int | None = None,
        image_size: int | None = None,
        k: int | Sequence[int] = (20,),
        temperature: float = OFFICIAL_KNN_TEMPERATURE,
        batch_size: int = 128,
        num_workers: int = 0,
        streaming: bool = False,
        linear_probe: bool = False,
        cache_max_bytes: int = 2 * 1024**3,
        seed: int = 0,
        image_processor: dict | None = None,
        hub_options: Mapping[str, Any] | None = None,
    ) -> None:
        self.dataset_name = dataset_name
        self.image_column = image_column
        self.label_column = label_column
        self.image_size = image_size
        self.image_processor = image_processor
        self.ks = _normalise_ks(k)
        self.temperature = temperature
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.linear_probe = linear_probe
        self.cache_max_bytes = cache_max_bytes
        self.label_encoder = LabelEncoder()
        self.datasets: dict[str, Any] = {}
        for name, split, max_samples in (
            ("train", train_split, max_train_samples),
            ("test", test_split, max_test_samples),
        ):
            dataset = open_image_source(dataset_name, split, dataset_config_name, streaming=streaming,
                                        flag="--eval_dataset_name", hub_options=hub_options).dataset
            self.image_column = image_column = detect_image_column(dataset, image_column,
                                                                   describe_image_source(dataset_name))
            check_columns(dataset, [image_column, label_column], ["--image_column", "--label_column"])
            self.datasets[name] = limit_examples(dataset, max_samples, seed)
        self._cache: dict[str, tuple[Tensor, Tensor]] = {}
        self._uncacheable: set[str] = set()
        self._processor: Any = None
        self._said_no_attention = False

    def _loader(self, name: str, backbone: nn.Module, accelerator: Any | None) -> Iterable[Any]:
        """Loader of split ``name`` ("train" / "test"), from the in-memory cache when possible."""
        if name in self._cache:
            pixel_values, labels = self._cache[name]
            return torch.utils.data.DataLoader(
                _CachedTensorDataset(pixel_values, labels), batch_size=self.batch_size, shuffle=False
            )
        if self._processor is None:
            self._processor = load_image_processor(
                None, backbone.config, self.image_size, image_processor=self.image_processor
            )
        loader = make_eval_dataloader(
            self.datasets[name],
            self._processor,
            image_column=self.image_column,
            label_column=self.label_column,
            batch_size=self.batch_size,
            num_workers=self.num_workers,
            label_encoder=self.label_encoder,
        )
        if name in self._uncacheable:
            return loader  # too large: decoded again at every evaluation (sharded when distributed)
        if accelerator is not None and accelerator.num_processes > 1:
            # every process decodes the split once into its cache, then the cache is sharded
            for _ in self._caching(name, loader):
                pass
            return self._loader(name, backbone, accelerator)
        return self._caching(name, loader)

    def _caching(self, name: str, loader: Iterable[dict[str, Tensor]]) -> Iterator[dict[str, Tensor]]:
        """Yield the batches of ``loader`` and keep them (as they are: float32) for the next evaluations."""
        pixel_chunks: list[Tensor] = []
        label_chunks: list[Tensor] = []
        stored_bytes = 0
        for batch in loader:
            stored_bytes += batch["pixel_values"].numel() * batch["pixel_values"].element_size()
            if stored_bytes <= self.cache_max_bytes:
                pixel_chunks.append(batch["pixel_values"])
                label_chunks.append(batch["labels"])
            else:
                pixel_chunks, label_chunks = [], []
            yield batch
        if stored_bytes > self.cache_max_bytes:
            self._uncacheable.add(name)
        elif pixel_chunks:
            self._cache[name] = (torch.cat(pixel_chunks), torch.cat(label_chunks))

    def features(self, backbone: nn.Module, accelerator: Any | None = None) -> dict[str, tuple[Tensor, Tensor]]:
        """``{"train": (features (N, D), labels (N,)), "test": (...)}`` of ``backbone``."""
        return {
            name: extract_features(backbone, self._loader(name, backbone, accelerator), accelerator,
                                   description=f"k-NN features ({name})", autocast=False)
            for name in ("train", "test")
        }

    def evaluate(self, backbone: nn.Module, accelerator: Any | None = None) -> dict[str, float]:
        """k-NN top-1 accuracy of ``backbone`` (the teacher's backbone of any family, unwrapped or not).

        Returns ``{"knn_top1_k20": 0.8, ...}`` (plus ``linear_probe_top1`` when enabled), identical on
        every process. The backbone's train/eval mode is restored afterwards.
        """
        features = self.features(backbone, accelerator)
        train_features, train_labels = features["train"]
        test_features, test_labels = features["test"]
        accuracies = knn_accuracy(train_features, train_labels, test_features, test_labels, self.ks, self.temperature)
        metrics = {f"knn_top1_k{value}": accuracy for value, accuracy in accuracies.items()}
        if self.linear_probe:
            metrics["linear_probe_top1"] = linear_probe_accuracy(
                train_features, train_labels, test_features, test_labels
            )
        return metrics

    def attention_snapshot(
        self, backbone: nn.Module, output_dir: str | Path, num_images: int = 4
    ) -> list[Image.Image]:
        """Attention maps of the first ``num_images`` test images, saved and returned for trackers.

        The same images at every evaluation, so the maps show how attention evolves: writes
        ``output_dir/image{i}-*.png`` (see :func:`save_attention_maps`) and returns one grid picture
        per image (:func:`attention_grid`). A backbone without self-attention (a ConvNet) has no maps:
        nothing is drawn and ``[]`` returned, which the first call says in one info line.
        """
        model_type = getattr(getattr(backbone, "config", None), "model_type", None)
        if model_type in SUPPORTED_MODEL_TYPES and not family_of(model_type).has_attention:
            if not self._said_no_attention:
                logger.info("No attention maps during training: a %s backbone has no self-attention.",
                            family_of(model_type).name_of(model_type))
                self._said_no_attention = True
            return []
        if self._processor is None:
            self._processor = load_image_processor(
                None, backbone.config, self.image_size, image_processor=self.image_processor
            )
        images = []
        for example in self.datasets["test"]:
            value = example.get(self.image_column)
            if value is not None:
                images.append(to_pil_image(decode_image(value)))
            if len(images) == num_images:
                break
        if not images:
            return []
        pixel_values = self._processor(images, return_tensors="pt")["pixel_values"]
        device = next(backbone.parameters()).device
        attentions = attention_maps(backbone, pixel_values.to(device))
        height, width = pixel_values.shape[-2:]
        grids = []
        for index, (image, maps) in enumerate(zip(images, attentions, strict=True)):
            shown = image.resize((width, height), Image.Resampling.BICUBIC)
            save_attention_maps(shown, maps, output_dir, prefix=f"image{index}-")
            grids.append(attention_grid(shown, maps))
        return grids



class _CachedTensorDataset(torch.utils.data.Dataset):
    """Cached pixels served as float32 ``{"pixel_values", "labels"}`` rows."""

    def __init__(self, pixel_values: Tensor, labels: Tensor) -> None:
        self.pixel_values = pixel_values
        self.labels = labels

    def __len__(self) -> int:
        return self.labels.shape[0]

    def __getitem__(self, index: int) -> dict[str, Tensor]:
        return {"pixel_values": self.pixel_values[index].float(), "labels": self.labels[index]}

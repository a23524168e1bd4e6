"""The DINO training loader: per-process shards of a ``datasets`` stream -> loader workers ->
crop-major multi-crop batches (or decoded working-size images), with an exactly resumable position
(the pipeline: :mod:`dino_hf.data.streaming`).

Exact resumption. ``datasets``' own buffer shuffle loses the buffer on resume (its docs say so), and
a ``DataLoader`` does not know the stream position. Here the shuffle buffer is filled with
``shuffle_buffer_size`` undecoded examples, permuted by a generator seeded with
``(seed, epoch, process, worker, block)`` and drained; the augmentation of each example is seeded the
same way plus its position. So a position is fully described by the ``datasets`` state at the start
of the current block plus the offset in it: workers send it along with every batch, the loader keeps
the latest per worker, and :meth:`DinoDataLoader.load_state_dict` restores it (re-reading one block
undecoded) and rotates the worker order so the next batches are exactly those an uninterrupted run
would have produced. No extra dependency (torchdata) is needed.
"""

from __future__ import annotations

import copy
import itertools
import logging
import math
import random
import signal
import time
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import numpy as np
import torch
from torch import Tensor

from dino_hf.base.errors import RunError
from dino_hf.data.augmentation import MultiCropAugmentation
from dino_hf.data.batched_augmentation import DeviceMultiCrop, letterbox
from dino_hf.data.decoding import BadImageError, decode_image
from dino_hf.data.masking import MaskSampler
from dino_hf.data.sources import open_image_source
from dino_hf.data.streaming import detect_image_column

logger = logging.getLogger(__name__)

__all__ = ["BatchStream", "DinoDataLoader", "IgnoreStopSignals", "create_train_dataloader", "mix_seeds"]

_STATE_VERSION = 1

# --------------------------------------------------------------------------------------------------
# The worker-side stream
# --------------------------------------------------------------------------------------------------
class IgnoreStopSignals:
    """A DataLoader ``worker_init_fn``: the worker ignores SIGTERM and SIGINT, then runs ``then``.

    Schedulers (SLURM, ``timeout``, a terminal's Ctrl-C) signal the whole process group. A worker
    killed by that signal makes the main process's DataLoader raise before the checkpoint the same
    signal asked for is written; ignoring it leaves shutdown to the main process, which stops its
    workers when the loader is done with (and a worker exits on its own when the main process dies).
    A class rather than a closure, so that it pickles for the ``spawn`` start method.
    """

    def __init__(self, then: Callable[[int], None] | None = None) -> None:
        self.then = then

    def __call__(self, worker_id: int) -> None:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        if self.then is not None:
            self.then(worker_id)


def mix_seeds(*values: int) -> int:
    """A 63-bit seed mixing ``values`` (numpy SeedSequence)."""
    return int(np.random.SeedSequence([int(v) for v in values]).generate_state(2, dtype=np.uint64)[0] >> 1)


_MARKER = "_dino_marker"  # key of the dicts that carry state without data
_STATE = "_dino_state"


class _MultiCropStream(torch.utils.data.IterableDataset):
    """Yields batches (dicts) of one loader worker ("role"), each with its stream position.

    Batches hold multi-crop views (``augmentation`` given) or decoded working-size images
    (``working_size`` given, ``augmentation`` ``None``).
    """

    def __init__(
        self,
        source: Any,
        augmentation: Callable[..., Any] | None,
        batch_size: int,
        image_column: str,
        shuffle_buffer_size: int,
        seed: int,
        process_index: int,
        drop_last: bool,
        min_image_size: int,
        working_size: int | None = None,
    ) -> None:
        super().__init__()
        self.source = source
        self.augmentation = augmentation
        self.working_size = working_size
        self.batch_size = batch_size
        self.image_column = image_column
        self.shuffle_buffer_size = max(1, shuffle_buffer_size)
        self.seed = seed
        self.process_index = process_index
        self.drop_last = drop_last
        self.min_image_size = min_image_size
        self.epoch = 0
        self.resume_states: dict[int, dict] = {}
        self.rotate_before = -1  # roles <= this emit one marker first (worker-order rotation on resume)

    def _augment(self, pixels: Tensor, example_seed: int) -> tuple[Tensor, Tensor | None]:
        """Views of one image, seeded by ``example_seed``: ``(G, 3, H, W)`` and ``(N, 3, h, w)`` or ``None``."""
        if isinstance(self.augmentation, MultiCropAugmentation):
            return self.augmentation.multi_crop(pixels, torch.Generator().manual_seed(example_seed))
        # Any other callable: seed the global generators it may draw from, without disturbing the
        # caller's (with num_workers=0 this runs in the training process).
        python_state, numpy_state = random.getstate(), np.random.get_state()
        try:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(example_seed)
                random.seed(example_seed)
                np.random.seed(example_seed % 2**32)
                views = self.augmentation(pixels)
        finally:
            random.setstate(python_state)
            np.random.set_state(numpy_state)
        num_global = getattr(self.augmentation, "num_global_crops", 2)
        global_views = torch.stack(list(views[:num_global]))
        local_views = torch.stack(list(views[num_global:])) if len(views) > num_global else None
        return global_views, local_views

    def _shuffled_values(self, source: Any, role: int, start: dict | None) -> Iterator[tuple[Any, dict]]:
        """Image values of ``source`` in shuffle-buffer order, each with the position just after it.

        Blocks of ``shuffle_buffer_size`` undecoded values are read, permuted by a generator seeded
        with ``(seed, epoch, process, role, block)`` and drained. A position is ``{"block_start":
        datasets state before the block, "block_index", "position": values of the block consumed}``;
        ``start`` resumes from one.
        """
        block_start, block_index, skip = None, 0, 0
        if start is not None:
            block_start, block_index, skip = start["block_start"], start["block_index"], start["position"]
            if block_start is not None:
                source.load_state_dict(block_start)
        iterator = iter(source)
        while True:
            block = [example[self.image_column] for example in itertools.islice(iterator, self.shuffle_buffer_size)]
            if not block:
                return
            order_seed = mix_seeds(self.seed, self.epoch, self.process_index, role, block_index)
            order = np.random.default_rng(order_seed).permutation(len(block))
            for position in range(skip, len(block)):
                yield (
                    block[order[position]],
                    {
                        "block_start": block_start,
                        "block_index": block_index,
                        "position": position + 1,
                    },
                )
            skip, block_index, block_start = 0, block_index + 1, source.state_dict()

    def __iter__(self) -> Iterator[dict]:
        info = torch.utils.data.get_worker_info()
        role = info.id if info is not None else 0
        resume = self.resume_states.get(role)
        if role <= self.rotate_before:
            yield {_MARKER: "rotate"}
        if resume is not None and resume["finished"]:
            return
        source = copy.deepcopy(self.source)
        # datasets shuffles the shard order with np.random.default_rng(epoch) when epoch != 0; giving it
        # a positive mix of (seed, epoch) makes the shard order depend on both, reproducibly.
        source.set_epoch(mix_seeds(self.seed, self.epoch) % (2**31 - 1) + 1)
        counters = {"role": role, "bad_images": 0, "decoded_images": 0, "last_error": "", "batches": 0,
                    "finished": False}
        if resume is not None:
            counters.update(bad_images=resume["bad_images"], last_error=resume["last_error"], batches=resume["batches"],
                            decoded_images=resume.get("decoded_images", 0))
        position = resume
        items: list[tuple[Tensor, Tensor | None]] = []
        for value, position in self._shuffled_values(source, role, resume):
            try:
                pixels = decode_image(value, self.min_image_size)
            except BadImageError as error:
                counters["bad_images"] += 1
                counters["last_error"] = str(error)
                continue
            counters["decoded_images"] += 1
            if self.working_size is not None:
                items.append(letterbox(pixels, self.working_size))
            else:
                seed = mix_seeds(
                    self.seed, self.epoch, self.process_index, role, position["block_index"], position["position"]
                )
                items.append(self._augment(pixels, seed))
            if len(items) == self.batch_size:
                counters["batches"] += 1
                yield self._collate(items, {**counters, **position})
                items = []
        final = {**counters, **(position or {"block_start": None, "block_index": 0, "position": 0}), "finished": True}
        if items and not self.drop_last:
            final["batches"] += 1
            yield self._collate(items, final)
        else:
            yield {_MARKER: "end", _STATE: final}

    def _collate(self, items: list[tuple[Tensor, Tensor | None]], state: dict) -> dict:
        if self.working_size is not None:
            return {
                "images": torch.stack([image for image, _ in items]),  # (B, 3, S, S) uint8
                "image_sizes": torch.stack([size for _, size in items]),  # (B, 2) valid (height, width)
                _STATE: state,
            }
        local_views = [views for _, views in items if views is not None]
        return {
            "global_crops": torch.stack([views for views, _ in items], dim=1),  # (G, B, 3, H, W)
            "local_crops": torch.stack(local_views, dim=1) if local_views else None,  # (N, B, 3, h, w)
            _STATE: state,
        }


# --------------------------------------------------------------------------------------------------
# The loader
# --------------------------------------------------------------------------------------------------
class DinoDataLoader:
    """Iterable of crop-major DINO batches with epochs, exact resumption and bad-image accounting.

    Iterating yields ``{"global_crops": (G, B, 3, H, W), "local_crops": (N, B, 3, h, w) or None}``
    CPU float32 tensors (``B = batch_size``; the last smaller batch of an epoch only with
    ``drop_last=False``), or, for a decode-only loader (``working_size``), ``{"images": (B, 3, S, S)
    uint8, "image_sizes": (B, 2) int64}``. Built by :func:`create_train_dataloader`.

    Attributes:
        num_examples: examples this process sees per epoch when known (``None`` for a stream of
            unknown length). With shard-based splitting the ranks' counts can differ by a shard.
        bad_image_count: bad images skipped so far by this process (all epochs).
        epoch: the epoch the next iteration streams.
    """

    def __init__(
        self,
        stream: _MultiCropStream,
        *,
        num_workers: int,
        num_examples: int | None,
        num_processes: int,
        pin_memory: bool = False,
        prefetch_factor: int | None = None,
    ) -> None:
        self._stream = stream
        self.num_workers = num_workers
        self.num_examples = num_examples
        self.num_processes = num_processes
        self.pin_memory = pin_memory
        self.prefetch_factor = prefetch_factor
        self.batch_size = stream.batch_size
        self.epoch = 0
        self._role_states: dict[int, dict] = {}
        self._last_role: int | None = None
        self._bad_images_before_epoch = 0
        self._warned_bad_count = 0
        self._pending_resume = False
        self._active_iterator: Any = None  # torch's iterator of the pass in progress (it owns the workers)

    @property
    def bad_image_count(self) -> int:
        return self._bad_images_before_epoch + sum(s["bad_images"] for s in self._role_states.values())

    @property
    def num_roles(self) -> int:
        return max(1, self.num_workers)

    def epoch_image_counts(self) -> tuple[int, int, str]:
        """(images decoded, bad images skipped, the last bad image's error) in the current epoch so far."""
        decoded = sum(state.get("decoded_images", 0) for state in self._role_states.values())
        return decoded, self.bad_image_count - self._bad_images_before_epoch, self._last_error()

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch the next iteration streams (reseeds the shuffle and the augmentation).

        Calling it with the epoch of a state just loaded keeps that state; another epoch starts fresh.
        """
        if epoch == self.epoch:
            return
        self._bad_images_before_epoch = self.bad_image_count
        self.epoch = epoch
        self._role_states = {}
        self._last_role = None
        self._pending_resume = False

    def __iter__(self) -> Iterator[dict[str, Tensor | None]]:
        stream = copy.copy(self._stream)
        stream.epoch = self.epoch
        if self._pending_resume:
            stream.resume_states = copy.deepcopy(self._role_states)
            stream.rotate_before = -1 if self._last_role is None or self.num_workers == 0 else self._last_role
        else:  # a new pass over this epoch
            self._bad_images_before_epoch = self.bad_image_count
            self._role_states = {}
            self._last_role = None
            stream.resume_states = {}
            stream.rotate_before = -1
        self._pending_resume = False
        loader = torch.utils.data.DataLoader(
            stream,
            batch_size=None,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            prefetch_factor=self.prefetch_factor if self.num_workers > 0 else None,
            # worker base seeds from a private generator: the global torch generator is left alone
            generator=torch.Generator().manual_seed(mix_seeds(self._stream.seed, self.epoch)),
            worker_init_fn=IgnoreStopSignals(),
        )
        self._active_iterator = iter(loader)
        for item in self._active_iterator:
            state = item.pop(_STATE, None)
            if state is not None:
                self._role_states[state["role"]] = state
                self._last_role = state["role"]
                self._report_bad_images(state)
            if _MARKER in item:
                continue
            yield item
        if self.bad_image_count > self._bad_images_before_epoch:
            logger.warning(
                "Epoch %d: skipped %d bad image(s) (%d in total; last: %s).",
                self.epoch,
                self.bad_image_count - self._bad_images_before_epoch,
                self.bad_image_count,
                self._last_error(),
            )
            self._warned_bad_count = self.bad_image_count

    def close(self) -> None:
        """Stop the loader workers of the pass in progress, and wait for them.

        Workers ignore SIGTERM (`IgnoreStopSignals`), so the ``terminate()`` with which torch and
        multiprocessing end stragglers at exit does not end them: a worker that has not stopped when
        asked is killed here instead, so that the process never waits for it at exit.
        """
        iterator, self._active_iterator = self._active_iterator, None
        if iterator is None:
            return
        workers = list(getattr(iterator, "_workers", []))
        shutdown = getattr(iterator, "_shutdown_workers", None)
        if shutdown is not None:
            shutdown()  # the done event and a None per worker, then a bounded join
        for worker in workers:
            if worker.is_alive():
                worker.kill()
                worker.join(timeout=5)

    def _last_error(self) -> str:
        errors = [s["last_error"] for s in self._role_states.values() if s.get("last_error")]
        return errors[-1] if errors else "unknown"

    def _report_bad_images(self, state: dict) -> None:
        count = self.bad_image_count
        # warn on the first bad image and then each time the count doubles
        if count > 0 and count >= 2 * self._warned_bad_count and count != self._warned_bad_count:
            logger.warning(
                "Skipped %d bad image(s) so far (missing, undecodable, truncated or too small; last: %s).",
                count,
                state.get("last_error") or self._last_error(),
            )
            self._warned_bad_count = count

    def state_dict(self) -> dict[str, Any]:
        """The exact stream position after the last batch yielded (plain Python, picklable / JSON-able)."""
        return {
            "version": _STATE_VERSION,
            "epoch": self.epoch,
            "seed": self._stream.seed,
            "num_workers": self.num_workers,
            "num_processes": self.num_processes,
            "process_index": self._stream.process_index,
            "batch_size": self._stream.batch_size,
            "shuffle_buffer_size": self._stream.shuffle_buffer_size,
            "last_worker": self._last_role,
            "bad_images_before_epoch": self._bad_images_before_epoch,
            "workers": {str(role): copy.deepcopy(state) for role, state in sorted(self._role_states.items())},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a position saved by :meth:`state_dict`; the next iteration continues from it.

        The loader must be built with the same dataset, seed, batch size, shuffle buffer, number of
        workers and process layout (checked).
        """
        expected = {
            "num_workers": self.num_workers,
            "num_processes": self.num_processes,
            "process_index": self._stream.process_index,
            "batch_size": self._stream.batch_size,
            "shuffle_buffer_size": self._stream.shuffle_buffer_size,
            "seed": self._stream.seed,
        }
        mismatched = {k: (state.get(k), v) for k, v in expected.items() if state.get(k) != v}
        if mismatched:
            details = ", ".join(f"{k}: saved {saved}, now {now}" for k, (saved, now) in mismatched.items())
            raise ValueError(f"Cannot resume the data stream exactly with different loader settings ({details}).")
        self.epoch = int(state["epoch"])
        self._role_states = {int(role): copy.deepcopy(s) for role, s in state["workers"].items()}
        self._last_role = state["last_worker"]
        self._bad_images_before_epoch = int(state["bad_images_before_epoch"])
        self._warned_bad_count = self.bad_image_count
        self._pending_resume = True


# --------------------------------------------------------------------------------------------------
# Entry point
# --------------------------------------------------------------------------------------------------
def create_train_dataloader(
    dataset_name: Any,
    *,
    augmentation: Callable[..., Any] | None,
    batch_size: int,
    dataset_config_name: str | None = None,
    split: str = "train",
    image_column: str | None = None,
    streaming: bool = True,
    num_workers: int | Callable[[int | None], int] = 0,
    shuffle_buffer_size: int = 10_000,
    seed: int = 0,
    process_index: int = 0,
    num_processes: int = 1,
    drop_last: bool = True,
    min_image_size: int = 2,
    pin_memory: bool = False,
    prefetch_factor: int | None = None,
    working_size: int | None = None,
    hub_options: Mapping[str, Any] | None = None,
) -> DinoDataLoader:
    """Build this process's training loader of DINO multi-crop batches (or of decoded images).

    Args:
        dataset_name: the images: a local folder / parquet or tar file / Hub id / ``save_to_disk``
            folder, or a ``datasets`` or torch dataset object (:func:`dino_hf.data.sources.open_image_source`).
        augmentation: a :class:`~dino_hf.data.augmentation.MultiCropAugmentation`, or any callable taking an
            RGB ``(3, H, W)`` uint8 tensor and returning its views (global views first; an attribute
            ``num_global_crops`` says how many, default 2). ``None`` together with ``working_size``
            makes a decode-only loader.
        batch_size: images per batch for this process.
        streaming: stream the data (default) instead of preparing an Arrow cache first.
        num_workers: loader worker processes; each reads its own shards (see the shard warning). Or a
            function of the number of shards this process will read (``None`` when not yet known)
            that returns the count: how ``--dataloader_num_workers auto`` decides.
        shuffle_buffer_size: examples per shuffle block (1 disables example shuffling; shard order is
            still shuffled per epoch).
        seed: base seed of shuffling and augmentation (mixed with epoch, process and worker).
        process_index, num_processes: this process's rank and the world size.
        drop_last: drop each worker's last incomplete batch (the official recipe does).
        min_image_size: images with a smaller side are skipped as bad (default 2: drops 1x1 images).
        pin_memory, prefetch_factor: passed to ``torch.utils.data.DataLoader``.
        hub_options: ``token`` and ``cache_dir`` for a Hub dataset (``datasets.load_dataset``).
        working_size: decode only: batches of ``(B, 3, working_size, working_size)`` uint8 images
            (each shrunk to fit, aspect kept, top-left aligned) with their ``(B, 2)`` valid sizes, for
            :class:`~dino_hf.data.batched_augmentation.BatchedMultiCropAugmentation` on the training device.

    Raises:
        ValueError: when the dataset cannot be found or has no column ``image_column`` (the message
            lists the columns that exist).
    """
    from datasets import Image as ImageFeature
    from datasets import IterableDataset
    from datasets.distributed import split_dataset_by_node

    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}.")
    if (augmentation is None) == (working_size is None):
        raise ValueError("Pass either an augmentation or a working_size (decode-only batches), not both or neither.")
    if working_size is not None and working_size < 2:
        raise ValueError(f"working_size must be at least 2 pixels, got {working_size}.")
    if not 0 <= process_index < num_processes:
        raise ValueError(f"process_index must be in [0, {num_processes}), got {process_index}.")
    opened = open_image_source(dataset_name, split, dataset_config_name, streaming=streaming, hub_options=hub_options)
    dataset, num_examples, dataset_name = opened.dataset, opened.num_examples, opened.description
    image_column = detect_image_column(dataset, image_column, dataset_name)
    dataset = dataset.select_columns([image_column])
    if isinstance(dataset.features.get(image_column) if dataset.features else None, ImageFeature):
        dataset = dataset.cast_column(image_column, ImageFeature(decode=False))  # we decode, and catch errors

    if not isinstance(dataset, IterableDataset):  # a map-style Dataset: as many shards as needed (a multiple of the readers)
        num_workers = num_workers(None) if callable(num_workers) else num_workers
        readers = num_processes * max(1, num_workers)
        num_shards = max(1, min(num_examples, readers * math.ceil(64 / readers)))
        dataset = dataset.to_iterable_dataset(num_shards=num_shards)
    per_process_examples = None if num_examples is None else num_examples // num_processes

    num_shards = dataset.num_shards
    if callable(num_workers):
        # a process reads its own shards when they divide evenly, else every shard (keeping 1 in N examples)
        num_workers = num_workers(num_shards // num_processes if num_shards % num_processes == 0 else num_shards)
    readers = num_processes * max(1, num_workers)
    if num_shards % num_processes != 0 or num_shards // num_processes < max(1, num_workers):
        consequence = []
        if num_shards % num_processes != 0:
            consequence.append("every process reads every shard and keeps 1 example in " + str(num_processes))
        if num_shards // num_processes < max(1, num_workers):
            consequence.append("some loader workers get no shard and stay idle")
        logger.warning(
            "The dataset %r has %d shard(s) for %d process(es) x %d worker(s) = %d readers, so %s; to fix it, "
            "write the data as at least %d (a multiple of %d) parquet or webdataset files "
            "(e.g. scripts/prepare_fashion_mnist.py --num_shards %d), or for a local dataset loaded with "
            "streaming=False use dataset.to_iterable_dataset(num_shards=%d).",
            dataset_name,
            num_shards,
            num_processes,
            max(1, num_workers),
            readers,
            " and ".join(consequence),
            readers,
            num_processes,
            readers,
            readers,
        )

    if num_processes > 1:
        dataset = split_dataset_by_node(dataset, rank=process_index, world_size=num_processes)

    stream = _MultiCropStream(
        dataset,
        augmentation,
        batch_size=batch_size,
        image_column=image_column,
        shuffle_buffer_size=shuffle_buffer_size,
        seed=seed,
        process_index=process_index,
        drop_last=drop_last,
        min_image_size=min_image_size,
        working_size=working_size,
    )
    return DinoDataLoader(
        stream,
        num_workers=num_workers,
        num_examples=per_process_examples,
        num_processes=num_processes,
        pin_memory=pin_memory,
        prefetch_factor=prefetch_factor,
    )


# --------------------------------------------------------------------------------------------------
# The training loop's endless stream over epochs
# --------------------------------------------------------------------------------------------------
class BatchStream:
    """Endless stream of micro-batches over epochs of a `DinoDataLoader`, with its wait time.

    ``augment`` (a `DeviceMultiCrop`, for a decode-only loader) turns each loader batch into crops on
    the training device; its time is not counted as waiting for data. ``masks`` (a
    `dino_hf.data.masking.MaskSampler`, with iBOT) adds the global crops' patch masks to each batch.
    ``state_dict`` gives the exact position (epoch, the loader's own state, the augmentation's and the
    masks' generators) for checkpoints.
    """

    def __init__(
        self, loader: DinoDataLoader, flag: str = "--dataset_name", augment: DeviceMultiCrop | None = None,
        masks: MaskSampler | None = None,
    ) -> None:
        self.loader = loader
        self.augment = augment
        self.masks = masks
        self.epoch = 0
        self.wait_seconds = 0.0
        self.micro_batches = 0
        self._flag = flag
        self._iterator: Iterator[dict[str, Any]] | None = None
        self._batches_this_epoch = 0
        self._empty_epochs = 0

    def start(self) -> None:
        """Create the iterator of the current epoch (call once, after `load_state_dict` if resuming)."""
        self.loader.set_epoch(self.epoch)
        with torch.random.fork_rng(devices=[]):
            self._iterator = iter(self.loader)
        self._batches_this_epoch = 0

    def __call__(self) -> dict[str, Any]:
        if self._iterator is None:
            self.start()
        started = time.perf_counter()
        while True:
            try:
                # The loader must not move the training's random streams (e.g. a DataLoader draws
                # its base seed from the global generator when an epoch's iterator starts): with
                # the CPU generator forked, a resumed run draws the same drop-path masks.
                with torch.random.fork_rng(devices=[]):
                    batch = next(self._iterator)
                break
            except StopIteration:
                self._empty_epochs = self._empty_epochs + 1 if self._batches_this_epoch == 0 else 0
                if self._empty_epochs >= 2:  # one empty pass is normal after resuming at an epoch's end
                    raise RunError(self._empty_epoch_message()) from None
                self.epoch += 1
                self.start()
        self._batches_this_epoch += 1
        self.micro_batches += 1
        self.wait_seconds += time.perf_counter() - started
        if self.augment is not None:
            batch = self.augment(batch)
        return batch if self.masks is None else self.masks(batch)

    def close(self) -> None:
        """Stop the loader's workers (at the end of training; `start` would begin a new pass)."""
        if self._iterator is not None:
            self._iterator.close()
            self._iterator = None
        self.loader.close()

    def _empty_epoch_message(self) -> str:
        decoded, bad, last_error = self.loader.epoch_image_counts()
        if decoded == 0 and bad > 0:
            return (f"{self._flag} yielded no readable image in a whole epoch: all {bad} images read were bad "
                    f"(missing, undecodable, truncated or too small; last: {last_error}): check or replace the data.")
        bad_text = f" and {bad} bad ones" if bad else ""
        return (f"{self._flag} yielded no complete batch in a whole epoch ({decoded} readable images{bad_text}, split "
                f"over {self.loader.num_roles} loader worker(s)): lower --per_device_train_batch_size "
                f"({self.loader.batch_size}) or --dataloader_num_workers, or add images.")

    def state_dict(self) -> dict[str, Any]:
        state = {"epoch": self.epoch, "loader": self.loader.state_dict()}
        if self.augment is not None:
            state["augmentation"] = self.augment.state_dict()
        if self.masks is not None:
            state["masks"] = self.masks.state_dict()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if (self.augment is None) != ("augmentation" not in state):
            raise ValueError(
                "The checkpoint was written with a different --augmentation_device (loader versus cpu/cuda): "
                "resume with the setting it was trained with."
            )
        if (self.masks is None) != ("masks" not in state):
            raise ValueError(
                "The checkpoint was written with iBOT masking on in one and off in the other (--ibot_loss_weight): "
                "resume with the setting it was trained with."
            )
        self.epoch = int(state["epoch"])
        self.loader.set_epoch(self.epoch)
        self.loader.load_state_dict(state["loader"])
        if self.augment is not None:
            self.augment.load_state_dict(state["augmentation"])
        if self.masks is not None:
            self.masks.load_state_dict(state["masks"])

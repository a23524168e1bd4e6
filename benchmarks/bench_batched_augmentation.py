"""Source images/s of the batched multi-crop augmentation against the official per-image PIL pipeline.

All variants augment the same decoded images (``--image_size`` square RGB, smooth gradients plus
noise; decoding is excluded for every variant) into 2 global + ``--num_local_crops`` local views
stacked crop-major, as the model takes them:

- ``reference``: the official ``DataAugmentationDINO`` (facebookresearch/dino ``main_dino.py``)
  written out with torchvision v1 transforms on PIL images, one image at a time, then the views
  stacked crop-major (what the DataLoader's collate does). Single-threaded, as one loader worker.
- ``per_image``: ``dino_hf.data.augmentation.MultiCropAugmentation`` on uint8 tensors, one image at a
  time (skipped when that module is unavailable).
- ``batched_cpu_1thread`` / ``batched_cpu``: ``BatchedMultiCropAugmentation`` on the whole
  ``(B, 3, S, S)`` uint8 batch on the CPU with 1 thread (per-core comparison) and with all threads.
- ``batched_cuda`` (when CUDA is available): the same on the GPU, the uint8 batch already on the
  device; ``batched_cuda_with_transfer`` adds the pinned host-to-device copy of the uint8 batch.

Variants run interleaved (rotating which goes first); the median of ``--repeats`` batches is
reported after one untimed warm-up batch each.

    .venv/bin/python benchmarks/bench_batched_augmentation.py                # 2x224 + 8x96 from 256 px, batch 32
    .venv/bin/python benchmarks/bench_batched_augmentation.py --num_local_crops 10 --batch_size 64 --device cuda
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the helper modules in benchmarks/
from official_dino import DataAugmentationDINO
from recording import record_result, write_metrics_json

from dino_hf.data.batched_augmentation import BatchedMultiCropAugmentation


def stack_crop_major(views_per_image: list[list[torch.Tensor]], num_global: int = 2) -> dict[str, torch.Tensor | None]:
    """The collate: ``(G, B, 3, H, W)`` global and ``(N, B, 3, h, w)`` local crops."""
    per_view = list(zip(*views_per_image, strict=True))
    global_crops = torch.stack([torch.stack(view) for view in per_view[:num_global]])
    local = per_view[num_global:]
    return {
        "global_crops": global_crops,
        "local_crops": torch.stack([torch.stack(v) for v in local]) if local else None,
    }


# --------------------------------------------------------------------------------------------------
# Benchmark
# --------------------------------------------------------------------------------------------------
def make_images(batch_size: int, size: int, seed: int = 0) -> np.ndarray:
    """``(B, S, S, 3)`` uint8: smooth colour gradients with noise (not compressible to a constant)."""
    rng = np.random.default_rng(seed)
    coordinates = np.linspace(0.0, 1.0, size, dtype=np.float32)
    rows, columns = np.meshgrid(coordinates, coordinates, indexing="ij")
    images = np.empty((batch_size, size, size, 3), dtype=np.uint8)
    for index in range(batch_size):
        phase = rng.uniform(0, 2 * np.pi, size=3)
        frequency = rng.uniform(1, 6, size=3)
        smooth = np.sin(frequency * (rows[..., None] + 0.5 * columns[..., None]) * np.pi + phase) * 0.4 + 0.5
        noise = rng.normal(0, 0.08, size=(size, size, 3))
        images[index] = np.clip((smooth + noise) * 255, 0, 255).astype(np.uint8)
    return images


def _timed(function: Callable[[], object], synchronize: Callable[[], None]) -> float:
    synchronize()
    start = time.perf_counter()
    function()
    synchronize()
    return time.perf_counter() - start


def _with_threads(threads: int, function: Callable[[], object]) -> Callable[[], object]:
    def run() -> object:
        previous = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            return function()
        finally:
            torch.set_num_threads(previous)

    return run


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch_size", type=int, default=32, help="Source images per batch.")
    parser.add_argument("--image_size", type=int, default=256, help="Side of the decoded working images.")
    parser.add_argument("--global_crop_size", type=int, default=224)
    parser.add_argument("--local_crop_size", type=int, default=96)
    parser.add_argument("--num_local_crops", type=int, default=8)
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch intra-op threads of the batched_cpu variant (default: torch's); use 1 on an oversubscribed CPU.",
    )
    parser.add_argument("--repeats", type=int, default=3, help="Timed batches per variant (median reported).")
    parser.add_argument("--device", default="auto", help="cpu, cuda or auto: CUDA variants run when CUDA is available.")
    parser.add_argument("--skip_reference", action="store_true", help="Skip the per-image variants (GPU runs).")
    parser.add_argument(
        "--results_file", type=Path, default=None, help="Table to append to (default benchmarks/RESULTS.md)."
    )
    parser.add_argument("--json_output", type=Path, default=None, help="Also write the metrics as JSON here.")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    use_cuda = torch.cuda.is_available() if args.device == "auto" else args.device.startswith("cuda")
    images = make_images(args.batch_size, args.image_size)
    pil_images = [Image.fromarray(image) for image in images]
    batch = torch.from_numpy(images).permute(0, 3, 1, 2).contiguous()  # (B, 3, S, S) uint8
    local_crop_scale = (0.05, 0.4)
    global_crop_scale = (0.4, 1.0)
    batched = BatchedMultiCropAugmentation(
        global_crop_size=args.global_crop_size,
        local_crop_size=args.local_crop_size,
        num_local_crops=args.num_local_crops,
        global_crop_scale=global_crop_scale,
        local_crop_scale=local_crop_scale,
    )
    random.seed(0)
    torch.manual_seed(0)

    variants: dict[str, Callable[[], object]] = {}
    synchronizers: dict[str, Callable[[], None]] = {}
    if not args.skip_reference:
        official = DataAugmentationDINO(
            global_crop_scale, local_crop_scale, args.num_local_crops, args.global_crop_size, args.local_crop_size
        )
        variants["reference"] = _with_threads(1, lambda: stack_crop_major([official(image) for image in pil_images]))
        try:
            from dino_hf.data.augmentation import MultiCropAugmentation
        except ImportError:  # the per-image module is optional for this benchmark
            MultiCropAugmentation = None
        if MultiCropAugmentation is not None:
            per_image = MultiCropAugmentation(
                global_crop_size=args.global_crop_size,
                local_crop_size=args.local_crop_size,
                num_local_crops=args.num_local_crops,
            )
            tensors = list(batch.unbind(0))
            variants["per_image"] = _with_threads(1, lambda: stack_crop_major([per_image(t) for t in tensors]))
    variants["batched_cpu_1thread"] = _with_threads(1, lambda: batched(batch))
    variants["batched_cpu"] = lambda: batched(batch)
    if use_cuda:
        device = torch.device("cuda" if args.device == "auto" else args.device)
        on_device = batch.to(device)
        pinned = batch.pin_memory()
        variants["batched_cuda"] = lambda: batched(on_device)
        variants["batched_cuda_with_transfer"] = lambda: batched(pinned.to(device, non_blocking=True))
        for name in ("batched_cuda", "batched_cuda_with_transfer"):
            synchronizers[name] = lambda: torch.cuda.synchronize(device)

    names = list(variants)
    for name in names:  # warm-up
        _timed(variants[name], synchronizers.get(name, lambda: None))
    seconds: dict[str, list[float]] = {name: [] for name in names}
    for repeat in range(args.repeats):
        for name in names[repeat % len(names) :] + names[: repeat % len(names)]:
            seconds[name].append(_timed(variants[name], synchronizers.get(name, lambda: None)))

    metrics: dict = {
        "crops": f"2x{args.global_crop_size}+{args.num_local_crops}x{args.local_crop_size}",
        "image_size": args.image_size,
        "batch_size": args.batch_size,
        "threads": torch.get_num_threads(),
        "load_average_1min": os.getloadavg()[0],  # other work on a shared machine skews timings
    }
    for name in names:
        metrics[f"{name}_images_per_second"] = args.batch_size / statistics.median(seconds[name])
    if "reference" in names:
        reference = metrics["reference_images_per_second"]
        for name in names:
            if name != "reference":
                metrics[f"speedup_{name}_vs_reference"] = metrics[f"{name}_images_per_second"] / reference
    if use_cuda:
        metrics["cuda_device"] = torch.cuda.get_device_name(device)
    command = "python benchmarks/bench_batched_augmentation.py " + " ".join(argv if argv is not None else sys.argv[1:])
    notes = (
        "source images/s, same decoded images for all; reference = official DataAugmentationDINO "
        "(torchvision v1 on PIL, 1 thread) + crop-major stack; batched = BatchedMultiCropAugmentation on the "
        "uint8 batch (antialiased bicubic via per-view resampling matrices, per-view random parameters)"
    )
    record_result("bench_batched_augmentation", command.strip(), metrics, notes=notes, results_path=args.results_file)
    write_metrics_json(metrics, args.json_output)
    return metrics


if __name__ == "__main__":
    main()

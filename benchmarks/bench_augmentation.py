"""Source images per second of ``MultiCropAugmentation`` against the official PIL pipeline, plus loader throughput.

Part 1 (one process, one thread): both pipelines turn the same encoded JPEG images into
2 x 224 px + 8 x 96 px normalised float views, decoding included. The reference is written here in
the style of facebookresearch/dino ``DataAugmentationDINO``: torchvision v1 transforms on PIL images
(RandomResizedCrop bicubic, RandomHorizontalFlip, RandomApply(ColorJitter(0.4, 0.4, 0.2, 0.1), 0.8),
RandomGrayscale(0.2), PIL GaussianBlur p 1.0 / 0.1 / 0.5, PIL solarize p 0.2 on global 2, ToTensor,
Normalize). Runs alternate between the two; the median of ``--repeats`` passes is compared.

Part 2: end-to-end ``create_train_dataloader`` throughput (source images per second over one epoch,
worker start-up included) from parquet shards holding the same JPEGs, with 0 and 2 loader workers.

    .venv/bin/python benchmarks/bench_augmentation.py            # 48 synthetic 500x375 JPEGs
"""

from __future__ import annotations

import argparse
import io
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the helper modules in benchmarks/
from official_dino import DataAugmentationDINO
from recording import record_result
from synthetic_images import make_jpegs, write_parquet

from dino_hf.data.augmentation import MultiCropAugmentation
from dino_hf.data.loader import create_train_dataloader


# ------------------------------------------------------------------------------------------------
# Data
# ------------------------------------------------------------------------------------------------
def decode(data: bytes) -> Image.Image:
    return Image.open(io.BytesIO(data)).convert("RGB")  # the official pil_loader


# ------------------------------------------------------------------------------------------------
# Measurements
# ------------------------------------------------------------------------------------------------
def time_pass(function, images: list[bytes]) -> float:
    start = time.perf_counter()
    for data in images:
        function(data)
    return time.perf_counter() - start


def loader_images_per_second(path: Path, num_workers: int, batch_size: int, repeats: int) -> float:
    rates = []
    for epoch in range(repeats):
        loader = create_train_dataloader(
            str(path),
            augmentation=MultiCropAugmentation(),
            batch_size=batch_size,
            num_workers=num_workers,
            seed=0,
            drop_last=False,
        )
        loader.set_epoch(epoch)
        start = time.perf_counter()
        images = sum(batch["global_crops"].shape[1] for batch in loader)
        rates.append(images / (time.perf_counter() - start))
    return statistics.median(rates)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num_images", type=int, default=48, help="Source images per pass.")
    parser.add_argument("--width", type=int, default=500, help="Source width (ImageNet's typical 500x375).")
    parser.add_argument("--height", type=int, default=375)
    parser.add_argument("--repeats", type=int, default=5, help="Timed passes per pipeline (median reported).")
    parser.add_argument("--batch_size", type=int, default=16, help="Loader batch size (part 2).")
    parser.add_argument("--num_shards", type=int, default=4, help="Parquet shards (part 2).")
    parser.add_argument(
        "--loader_images", type=int, default=192, help="Images in the parquet shards (part 2; the JPEGs repeated)."
    )
    parser.add_argument("--loader_repeats", type=int, default=2, help="Epochs timed per loader setting.")
    args = parser.parse_args()

    torch.set_num_threads(1)  # one process, one core: what each loader worker gets
    images = make_jpegs(args.num_images, args.width, args.height)
    ours_augmentation = MultiCropAugmentation()
    reference_augmentation = DataAugmentationDINO((0.4, 1.0), (0.05, 0.4), 8)  # the official defaults

    def ours(data: bytes) -> list[torch.Tensor]:
        return ours_augmentation(Image.open(io.BytesIO(data)))

    def reference(data: bytes) -> list[torch.Tensor]:
        return reference_augmentation(decode(data))

    ours_views, reference_views = ours(images[0]), reference(images[0])
    assert [v.shape for v in ours_views] == [v.shape for v in reference_views], "pipelines disagree on shapes"
    time_pass(ours, images[:4]), time_pass(reference, images[:4])  # warm-up
    ours_times, reference_times = [], []
    for repeat in range(args.repeats):
        pair = [(ours, ours_times), (reference, reference_times)]
        for function, times in pair if repeat % 2 == 0 else pair[::-1]:
            times.append(time_pass(function, images))
    ours_rate = args.num_images / statistics.median(ours_times)
    reference_rate = args.num_images / statistics.median(reference_times)
    print(f"augmentation: ours {ours_rate:.1f} images/s, official PIL {reference_rate:.1f} images/s", flush=True)

    with tempfile.TemporaryDirectory() as directory:
        repeated = [images[i % len(images)] for i in range(args.loader_images)]
        path = write_parquet(repeated, Path(directory), args.num_shards)
        loader_rates = {
            workers: loader_images_per_second(path, workers, args.batch_size, args.loader_repeats) for workers in (0, 2)
        }
    print(f"loader: {loader_rates[0]:.1f} images/s with 0 workers, {loader_rates[2]:.1f} with 2", flush=True)

    record_result(
        "bench_augmentation",
        ".venv/bin/python benchmarks/bench_augmentation.py " + " ".join(sys.argv[1:]),
        {
            "views": "2x224+8x96",
            "source": f"{args.num_images} JPEG {args.width}x{args.height}",
            "threads": 1,
            "repeats": args.repeats,
            "ours_images_per_s": ours_rate,
            "official_pil_images_per_s": reference_rate,
            "speedup": ours_rate / reference_rate,
            "loader_0_workers_images_per_s": loader_rates[0],
            "loader_2_workers_images_per_s": loader_rates[2],
            "loader_images": args.loader_images,
            "loader_batch_size": args.batch_size,
            "parquet_shards": args.num_shards,
        },
        notes="decode included in both; reference = DataAugmentationDINO of facebookresearch/dino (PIL, "
        "torchvision v1); loader = create_train_dataloader over parquet shards, one epoch, start-up included",
    )


if __name__ == "__main__":
    main()

"""Write Fashion-MNIST as sharded parquet (``image`` PNG + ``label`` ClassLabel) that ``datasets`` streams.

Reads the IDX files of the Debian package ``dataset-fashion-mnist`` (``/usr/share/datasets/fashion-mnist``)
and writes::

    OUTPUT_DIR/data/train-0000k-of-0000n.parquet   (60,000 images)
    OUTPUT_DIR/data/test-0000k-of-0000n.parquet    (10,000 images)

``datasets.load_dataset(OUTPUT_DIR, split="train", streaming=True)`` then streams it, with one shard per
file: use at least ``processes x loader workers`` shards.

Example::

    apt-get install -y dataset-fashion-mnist
    python scripts/prepare_fashion_mnist.py --output_dir data/fashion_mnist --num_shards 8
"""

from __future__ import annotations

import argparse
import gzip
import io
import struct
import sys
from pathlib import Path

import numpy as np

DEFAULT_SOURCE_DIR = "/usr/share/datasets/fashion-mnist"
CLASS_NAMES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]
SPLIT_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}


def read_idx(path: Path) -> np.ndarray:
    """Read a (gzipped) IDX file of unsigned bytes: images (N, 28, 28) or labels (N,)."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as stream:
        data = stream.read()
    zero, dtype_code, num_dims = struct.unpack(">HBB", data[:4])
    if zero != 0 or dtype_code != 0x08:
        raise ValueError(f"{path} is not an unsigned-byte IDX file.")
    shape = struct.unpack(">" + "I" * num_dims, data[4 : 4 + 4 * num_dims])
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * num_dims).reshape(shape)


def encode_png(pixels: np.ndarray) -> bytes:
    """PNG bytes of one (28, 28) grayscale image."""
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def write_split(images: np.ndarray, labels: np.ndarray, output_dir: Path, split: str, num_shards: int) -> list[Path]:
    """Write ``split`` as ``num_shards`` parquet files carrying the ``datasets`` feature metadata."""
    import datasets
    import pyarrow.parquet as pq

    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=CLASS_NAMES)})
    num_shards = max(1, min(num_shards, len(images)))
    bounds = np.linspace(0, len(images), num_shards + 1).astype(int)
    paths = []
    for shard, (start, end) in enumerate(zip(bounds[:-1], bounds[1:], strict=True)):
        rows = {
            "image": [{"bytes": encode_png(image), "path": None} for image in images[start:end]],
            "label": [int(label) for label in labels[start:end]],
        }
        table = datasets.Dataset.from_dict(rows, features=features).data.table  # keeps the feature metadata
        path = output_dir / "data" / f"{split}-{shard:05d}-of-{num_shards:05d}.parquet"
        pq.write_table(table, path)
        paths.append(path)
    return paths


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output_dir", required=True, help="Folder to write data/{train,test}-*.parquet into.")
    parser.add_argument(
        "--num_shards",
        type=int,
        default=8,
        help="Parquet files per split (default 8). Each file is one streaming shard: use at least "
        "processes x dataloader workers, ideally a multiple of it, or some workers idle.",
    )
    parser.add_argument(
        "--source_dir",
        default=DEFAULT_SOURCE_DIR,
        help=f"Folder with the four *-idx?-ubyte.gz files (default: the Debian package's {DEFAULT_SOURCE_DIR}).",
    )
    parser.add_argument(
        "--max_train_samples", type=int, default=None, help="Keep only the first N training images (quick demos)."
    )
    parser.add_argument("--max_test_samples", type=int, default=None, help="Keep only the first N test images.")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    source_dir = Path(args.source_dir)
    missing = [name for files in SPLIT_FILES.values() for name in files if not (source_dir / name).is_file()]
    if missing:
        print(
            f"Fashion-MNIST files not found in {source_dir} (missing {', '.join(missing)}). Install them with:\n"
            "    apt-get install -y dataset-fashion-mnist\n"
            "or pass --source_dir pointing at a folder with the original *-idx?-ubyte.gz files.",
            file=sys.stderr,
        )
        return 1
    if args.num_shards < 1:
        print("--num_shards must be at least 1.", file=sys.stderr)
        return 2
    output_dir = Path(args.output_dir)
    (output_dir / "data").mkdir(parents=True, exist_ok=True)
    for stale in (output_dir / "data").glob("*.parquet"):  # a re-run with another shard count replaces them
        stale.unlink()
    limits = {"train": args.max_train_samples, "test": args.max_test_samples}
    for split, (image_file, label_file) in SPLIT_FILES.items():
        images, labels = read_idx(source_dir / image_file), read_idx(source_dir / label_file)
        if len(images) != len(labels):
            raise ValueError(f"{split}: {len(images)} images but {len(labels)} labels.")
        if limits[split] is not None:
            images, labels = images[: limits[split]], labels[: limits[split]]
        paths = write_split(images, labels, output_dir, split, args.num_shards)
        print(f"{split}: {len(images)} images in {len(paths)} parquet shard(s) under {output_dir / 'data'}")
    (output_dir / "README.md").write_text(
        "---\nlicense: mit\npretty_name: Fashion-MNIST\n---\n\n# Fashion-MNIST (parquet)\n\n"
        "Zalando Research's Fashion-MNIST (MIT licence), 28x28 grayscale PNG in `image`, class in `label` "
        f"({', '.join(CLASS_NAMES)}). Written by dino_hf `scripts/prepare_fashion_mnist.py` from {source_dir}.\n"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())

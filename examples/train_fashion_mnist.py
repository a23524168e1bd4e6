"""DINO on Fashion-MNIST from Python: load the data with ``datasets``, train with ``DinoTrainer``, then
embed the test images and score them with a weighted 20-NN next to raw pixels.

    python scripts/prepare_fashion_mnist.py --output_dir data/fashion_mnist   # once (make demo does it too)
    python examples/train_fashion_mnist.py --minutes 3

The same run as ``dino-hf-train --config fashion_mnist_cpu`` (the recipe's settings, one code path),
shortened to ``--minutes``; ``examples/fashion_mnist.ipynb`` is this script as a notebook, with the
curves and the attention maps.
"""

from __future__ import annotations

import argparse

import datasets
import numpy as np
import torch

from dino_hf import DinoTrainer, DinoTrainingArguments
from dino_hf.eval.evaluation import knn_accuracy


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data_dir", default="data/fashion_mnist", help="the prepared parquet shards")
    parser.add_argument("--output_dir", default="outputs/example")
    parser.add_argument("--minutes", type=float, default=3.0, help="training budget")
    parser.add_argument("--max_steps", type=int, default=None, help="a step count instead of the budget")
    parser.add_argument("--eval_samples", type=int, default=2000, help="k-NN memory and query images")
    options = parser.parse_args(argv)

    fashion = datasets.load_dataset(options.data_dir)  # DatasetDict: train (60k) and test (10k)
    length = {"max_steps": options.max_steps} if options.max_steps else {"max_train_minutes": options.minutes}
    args = DinoTrainingArguments.from_recipe("fashion_mnist_cpu", output_dir=options.output_dir,
                                             overwrite_output_dir=True, eval_max_samples=options.eval_samples,
                                             **length)
    trainer = DinoTrainer(args=args, train_dataset=fashion["train"], eval_dataset=fashion)
    result = trainer.train()
    print(f"trained {result.step} steps; the backbone is in {result.output_dir / 'backbone'}")

    memory = fashion["train"].shuffle(seed=0).select(range(min(options.eval_samples, len(fashion["train"]))))
    queries = fashion["test"].select(range(min(options.eval_samples, len(fashion["test"]))))
    features = {}
    for name, split in (("train", memory), ("test", queries)):
        export = trainer.embed(split, f"{options.output_dir}/embeddings_{name}", split=name, l2_normalize=True,
                               overwrite=True)
        rows = datasets.load_dataset(str(export.output_dir), split=name)
        features[name] = torch.tensor(np.asarray(rows["embedding"], dtype=np.float32))
    labels = {"train": torch.tensor(memory["label"]), "test": torch.tensor(queries["label"])}
    dino = knn_accuracy(features["train"], labels["train"], features["test"], labels["test"], k=20)[20]

    def pixels(split: datasets.Dataset) -> torch.Tensor:
        flat = torch.tensor(np.stack([np.asarray(image.convert("L"), dtype=np.float32).ravel()
                                      for image in split["image"]]))
        return torch.nn.functional.normalize(flat, dim=1)

    raw = knn_accuracy(pixels(memory), labels["train"], pixels(queries), labels["test"], k=20)[20]
    print(f"weighted 20-NN on {len(queries)} test images: DINO {dino:.3f}, raw pixels {raw:.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""A user's own training script, as the README shows it: an in-memory ``datasets.Dataset`` built from
PIL images, ``DinoTrainingArguments`` in Python and ``DinoTrainer(...).train()``.

    python tests/trainer_script.py OUTPUT_DIR [--resume] [--kill_after_checkpoint STEP]
    accelerate launch --num_processes 2 tests/trainer_script.py OUTPUT_DIR     (ACCELERATE_USE_CPU=true, --multi_gpu)

Every process builds the same data and model (fixed seeds). Each process writes
``OUTPUT_DIR/teacher_rank{r}.pt`` at the end. ``--kill_after_checkpoint STEP`` SIGKILLs the process
right after the checkpoint of optimiser step STEP is complete (the test instrumentation of
``tests/training_worker.py``).
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402
from tiny_models import tiny_dino_config  # noqa: E402

import dino_hf.train.loop as loop  # noqa: E402
from dino_hf import DinoTrainer, DinoTrainingArguments  # noqa: E402

NUM_IMAGES = 48


def in_memory_dataset():
    """48 random 40 px RGB images and labels, built in memory (no file)."""
    import datasets

    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)) for _ in range(NUM_IMAGES)]
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(num_classes=3)})
    return datasets.Dataset.from_dict({"image": images, "label": [i % 3 for i in range(NUM_IMAGES)]},
                                      features=features)


def training_args(output_dir: Path, **overrides) -> DinoTrainingArguments:
    """6 steps of batch 8 on 32/16 px crops of the tiny model (written next to the run)."""
    config_dir = output_dir.parent / f"{output_dir.name}_model_config"
    if not (config_dir / "config.json").is_file():
        tiny_dino_config().save_pretrained(config_dir)
    values = dict(output_dir=str(output_dir), model_config=str(config_dir / "config.json"), global_crop_size=32,
                  local_crop_size=16, num_local_crops=2, per_device_train_batch_size=8, max_steps=6, logging_steps=1,
                  checkpointing_steps=3, dataloader_num_workers=0, warmup_steps=1, freeze_last_layer_steps=1,
                  shuffle_buffer_size=16, mixed_precision="no", torch_num_threads="1")
    values.update(overrides)
    return DinoTrainingArguments(**values)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("output_dir", type=Path)
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--kill_after_checkpoint", type=int, default=None)
    options = parser.parse_args()

    if options.kill_after_checkpoint is not None:
        save = loop.save_checkpoint

        def save_then_die(accelerator, output_dir, step, *args, **kwargs):
            path = save(accelerator, output_dir, step, *args, **kwargs)
            if step == options.kill_after_checkpoint:
                os.kill(os.getpid(), signal.SIGKILL)
            return path

        loop.save_checkpoint = save_then_die

    trainer = DinoTrainer(args=training_args(options.output_dir), train_dataset=in_memory_dataset())
    result = trainer.train(resume_from_checkpoint="latest" if options.resume else None)
    rank = int(os.environ.get("RANK", 0))
    torch.save(result.model.teacher.state_dict(), options.output_dir / f"teacher_rank{rank}.pt")


if __name__ == "__main__":
    main()

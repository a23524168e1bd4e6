"""Runs ``scripts/train.py``'s training in a subprocess with test instrumentation.

    python tests/training_worker.py [--record DIR] [--kill_after_checkpoint STEP] -- TRAIN ARGS...

- ``--record DIR``: each process writes ``DIR/seen_rank{r}.json`` (indices of the source images it
  augmented, read from the pixel that ``tests/image_datasets.py`` stamps into every image) and
  ``DIR/teacher_rank{r}.pt`` (its teacher's state dict at the end).
- ``--kill_after_checkpoint STEP``: the process SIGKILLs itself right after the checkpoint of
  optimiser step STEP is complete (a crash with no chance to clean up).
- ``--pause_at_step STEP --pause_file PATH``: after logging optimiser step STEP, each process writes
  ``PATH.{rank}`` (its pid) and waits until it receives a stop signal or the file is deleted (at most
  120 s): a test can then signal a run at a known step, or start a second run while the first one
  is alive.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from image_datasets import read_image_index  # noqa: E402

import dino_hf.train.builders as builders  # noqa: E402
import dino_hf.train.loop as training  # noqa: E402
from dino_hf.data.augmentation import MultiCropAugmentation  # noqa: E402
from dino_hf.train.argument_parsing import parse_training_args  # noqa: E402


class RecordingAugmentation(MultiCropAugmentation):
    """Remembers the index of every source image it augments."""

    seen: list[int] = []

    def multi_crop(self, image, generator=None):
        RecordingAugmentation.seen.append(read_image_index(image))
        return super().multi_crop(image, generator)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--record", default=None)
    parser.add_argument("--kill_after_checkpoint", type=int, default=None)
    parser.add_argument("--pause_at_step", type=int, default=None)
    parser.add_argument("--pause_file", default=None)
    own, train_argv = parser.parse_known_args()
    train_argv = [arg for arg in train_argv if arg != "--"]

    if own.record:
        build = builders.build_augmentation

        def build_recording(args):
            augmentation = build(args)
            recording = RecordingAugmentation.__new__(RecordingAugmentation)
            recording.__dict__.update(augmentation.__dict__)
            return recording

        builders.build_augmentation = build_recording

    if own.kill_after_checkpoint is not None:
        save = training.save_checkpoint

        def save_then_die(accelerator, output_dir, step, *args, **kwargs):
            path = save(accelerator, output_dir, step, *args, **kwargs)
            if step == own.kill_after_checkpoint:
                os.kill(os.getpid(), signal.SIGKILL)
            return path

        training.save_checkpoint = save_then_die

    if own.pause_at_step is not None:
        log_step = training._log_step

        def log_then_pause(run, *args, **kwargs):
            log_step(run, *args, **kwargs)
            if run.step == own.pause_at_step:
                marker = Path(f"{own.pause_file}.{run.accelerator.process_index}")
                marker.write_text(str(os.getpid()))
                deadline = time.monotonic() + 120
                while marker.exists() and run.signals.received is None and time.monotonic() < deadline:
                    time.sleep(0.05)

        training._log_step = log_then_pause

    result = training.train(parse_training_args(train_argv))
    if own.record:
        rank = int(os.environ.get("RANK", "0"))
        record = Path(own.record)
        record.mkdir(parents=True, exist_ok=True)
        (record / f"seen_rank{rank}.json").write_text(json.dumps(RecordingAugmentation.seen))
        torch.save(result.model.teacher.state_dict(), record / f"teacher_rank{rank}.pt")
    sys.exit(result.exit_status)


if __name__ == "__main__":
    main()

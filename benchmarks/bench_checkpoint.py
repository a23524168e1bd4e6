#!/usr/bin/env python
"""How long a checkpoint takes to save and to verify, and what its checksums cost.

Saves a real checkpoint with ``dino_hf.train.checkpointing.save_checkpoint`` (the full DINO model: student,
teacher and center; AdamW state after one step; RNG and stream state; the completion marker with every
file's SHA-256), then measures, on the files it wrote:

- ours: the full SHA-256 manifest the marker records, and ``verify_checkpoint`` (sizes and checksums)
  with the files in the page cache (just written) and out of it (dropped with ``posix_fadvise``);
- the reference: a header-and-size digest (SHA-256 of the first and last MiB of each file plus its
  size: covers the safetensors header and the zip directory at the end of ``torch.save`` files), the
  cheaper alternative the issue suggested.

The answer decides what the marker records (full hashes if they cost little next to the save itself)
and what the README says a scheduler's grace period must allow.

    python benchmarks/bench_checkpoint.py                          # ViT-S/16, the official head
    python benchmarks/bench_checkpoint.py --preset vit_base_patch16
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shlex
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from recording import record_result  # noqa: E402

from dino_hf.models.configuration_dino import DinoConfig  # noqa: E402
from dino_hf.models.modeling_dino import DinoForPreTraining  # noqa: E402
from dino_hf.train.builders import apply_config_overrides, build_optimizer  # noqa: E402
from dino_hf.train.checkpointing import _checkpoint_files, _manifest, save_checkpoint, verify_checkpoint  # noqa: E402

_EDGE_BYTES = 1 << 20


class _StreamState:
    """The data stream's part of a checkpoint (a few hundred bytes in a real run)."""

    epoch = 0

    def state_dict(self) -> dict:
        return {"epoch": 0, "loader": {"workers": {}}}


def header_and_size_digest(folder: Path) -> dict[str, str]:
    """The reference: per file, SHA-256 of its size, first MiB and last MiB."""
    digests = {}
    for path in _checkpoint_files(folder):
        size = path.stat().st_size
        digest = hashlib.sha256(str(size).encode())
        with path.open("rb") as handle:
            digest.update(handle.read(_EDGE_BYTES))
            if size > _EDGE_BYTES:
                handle.seek(max(size - _EDGE_BYTES, _EDGE_BYTES))
                digest.update(handle.read())
        digests[path.name] = digest.hexdigest()
    return digests


def drop_from_page_cache(folder: Path) -> None:
    """Make the next read of the folder's files come from the disk (only these files' pages)."""
    for path in _checkpoint_files(folder):
        descriptor = os.open(path, os.O_RDONLY)
        try:
            os.fsync(descriptor)
            os.posix_fadvise(descriptor, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(descriptor)


def timed(function, repeats: int) -> float:
    """Median seconds of ``repeats`` calls."""
    seconds = []
    for _ in range(repeats):
        started = time.perf_counter()
        function()
        seconds.append(time.perf_counter() - started)
    return statistics.median(seconds)


def build(preset: str, overrides: str | None):
    from accelerate import Accelerator

    config = DinoConfig.from_preset(preset)
    apply_config_overrides(config, overrides)
    model = DinoForPreTraining(config)
    accelerator = Accelerator(cpu=True)
    optimizer = build_optimizer(model, torch.device("cpu"))
    model, optimizer = accelerator.prepare(model, optimizer)
    for parameter in accelerator.unwrap_model(model).student.parameters():  # AdamW state, as after a step
        parameter.grad = torch.zeros_like(parameter)
    optimizer.step()
    return accelerator


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="vit_small_patch16", help="DinoConfig preset (default: ViT-S/16).")
    parser.add_argument("--config_overrides", default=None, help="key=value changes to the preset's config.")
    parser.add_argument("--repeats", type=int, default=3, help="Saves and measurements per figure (median).")
    parser.add_argument("--output_dir", type=Path, default=None,
                        help="Where to write the checkpoints (default: a temporary folder on the system disk).")
    parser.add_argument("--results_file", type=Path, default=None, help="Table to append to (default RESULTS.md).")
    parser.add_argument("--json_output", type=Path, default=None, help="Also write the metrics as JSON here.")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    torch.manual_seed(0)
    accelerator = build(args.preset, args.config_overrides)
    with tempfile.TemporaryDirectory(dir=args.output_dir) as scratch:
        output_dir = Path(scratch) / "run"
        save_seconds = []
        for step in range(1, args.repeats + 1):
            started = time.perf_counter()
            path = save_checkpoint(accelerator, output_dir, step, _StreamState(), {"epoch": 0}, total_limit=1)
            save_seconds.append(time.perf_counter() - started)
        assert verify_checkpoint(path) is None
        size_mb = sum(file.stat().st_size for file in _checkpoint_files(path)) / 1e6
        full_hash = timed(lambda: _manifest(path), args.repeats)
        reference_hash = timed(lambda: header_and_size_digest(path), args.repeats)
        verify_warm = timed(lambda: verify_checkpoint(path), args.repeats)

        def verify_cold():
            drop_from_page_cache(path)
            verify_checkpoint(path)

        verify_cold_seconds = timed(verify_cold, args.repeats)
    save = statistics.median(save_seconds)
    metrics = {
        "preset": args.preset,
        "checkpoint_mb": round(size_mb, 1),
        "save_seconds": save,
        "full_sha256_seconds": full_hash,
        "full_sha256_fraction_of_save": full_hash / save,
        "header_and_size_seconds": reference_hash,
        "verify_warm_seconds": verify_warm,
        "verify_cold_seconds": verify_cold_seconds,
        "sha256_gb_per_second": size_mb / 1e3 / full_hash,
    }
    command = shlex.join(["python", "benchmarks/bench_checkpoint.py", *(argv if argv is not None else sys.argv[1:])])
    record_result("bench_checkpoint", command, metrics,
                  notes="save = save_checkpoint (accelerate save_state, process state, fsync, full SHA-256 manifest, "
                        "rename, prune); reference = SHA-256 of size + first and last MiB of each file",
                  results_path=args.results_file)
    if args.json_output is not None:
        args.json_output.write_text(json.dumps(metrics, indent=2) + "\n")
    return metrics


if __name__ == "__main__":
    main()

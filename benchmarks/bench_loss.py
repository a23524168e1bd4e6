"""Forward + backward time of ``DinoLoss`` against the official pairwise-loop DINO loss.

The reference is ``DINOLoss.forward`` of facebookresearch/dino: chunk the student output per crop,
then loop over teacher crops x student crops, skip the same view, one log-softmax per pair. Both
run on the same inputs, interleaved in one process (alternating which goes first), and the
median of ``--repeats`` timed runs is compared after one untimed warm-up each. The two losses and
gradients are checked to agree before anything is timed.

    .venv/bin/python benchmarks/bench_loss.py  # 2 global + 10 local crops, batch 32, K=65536
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the helper modules in benchmarks/
from official_dino import OfficialDINOLoss
from recording import record_result

from dino_hf.losses.dino import DinoLoss

STUDENT_TEMPERATURE = 0.1
TEACHER_TEMPERATURE = 0.04
CENTER_MOMENTUM = 0.9


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--batch_size", type=int, default=32, help="per-process batch (DINO: 32-64)"
    )
    parser.add_argument(
        "--num_local_crops", type=int, default=10, help="local crops besides the 2 global ones"
    )
    parser.add_argument(
        "--num_prototypes", type=int, default=65536, help="K, the head's output size"
    )
    parser.add_argument("--repeats", type=int, default=7, help="timed runs of each formulation")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    for name in ("batch_size", "num_prototypes", "repeats"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be a positive integer, got {getattr(args, name)}.")
    if args.num_local_crops < 0:
        parser.error(f"--num_local_crops must be >= 0, got {args.num_local_crops}.")
    return args


def main() -> None:
    args = parse_args()
    torch.manual_seed(args.seed)
    num_global_crops = 2
    num_crops = num_global_crops + args.num_local_crops
    shape = (num_crops, args.batch_size, args.num_prototypes)
    # DINO head logits are cosine similarities of 256-d unit vectors: std about 1 / 16
    student = (torch.randn(shape) / 16).requires_grad_(True)
    teacher = torch.randn(num_global_crops, args.batch_size, args.num_prototypes) / 16

    ours = DinoLoss(args.num_prototypes, STUDENT_TEMPERATURE, CENTER_MOMENTUM).train()
    reference = OfficialDINOLoss(args.num_prototypes, num_crops, STUDENT_TEMPERATURE, CENTER_MOMENTUM,
                                 TEACHER_TEMPERATURE)

    def run_ours() -> tuple[torch.Tensor, torch.Tensor]:
        loss = ours(student, teacher, TEACHER_TEMPERATURE)
        return loss, torch.autograd.grad(loss, student)[0]

    def run_reference() -> tuple[torch.Tensor, torch.Tensor]:
        loss = reference(student.flatten(0, 1), teacher.flatten(0, 1))
        return loss, torch.autograd.grad(loss, student)[0]

    # warm-up, and the agreement check (both centres are still zero here)
    our_loss, our_gradient = run_ours()
    reference_loss, reference_gradient = run_reference()
    loss_relative_error = abs(our_loss.item() - reference_loss.item()) / abs(reference_loss.item())
    gradient_relative_error = (
        (our_gradient - reference_gradient).abs().max() / reference_gradient.abs().max()
    ).item()
    if loss_relative_error > 1e-5 or gradient_relative_error > 1e-4:
        raise SystemExit(
            f"DinoLoss disagrees with the pairwise loop: loss {our_loss.item()} vs "
            f"{reference_loss.item()}, gradient relative error {gradient_relative_error:.3g}."
        )
    del our_gradient, reference_gradient

    timings: dict[str, list[float]] = {"ours": [], "pairwise": []}
    runners = {"ours": run_ours, "pairwise": run_reference}
    for repeat in range(args.repeats):
        order = ("ours", "pairwise") if repeat % 2 == 0 else ("pairwise", "ours")
        for name in order:
            start = time.perf_counter()
            runners[name]()
            timings[name].append(time.perf_counter() - start)

    ours_median = statistics.median(timings["ours"])
    pairwise_median = statistics.median(timings["pairwise"])
    metrics = {
        "crops": f"{num_global_crops}+{args.num_local_crops}",
        "batch_size": args.batch_size,
        "num_prototypes": args.num_prototypes,
        "dtype": "float32",
        "threads": torch.get_num_threads(),
        "repeats": args.repeats,
        "ours_median_s": ours_median,
        "pairwise_median_s": pairwise_median,
        "ours_min_s": min(timings["ours"]),
        "pairwise_min_s": min(timings["pairwise"]),
        "speedup_median": pairwise_median / ours_median,
        "loss_relative_error": loss_relative_error,
        "gradient_relative_error": gradient_relative_error,
    }
    command = " ".join([".venv/bin/python benchmarks/bench_loss.py", *sys.argv[1:]])
    record_result(
        "bench_loss",
        command,
        metrics,
        notes=(
            "forward+backward incl. teacher softmax and centre update, CPU fp32; reference = "
            "official pairwise loop (chunk student, teacher x student crops, skip same view)"
        ),
    )


if __name__ == "__main__":
    main()

"""Time to quality against the peer: minutes of this machine's CPU cores until DINO beats raw pixels on
Fashion-MNIST, dino_hf against lightly's DINO, side by side in one invocation.

Both arms train the same network (the recipe's backbone and DINO head sizes, built from the same
``DinoConfig``, freshly initialised with the same seed) on the 60,000 Fashion-MNIST training images for
``--budget_minutes`` of wall clock each, one after the other, with the same recipe values: crops, batch,
K, head (batch norm or not), temperatures, teacher momentum 0.99 -> 1, peak learning rate, warm-up, weight
decay 0.04 -> 0.4, clipping, and the precision dino_hf's start-up probe chose on this machine:

- ``dino_hf``: :class:`dino_hf.DinoTrainer` with ``DinoTrainingArguments.from_recipe(RECIPE,
  max_train_minutes=budget)`` (its own calibration and re-plans fit every schedule to the budget);
- ``lightly``: the training loop of lightly's DINO example (``examples/pytorch/dino.py``) made as fair as
  we could: ``lightly.transforms.DINOTransform`` (PIL, per image) in a torch ``DataLoader`` with
  ``--lightly_workers`` worker processes (the compute threads take the other cores),
  ``lightly.models.modules.DINOProjectionHead`` (batch norm as the recipe), ``lightly.loss.DINOLoss``,
  ``lightly.models.utils.update_momentum`` and ``lightly.utils.scheduler.cosine_schedule`` for the teacher
  momentum, the learning-rate warm-up and cosine, the weight-decay cosine, AdamW over lightly's
  ``get_weight_decay_parameters`` groups, ``clip_grad_norm_`` and the teacher head started from the
  student's weights (as the official code; lightly's example starts it afresh). lightly has no time
  budget: its schedules are planned from a calibration of its own step time (not counted in its
  minutes), as dino_hf plans its own.

Each arm saves its teacher backbone at every ``--mark_minutes`` of training time; afterwards every
snapshot is scored with the official k-NN protocol (weighted 20-NN, T 0.07, L2-normalised features, all
60,000 training images as memory, the 10,000 test images classified). Time to quality = the first
training minute at which the teacher's 20-NN reaches the raw-pixel figure (0.846), linearly interpolated
between snapshots; "not reached" when no snapshot did. One row in ``benchmarks/RESULTS.md``.

    .venv/bin/python benchmarks/time_to_quality.py       # 2 x 8 minutes + scoring (make bench-time-to-quality)
    .venv/bin/python benchmarks/time_to_quality.py --budget_minutes 0.5 --mark_minutes 0.25 --no_record  # smoke
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))  # the helper modules in benchmarks/
sys.path.insert(0, str(REPO_ROOT / "scripts"))  # scripts/demo_summary.py (data loading, k-NN scoring)
from recording import publish  # noqa: E402

BENCHMARK = "time_to_quality"
DEMO_RECIPE = "fashion_mnist_resnet_cpu"
ARMS = ("dino_hf", "lightly")
SNAPSHOTS = "snapshots"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--recipe", default=DEMO_RECIPE, help="Shipped recipe name or YAML (make demo's by default).")
    parser.add_argument("--budget_minutes", type=float, default=8.0, help="Training wall clock of each arm.")
    parser.add_argument("--mark_minutes", type=float, default=1.0, help="A teacher snapshot every this many minutes.")
    parser.add_argument("--arms", nargs="+", default=list(ARMS), choices=ARMS)
    parser.add_argument("--data_dir", default=str(REPO_ROOT / "data" / "fashion_mnist"))
    parser.add_argument("--output_dir", default=str(REPO_ROOT / "outputs" / "time_to_quality"))
    parser.add_argument("--lightly_workers", type=int, default=1,
                        help="DataLoader workers of the lightly arm (its per-image PIL transforms need one).")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no_record", action="store_true", help="Print the row instead of writing RESULTS.md.")
    parser.add_argument("--run_arm", choices=ARMS, help=argparse.SUPPRESS)  # one arm, in its own process
    parser.add_argument("--precision", default="no", help=argparse.SUPPRESS)  # the lightly arm's autocast
    args = parser.parse_args(argv)
    if args.budget_minutes <= 0 or args.mark_minutes <= 0:
        parser.error("--budget_minutes and --mark_minutes must be positive.")
    return args


# --------------------------------------------------------------------------------------------------
# Snapshots at wall-clock marks (both arms)
# --------------------------------------------------------------------------------------------------
class Snapshots:
    """Saves a backbone's weights each time training time passes a mark (``mark_seconds`` apart)."""

    def __init__(self, folder: Path, mark_seconds: float) -> None:
        self.folder, self.mark_seconds = folder, mark_seconds
        self.folder.mkdir(parents=True, exist_ok=True)
        self.started: float | None = None
        self.taken: list[dict] = []

    def start(self) -> None:
        self.started = time.monotonic()

    def elapsed(self) -> float:
        return time.monotonic() - self.started

    def maybe_take(self, backbone, step: int, force: bool = False) -> None:
        """Save ``backbone``'s state when the next mark is passed (or ``force``: the end of the run)."""
        from safetensors.torch import save_file

        elapsed = self.elapsed()
        if not force and elapsed < self.mark_seconds * (len(self.taken) + 1):
            return
        if force and self.taken and self.taken[-1]["step"] == step:
            return  # the last mark fell on the last step
        state = {name: tensor.detach().float().cpu().contiguous() for name, tensor in backbone.state_dict().items()}
        path = self.folder / f"snapshot_{len(self.taken):03d}.safetensors"
        save_file(state, str(path))
        self.taken.append({"path": path.name, "seconds": round(elapsed, 2), "step": step})

    def write(self, facts: dict) -> None:
        (self.folder.parent / "arm.json").write_text(json.dumps({**facts, "snapshots": self.taken}, indent=2))


# --------------------------------------------------------------------------------------------------
# dino_hf arm
# --------------------------------------------------------------------------------------------------
def run_dino_hf(args: argparse.Namespace, arm_dir: Path) -> None:
    from transformers import TrainerCallback

    from dino_hf import DinoTrainer, DinoTrainingArguments

    snapshots = Snapshots(arm_dir / SNAPSHOTS, args.mark_minutes * 60)

    class SnapshotCallback(TrainerCallback):
        def on_train_begin(self, training_args, state, control, **kwargs):
            snapshots.start()

        def on_step_end(self, training_args, state, control, model=None, **kwargs):
            snapshots.maybe_take(model.teacher.backbone, state.global_step)

        def on_train_end(self, training_args, state, control, model=None, **kwargs):
            snapshots.maybe_take(model.teacher.backbone, state.global_step, force=True)

    training_args = DinoTrainingArguments.from_recipe(
        args.recipe, output_dir=str(arm_dir / "run"), overwrite_output_dir=True, dataset_name=args.data_dir,
        max_train_minutes=args.budget_minutes, eval_dataset_name=None, report_to="none", seed=args.seed,
        checkpointing_steps=10**9,
    )
    trainer = DinoTrainer(args=training_args, callbacks=[SnapshotCallback()])
    trainer.train()
    recorded = json.loads((arm_dir / "run" / "training_args.json").read_text())
    snapshots.write({"steps": recorded.get("planned_total_steps"), "precision": recorded.get("resolved_mixed_precision"),
                     "threads": recorded.get("resolved_torch_num_threads"), "seconds": round(snapshots.elapsed(), 1)})


# --------------------------------------------------------------------------------------------------
# lightly arm
# --------------------------------------------------------------------------------------------------
def recipe_values(recipe: str):
    """The recipe's ``DinoTrainingArguments`` and ``DinoConfig`` (what both arms train)."""
    from dino_hf import DinoTrainingArguments
    from dino_hf.train.builders import build_model_config

    training_args = DinoTrainingArguments.from_recipe(recipe, output_dir="unused")
    return training_args, build_model_config(training_args)


class FashionMnistImages:
    """The training split as PIL images through a transform (a map-style dataset for a torch DataLoader)."""

    def __init__(self, data_dir: Path, transform) -> None:
        from demo_summary import load_split

        self.pixels, _ = load_split(data_dir, "train")
        self.transform = transform

    def __len__(self) -> int:
        return len(self.pixels)

    def __getitem__(self, index: int):
        from PIL import Image

        return self.transform(Image.fromarray(self.pixels[index, 0].numpy()).convert("RGB"))


class LightlyDino:
    """Student and teacher of lightly's DINO example on the recipe's backbone: ``backbone -> embedding ->
    DINOProjectionHead``; the teacher is a copy without gradients (its head loaded with the student's weights)."""

    def __init__(self, config) -> None:
        import copy

        import torch
        from lightly.models.modules import DINOProjectionHead
        from lightly.models.utils import deactivate_requires_grad

        from dino_hf.models.backbones import family_of

        backbone_config = config.backbone_config
        self.student_backbone = family_of(backbone_config).build(backbone_config, config.drop_path_rate)
        self.teacher_backbone = copy.deepcopy(self.student_backbone)
        embedding_size = self.embed(self.student_backbone, torch.zeros(2, 3, 28, 28)).shape[-1]
        head_sizes = dict(input_dim=embedding_size, hidden_dim=config.head_hidden_size,
                          bottleneck_dim=config.head_bottleneck_size, output_dim=config.num_prototypes,
                          batch_norm=config.head_use_batch_norm)
        self.student_head = DINOProjectionHead(**head_sizes)
        self.teacher_head = DINOProjectionHead(**head_sizes)  # deepcopy of a weight-normed layer fails
        self.teacher_head.load_state_dict(self.student_head.state_dict())
        deactivate_requires_grad(self.teacher_backbone)
        deactivate_requires_grad(self.teacher_head)

    @staticmethod
    def embed(backbone, pixel_values):
        """(B, 3, H, W) -> (B, D): what a lightly user takes from a transformers backbone (pooled / CLS)."""
        from dino_hf.models.backbones import backbone_embedding, backbone_forward

        return backbone_embedding(backbone, backbone_forward(backbone, pixel_values))

    def student(self, global_views, local_views):
        """One backbone call per crop size, one head call on all (the official MultiCropWrapper; the head's
        batch norm sees every crop)."""
        import torch

        features = [self.embed(self.student_backbone, global_views), self.embed(self.student_backbone, local_views)]
        return self.student_head(torch.cat(features))

    def teacher(self, views):
        return self.teacher_head(self.embed(self.teacher_backbone, views))


def lightly_loader(args: argparse.Namespace, training_args):
    import torch
    from lightly.transforms import DINOTransform

    transform = DINOTransform(
        global_crop_size=training_args.global_crop_size, global_crop_scale=tuple(training_args.global_crop_scale),
        local_crop_size=training_args.local_crop_size, local_crop_scale=tuple(training_args.local_crop_scale),
        n_local_views=training_args.num_local_crops,
    )
    return torch.utils.data.DataLoader(
        FashionMnistImages(Path(args.data_dir), transform), batch_size=training_args.per_device_train_batch_size,
        shuffle=True, drop_last=True, num_workers=args.lightly_workers, persistent_workers=args.lightly_workers > 0,
        generator=torch.Generator().manual_seed(args.seed),
    )


def lightly_steps(args: argparse.Namespace, training_args, config, total_steps: int, snapshots: Snapshots | None,
                  seconds: float | None):
    """Train a fresh lightly DINO for ``total_steps`` (schedules over them) or until ``seconds`` pass;
    returns the steps run and the clock at the end of each (the calibration reads them)."""
    import contextlib

    import torch
    from lightly.loss import DINOLoss
    from lightly.models.utils import get_weight_decay_parameters, update_momentum
    from lightly.utils.scheduler import cosine_schedule

    torch.manual_seed(args.seed)
    model = LightlyDino(config)
    criterion = DINOLoss(output_dim=config.num_prototypes, warmup_teacher_temp=training_args.warmup_teacher_temperature,
                         teacher_temp=training_args.teacher_temperature, student_temp=config.student_temperature,
                         center_momentum=config.center_momentum)
    decayed, not_decayed = get_weight_decay_parameters([model.student_backbone, model.student_head])
    optimizer = torch.optim.AdamW([{"params": decayed}, {"params": not_decayed, "weight_decay": 0.0}])
    trainable = [p for group in optimizer.param_groups for p in group["params"]]
    batch_size = training_args.per_device_train_batch_size
    peak_learning_rate = training_args.scaled_learning_rate(1)
    steps_per_epoch = 60_000 // batch_size
    warmup_steps = min(round(training_args.warmup_epochs * steps_per_epoch), total_steps // 10)
    teacher_warmup_steps = round(training_args.warmup_teacher_temperature_epochs * steps_per_epoch)
    autocast = ((lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if args.precision == "bf16"
                else contextlib.nullcontext)
    step_ends: list[float] = []
    step = 0
    loader = lightly_loader(args, training_args)
    if snapshots is not None:
        snapshots.start()
    while step < total_steps:
        for views in loader:
            if step < warmup_steps:  # linear warm-up, then the cosine (as the official and our schedules)
                learning_rate = peak_learning_rate * step / max(warmup_steps, 1)
            else:
                learning_rate = cosine_schedule(step - warmup_steps, total_steps - warmup_steps, peak_learning_rate,
                                                training_args.min_learning_rate)
            optimizer.param_groups[0]["lr"] = optimizer.param_groups[1]["lr"] = learning_rate
            optimizer.param_groups[0]["weight_decay"] = cosine_schedule(
                step, total_steps, training_args.weight_decay, training_args.weight_decay_end)
            momentum = cosine_schedule(step, total_steps, training_args.teacher_momentum, 1.0)
            teacher_temperature = (training_args.teacher_temperature if step >= teacher_warmup_steps else
                                   training_args.warmup_teacher_temperature + (training_args.teacher_temperature -
                                   training_args.warmup_teacher_temperature) * step / max(teacher_warmup_steps, 1))
            global_views = torch.cat(views[:2])
            with autocast():
                with torch.no_grad():
                    teacher_out = model.teacher(global_views).float().chunk(2)
                student_out = model.student(global_views, torch.cat(views[2:]))
                loss = criterion(list(teacher_out), list(student_out.float().chunk(len(views))),
                                 teacher_temp=teacher_temperature)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(trainable, training_args.max_grad_norm)
            optimizer.step()
            update_momentum(model.student_backbone, model.teacher_backbone, m=momentum)
            update_momentum(model.student_head, model.teacher_head, m=momentum)
            step += 1
            step_ends.append(time.monotonic())
            if not math.isfinite(loss.item()):
                raise RuntimeError(f"lightly arm: non-finite loss at step {step}")
            if snapshots is not None:
                snapshots.maybe_take(model.teacher_backbone, step)
                if snapshots.elapsed() >= seconds:
                    break
            if step >= total_steps:
                break
        if snapshots is not None and snapshots.elapsed() >= seconds:
            break
    if snapshots is not None:
        snapshots.maybe_take(model.teacher_backbone, step, force=True)
    return step, step_ends


def run_lightly(args: argparse.Namespace, arm_dir: Path) -> None:
    import torch

    training_args, config = recipe_values(args.recipe)
    # The loader workers take a core each; the compute threads the rest (as dino_hf's own placement).
    torch.set_num_threads(max((os.cpu_count() or 1) - args.lightly_workers, 1))
    _, step_ends = lightly_steps(args, training_args, config, total_steps=40, snapshots=None, seconds=None)
    # wall clock per step from step 10 to 40: data waits count, the workers' start-up does not
    seconds_per_step = (step_ends[-1] - step_ends[9]) / (len(step_ends) - 10)
    budget = args.budget_minutes * 60
    total_steps = max(int(budget / seconds_per_step), 10)
    snapshots = Snapshots(arm_dir / SNAPSHOTS, args.mark_minutes * 60)
    steps, _ = lightly_steps(args, training_args, config, total_steps, snapshots, seconds=budget)
    snapshots.write({"steps": steps, "planned_steps": total_steps, "precision": args.precision,
                     "threads": torch.get_num_threads(), "workers": args.lightly_workers,
                     "calibrated_seconds_per_step": round(seconds_per_step, 4),
                     "seconds": round(snapshots.elapsed(), 1)})


# --------------------------------------------------------------------------------------------------
# Scores and the table
# --------------------------------------------------------------------------------------------------
def minutes_to_reach(curve: list[tuple[float, float]], target: float) -> float | None:
    """The first training minute at which ``curve`` ((minutes, 20-NN) in time order) reaches ``target``,
    linearly interpolated from the snapshot before (the first snapshot's minute when it already does: an
    upper bound); ``None`` when no snapshot reaches it."""
    previous: tuple[float, float] | None = None
    for minutes, accuracy in curve:
        if accuracy >= target:
            if previous is None:
                return minutes
            fraction = (target - previous[1]) / (accuracy - previous[1])
            return round(previous[0] + fraction * (minutes - previous[0]), 2)
        previous = (minutes, accuracy)
    return None


def score_arm(arm_dir: Path, config, data, scoring: argparse.Namespace) -> list[tuple[float, float, int]]:
    """(minutes, 20-NN, step) of every snapshot of an arm."""
    from demo_summary import backbone_accuracy
    from safetensors.torch import load_file

    from dino_hf.models.backbones import build_image_processor, family_of

    facts = json.loads((arm_dir / "arm.json").read_text())
    processor = build_image_processor(28)
    curve = []
    for snapshot in facts["snapshots"]:
        state = load_file(str(arm_dir / SNAPSHOTS / snapshot["path"]))
        backbone_config = config.backbone_config
        backbone = family_of(backbone_config).build(backbone_config, mask_token=any("mask_token" in k for k in state))
        backbone.load_state_dict(state)
        accuracy = backbone_accuracy(scoring, backbone.eval(), processor, data)
        curve.append((round(snapshot["seconds"] / 60, 2), round(accuracy, 4), snapshot["step"]))
        print(f"{arm_dir.name}: {curve[-1][0]:.2f} min, step {snapshot['step']}: 20-NN {accuracy:.4f}", flush=True)
    return curve


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    output_dir = Path(args.output_dir)
    if args.run_arm:
        arm_dir = output_dir / args.run_arm
        (run_dino_hf if args.run_arm == "dino_hf" else run_lightly)(args, arm_dir)
        return {}

    import torch
    from demo_summary import load_split, raw_pixel_accuracy

    if "lightly" in args.arms:
        from lightly_dino import lightly_available

        if not lightly_available():
            raise SystemExit("time_to_quality.py: the lightly arm needs lightly: pip install -e '.[bench]'.")
    precision = "no"
    for arm in args.arms:  # dino_hf first: its start-up probe picks the precision both arms use
        command = [sys.executable, __file__, "--run_arm", arm, "--recipe", args.recipe, "--budget_minutes",
                   str(args.budget_minutes), "--mark_minutes", str(args.mark_minutes), "--data_dir", args.data_dir,
                   "--output_dir", str(output_dir), "--lightly_workers", str(args.lightly_workers), "--seed",
                   str(args.seed), "--precision", precision]
        print(f"{arm}: training {args.budget_minutes:g} min...", flush=True)
        subprocess.run(command, check=True)
        if arm == "dino_hf":
            precision = json.loads((output_dir / arm / "arm.json").read_text())["precision"] or "no"

    torch.set_num_threads(os.cpu_count() or 1)
    data = (load_split(Path(args.data_dir), "train"), load_split(Path(args.data_dir), "test"))
    scoring = argparse.Namespace(k=20, temperature=0.07, batch_size=500)
    raw_pixels = round(raw_pixel_accuracy(scoring, data), 4)
    _, config = recipe_values(args.recipe)
    metrics: dict = {"recipe": args.recipe, "budget_minutes": args.budget_minutes, "precision": precision,
                     "knn20_raw_pixels": raw_pixels}
    for arm in args.arms:
        arm_dir = output_dir / arm
        facts = json.loads((arm_dir / "arm.json").read_text())
        curve = score_arm(arm_dir, config, data, scoring)
        metrics[f"{arm}_minutes_to_raw_pixels"] = minutes_to_reach([(m, a) for m, a, _ in curve], raw_pixels)
        metrics[f"{arm}_final_knn20"] = curve[-1][1]
        metrics[f"{arm}_best_knn20"] = max(accuracy for _, accuracy, _ in curve)
        metrics[f"{arm}_steps"] = curve[-1][2] if curve[-1][2] >= 0 else facts.get("steps")
        metrics[f"{arm}_curve"] = " ".join(f"{m:g}:{a:.3f}" for m, a, _ in curve)
        metrics[f"{arm}_threads"] = facts.get("threads")
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    notes = (
        f"Both arms train the {args.recipe} recipe's network and values for {args.budget_minutes:g} min each, one after "
        f"the other (dino_hf first), in {precision} precision (dino_hf's probe); lightly = lightly "
        f"{_version('lightly')}'s DINOTransform in a DataLoader with {args.lightly_workers} worker(s), "
        "DINOProjectionHead, DINOLoss, update_momentum and cosine_schedule, schedules planned from its own "
        "calibration. 20-NN of the teacher snapshots taken every "
        f"{args.mark_minutes:g} min of training time (full test set, 60k memory); minutes_to_raw_pixels interpolates "
        f"between snapshots (empty: not reached in the budget); curve = minute:20-NN. 1-minute load average at "
        f"the end {load:.1f}."
    )
    publish(BENCHMARK, "benchmarks/time_to_quality.py", argv, metrics, notes, record=not args.no_record)
    return metrics


def _version(package: str) -> str:
    from importlib.metadata import version

    return version(package)


if __name__ == "__main__":
    main()

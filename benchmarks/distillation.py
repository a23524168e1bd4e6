"""Distil a frozen foundation model into a small backbone: does a ResNet or ConvNeXt student learn more from a
frozen ViT teacher than from DINO alone, in the same minutes of 2 CPU cores?

1. the teacher: the demo's ViT (``fashion_mnist_dinov2_cpu``: DINO + iBOT + KoLeo) pre-trained on Fashion-MNIST
   for ``--teacher_minutes`` (or ``--teacher``, an exported backbone);
2. the students, a small ResNet and a small ConvNeXt (each at most a quarter of the teacher's FLOPs per 28 px
   image, counted with ``torch.utils.flop_counter``), trained from scratch for ``--student_minutes`` each with the
   DINO recipe (``fashion_mnist_cpu``, the same heads, crops and schedules) in two ways: DINO alone, and
   distilled from the frozen teacher (``--distillation_teacher``, each ``--variants`` entry);
3. on two sets of images: Fashion-MNIST itself, and a shifted split the teacher never saw (every image
   inverted: dark garments on a light ground);
4. each exported backbone, the teacher and raw pixels are scored by weighted 20-NN (memory: all 60k training
   images, classified: the 10k test images) and a linear probe (L-BFGS logistic regression on the same
   features) on the set the student trained on.

Goal (issue 23): the distilled student beats the DINO-only one and reaches at least 95% of the teacher's 20-NN
at a quarter of its inference cost. Rows go to ``benchmarks/RESULTS.md``.

    .venv/bin/python benchmarks/distillation.py                      # about 40 minutes on 2 cores
    .venv/bin/python benchmarks/distillation.py --teacher_minutes 0.5 --student_minutes 0.3 --no_record
"""

from __future__ import annotations

import argparse
import io
import json
import shlex
import subprocess
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))
from recording import publish  # noqa: E402

BENCHMARK = "distillation"
TEACHER_RECIPE = REPO_ROOT / "scripts" / "configs" / "fashion_mnist_dinov2_cpu.yaml"
STUDENT_RECIPE = REPO_ROOT / "scripts" / "configs" / "fashion_mnist_cpu.yaml"
IMAGE_SIZE = 28

#: Distillation variants: extra scripts/train.py flags (the teacher is added to each).
#: Without DINO's own term nothing uses local crops: the pure variants make none.
VARIANTS = {
    "cosine": ["--dino_loss_weight", "0", "--num_local_crops", "0"],
    "cosine_dense": ["--dino_loss_weight", "0", "--num_local_crops", "0", "--distillation_dense_weight", "1"],
    "cosine_soft": ["--dino_loss_weight", "0", "--num_local_crops", "0", "--distillation_soft_weight", "1"],
    "dino_cosine": ["--dino_loss_weight", "1"],
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--data_dir", default=str(REPO_ROOT / "data" / "fashion_mnist"),
                        help="Fashion-MNIST parquet (scripts/prepare_fashion_mnist.py, or make demo).")
    parser.add_argument("--output_dir", default=str(REPO_ROOT / "outputs" / BENCHMARK))
    parser.add_argument("--teacher", default=None, help="An exported teacher backbone (skips its training).")
    parser.add_argument("--teacher_minutes", type=float, default=6.0)
    parser.add_argument("--student_minutes", type=float, default=2.5, help="Each student run.")
    parser.add_argument("--students", nargs="+", default=["resnet", "convnext"], choices=["resnet", "convnext"])
    parser.add_argument("--variants", nargs="+", default=["dino_cosine"], choices=sorted(VARIANTS),
                        help="Distillation variants run for every student and set (dino_cosine: the defaults).")
    parser.add_argument("--extra_variants", nargs="*", default=[], choices=sorted(VARIANTS),
                        help="Further variants, for the ResNet on Fashion-MNIST only (e.g. cosine cosine_dense cosine_soft).")
    parser.add_argument("--sets", nargs="+", default=["fashion_mnist", "inverted"], choices=["fashion_mnist", "inverted"])
    parser.add_argument("--no_record", action="store_true", help="Print the results without appending to RESULTS.md.")
    return parser.parse_args(argv)


# --------------------------------------------------------------------------------------------------
# Data and models
# --------------------------------------------------------------------------------------------------
def write_inverted(source: Path, destination: Path) -> Path:
    """Every image of ``source`` (Fashion-MNIST parquet) inverted (255 - pixel), as parquet with the same labels."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from PIL import Image, ImageOps

    if (destination / ".written").is_file():
        return destination
    (destination / "data").mkdir(parents=True, exist_ok=True)
    for path in sorted((source / "data").glob("*.parquet")):
        table = pq.read_table(path)
        images = []
        for cell in table.column("image").to_pylist():
            inverted = ImageOps.invert(Image.open(io.BytesIO(cell["bytes"])).convert("L"))
            buffer = io.BytesIO()
            inverted.save(buffer, format="PNG")
            images.append({"bytes": buffer.getvalue(), "path": None})
        column = pa.array(images, type=table.schema.field("image").type)
        pq.write_table(table.set_column(table.schema.get_field_index("image"), "image", column), destination / "data" / path.name)
    (destination / ".written").write_text("inverted\n")
    return destination


def student_config_folder(name: str, work_dir: Path) -> Path:
    """A DinoConfig folder: the DINO recipe's head and loss on a small ResNet or ConvNeXt backbone."""
    from transformers import ConvNextConfig

    from dino_hf.models.configuration_dino import DinoConfig
    from dino_hf.train.argument_parsing import parse_training_args
    from dino_hf.train.builders import build_model_config

    config = build_model_config(parse_training_args(["--config", str(STUDENT_RECIPE), "--output_dir", "unused"]))
    if name == "resnet":  # make demo's network (the resnet_tiny preset)
        config.backbone_config = DinoConfig.from_preset("resnet_tiny").backbone_config
    else:  # 4 px stem and 2 stages: a stride of 8, so the 14 px local crops keep a map
        config.backbone_config = ConvNextConfig(patch_size=4, hidden_sizes=[48, 96], depths=[2, 2], num_stages=2,
                                                image_size=IMAGE_SIZE)
    config.drop_path_rate = 0.0
    folder = work_dir / f"{name}_config"
    config.save_pretrained(folder)
    return folder


def flops_per_image(backbone_folder_or_config) -> int:
    """FLOPs of one 28 px forward pass of a backbone (a folder, or a DinoConfig folder's backbone)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from dino_hf.eval.loading import load_backbone
    from dino_hf.models.backbones import backbone_forward, family_of
    from dino_hf.models.configuration_dino import DinoConfig

    path = Path(backbone_folder_or_config)
    if (path / "model.safetensors").is_file():
        backbone = load_backbone(path)
    else:
        config = DinoConfig.from_pretrained(path).backbone_config
        backbone = family_of(config).build(config, 0.0, mask_token=False)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        backbone_forward(backbone.eval(), torch.zeros(1, 3, IMAGE_SIZE, IMAGE_SIZE))
    return int(counter.get_total_flops())


# --------------------------------------------------------------------------------------------------
# Runs and scores
# --------------------------------------------------------------------------------------------------
def run_training(name: str, recipe: Path, flags: list[str], work_dir: Path) -> tuple[Path, dict]:
    """``scripts/train.py --config recipe flags``; its output folder and training_args.json."""
    output_dir = work_dir / name
    command = [sys.executable, str(REPO_ROOT / "scripts" / "train.py"), "--config", str(recipe),
               "--output_dir", str(output_dir), "--overwrite_output_dir", "--checkpointing_steps", str(10**9),
               "--eval_dataset_name", "", "--report_to", "none", *flags]
    print("$ " + shlex.join(command), flush=True)
    log_path = work_dir / f"{name}.log"
    started = time.monotonic()
    with log_path.open("w", encoding="utf-8") as log:
        result = subprocess.run(command, cwd=REPO_ROOT, stdout=log, stderr=subprocess.STDOUT, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"{name}: scripts/train.py exited with {result.returncode}; see {log_path}")
    recorded = json.loads((output_dir / "training_args.json").read_text())
    recorded["wall_minutes"] = round((time.monotonic() - started) / 60, 2)
    rows = [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    shares = [row["teacher_forward_share"] for row in rows if "teacher_forward_share" in row]
    if shares:
        recorded["teacher_forward_share"] = round(sum(shares) / len(shares), 3)
    return output_dir, recorded


def features_of(backbone_dir: Path | None, data: Path) -> dict:
    """``{split: (features, labels)}`` of the exported backbone (``None``: the raw pixels in [0, 1])."""
    import torch

    from dino_hf.data.streaming import load_image_dataset
    from dino_hf.eval.evaluation import extract_features, make_eval_dataloader
    from dino_hf.eval.loading import load_backbone, load_image_processor

    torch.set_num_threads(2)
    features = {}
    for split in ("train", "test"):
        dataset = load_image_dataset(str(data), split=split, streaming=False)
        if backbone_dir is None:
            import numpy as np

            pixels = np.stack([np.asarray(image, dtype=np.float32).reshape(-1) / 255.0 for image in dataset["image"]])
            features[split] = (torch.from_numpy(pixels), torch.tensor(dataset["label"]))
            continue
        backbone = load_backbone(backbone_dir)
        processor = load_image_processor(backbone_dir, backbone.config)
        features[split] = extract_features(backbone, make_eval_dataloader(dataset, processor, batch_size=500))
    return features


def scores(backbone_dir: Path | None, data: Path) -> dict[str, float]:
    """Weighted 20-NN (L2-normalised features, as every dino_hf evaluation) and linear-probe accuracy."""
    import torch.nn.functional as F

    from dino_hf.eval.evaluation import knn_accuracy, linear_probe_accuracy

    features = features_of(backbone_dir, data)
    (train_x, train_y), (test_x, test_y) = features["train"], features["test"]
    if backbone_dir is None:
        train_x, test_x = F.normalize(train_x, dim=1), F.normalize(test_x, dim=1)
    knn = knn_accuracy(train_x, train_y, test_x, test_y, k=(20,))[20]
    probe = linear_probe_accuracy(train_x, train_y, test_x, test_y, max_iterations=200)
    return {"knn20": round(knn, 4), "linear_probe": round(probe, 4)}


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    work_dir = Path(args.output_dir)
    work_dir.mkdir(parents=True, exist_ok=True)
    source = Path(args.data_dir)
    sets = {"fashion_mnist": source}
    if "inverted" in args.sets:
        sets["inverted"] = write_inverted(source, work_dir / "inverted")
    sets = {name: path for name, path in sets.items() if name in args.sets}

    if args.teacher is None:
        teacher_run, teacher_record = run_training(
            "teacher", TEACHER_RECIPE, ["--dataset_name", str(source), "--max_train_minutes", str(args.teacher_minutes)],
            work_dir)
        teacher = teacher_run / "backbone"
    else:
        teacher, teacher_record = Path(args.teacher), {}
    teacher_flops = flops_per_image(teacher)
    metrics: dict = {"teacher_minutes": args.teacher_minutes if args.teacher is None else None,
                     "student_minutes": args.student_minutes, "teacher_flops_per_image": teacher_flops,
                     "teacher_steps": teacher_record.get("max_steps") or teacher_record.get("planned_total_steps")}
    configs = {name: student_config_folder(name, work_dir) for name in args.students}
    for name, folder in configs.items():
        flops = flops_per_image(folder)
        metrics[f"{name}_flops_per_image"] = flops
        metrics[f"{name}_flops_over_teacher"] = round(flops / teacher_flops, 3)

    for set_name, data in sets.items():
        metrics[f"{set_name}_raw_pixels"] = scores(None, data)
        metrics[f"{set_name}_teacher"] = scores(teacher, data)
        for student, folder in configs.items():
            common = ["--dataset_name", str(data), "--model_config", str(folder), "--config_overrides", "",
                      "--max_train_minutes", str(args.student_minutes)]
            variants = list(args.variants)
            if set_name == "fashion_mnist" and student == "resnet":
                variants += [name for name in args.extra_variants if name not in variants]
            runs = {"dino": common, **{f"distilled_{variant}": [*common, "--distillation_teacher", str(teacher),
                                                                 *VARIANTS[variant]] for variant in variants}}
            for arm, flags in runs.items():
                output_dir, record = run_training(f"{set_name}_{student}_{arm}", STUDENT_RECIPE, flags, work_dir)
                entry = scores(output_dir / "backbone", data)
                entry["steps"] = record.get("planned_total_steps") or record.get("max_steps")
                if "teacher_forward_share" in record:
                    entry["teacher_forward_share"] = record["teacher_forward_share"]
                metrics[f"{set_name}_{student}_{arm}"] = entry
                print(json.dumps({f"{set_name}_{student}_{arm}": entry}), flush=True)
    (work_dir / "results.json").write_text(json.dumps(metrics, indent=2) + "\n", encoding="utf-8")
    flat = {key: value for key, value in metrics.items() if not isinstance(value, dict)}
    for key, value in metrics.items():
        if isinstance(value, dict):
            flat.update({f"{key}_{inner}": number for inner, number in value.items()})
    notes = ("Teacher: the demo ViT (fashion_mnist_dinov2_cpu) pre-trained on Fashion-MNIST for teacher_minutes; "
             "students from scratch with the DINO recipe fashion_mnist_cpu (same heads, crops, schedules) for "
             "student_minutes each, DINO alone vs distilled from the frozen teacher (distilled_<variant>: "
             "cosine = the global cosine term, dense = + the dense term, soft = + soft targets over a 4096 queue, "
             "dino_cosine = DINO's own term kept); inverted = every image inverted, a set the teacher never saw; "
             "weighted 20-NN (60k memory, 10k classified) and a linear probe on the set trained on; FLOPs of one "
             "28 px forward pass.")
    publish(BENCHMARK, "benchmarks/distillation.py", argv, flat, notes, record=not args.no_record)
    return metrics


if __name__ == "__main__":
    main()

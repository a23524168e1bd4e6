"""Continued pre-training that does not wreck the starting model: a measured domain shift on Fashion-MNIST.

The question (dinov2 issues 204, 339, 431, 435; dinov3 18, 84): continuing DINO on one's own images
from a pretrained backbone with fresh heads can drop k-NN accuracy far below the starting backbone's.
This benchmark builds a real domain shift from the data the project installs and measures it:

1. domain A = Fashion-MNIST's clothing classes (0-4 and 6), domain B = its footwear and bags (5, 7, 8, 9);
2. a backbone is pre-trained from scratch on A for ``--pretrain_minutes`` (the demo recipe);
3. it is then trained on B's training images for ``--continue_minutes`` in several ways, each an
   ordinary ``scripts/train.py --model_name_or_path <A backbone>`` run:
   ``today`` (fresh heads, no warm-up, full backbone learning rate: the behaviour before the
   continued-pre-training options), ``default`` (dino_hf's defaults for continued pre-training), and
   the ablations given by ``--variants``; plus ``scratch`` (the same budget from a random init);
4. every run evaluates the teacher's weighted 20-NN on B (memory: B's training images, classified: B's
   test images) at the end of its calibration and every ``eval_steps``; the final figure uses all of
   B's images on the exported backbone.

The goal: with the defaults, the k-NN never falls below the starting backbone's at any evaluation, and
ends above both the start and from scratch. Run for a ViT and a DINOv2-architecture backbone
(``--architectures vit dinov2``); rows go to ``benchmarks/RESULTS.md``.

    .venv/bin/python benchmarks/continued_pretraining.py                        # about 35 minutes on 2 cores
    .venv/bin/python benchmarks/continued_pretraining.py --pretrain_minutes 1 --continue_minutes 1 --no_record
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))
from recording import publish  # noqa: E402

BENCHMARK = "continued_pretraining"
RECIPE = REPO_ROOT / "scripts" / "configs" / "fashion_mnist_cpu.yaml"
DOMAIN_A = (0, 1, 2, 3, 4, 6)  # T-shirt, trouser, pullover, dress, coat, shirt
DOMAIN_B = (5, 7, 8, 9)  # sandal, sneaker, bag, ankle boot

#: The backbone architectures compared: the demo recipe's ViT (4 layers, width 256, 14 px patches) and
#: a DINOv2 (layer scale, its own embeddings) of the same shape.
ARCHITECTURES = ("vit", "dinov2")

#: Continued-pre-training variants: extra scripts/train.py flags.
VARIANTS = {
    "today": ["--freeze_backbone_steps", "0", "--backbone_learning_rate_scale", "1", "--copy_student_head_after_freeze",
              "false"],
    "default": [],
    "warm_up_only": ["--backbone_learning_rate_scale", "1"],
    "low_rate_only": ["--freeze_backbone_steps", "0"],
    "layer_decay": ["--layerwise_learning_rate_decay", "0.75"],
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--data_dir", default=str(REPO_ROOT / "data" / "fashion_mnist"),
                        help="Fashion-MNIST parquet (scripts/prepare_fashion_mnist.py).")
    parser.add_argument("--output_dir", default=str(REPO_ROOT / "outputs" / BENCHMARK))
    parser.add_argument("--architectures", nargs="+", default=list(ARCHITECTURES), choices=ARCHITECTURES)
    parser.add_argument("--variants", nargs="+", default=["today", "default"], choices=sorted(VARIANTS),
                        help="Continued-pre-training variants (scratch is always run).")
    parser.add_argument("--pretrain_minutes", type=float, default=5.0, help="Pre-training on domain A.")
    parser.add_argument("--continue_minutes", type=float, default=3.0, help="Each run on domain B.")
    parser.add_argument("--num_evaluations", type=int, default=5, help="In-training 20-NN points per run on B.")
    parser.add_argument("--expected_steps_per_second", type=float, default=5.0,
                        help="First estimate of the step rate, only used to space the evaluations.")
    parser.add_argument("--no_record", action="store_true", help="Print the results without appending to RESULTS.md.")
    return parser.parse_args(argv)


# --------------------------------------------------------------------------------------------------
# The two domains as parquet datasets
# --------------------------------------------------------------------------------------------------
def write_domain(source: Path, destination: Path, classes: tuple[int, ...], num_shards: int = 4) -> Path:
    """The rows of ``classes`` of every split of ``source`` (Fashion-MNIST parquet), as parquet shards."""
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    if (destination / ".written").is_file():
        return destination
    (destination / "data").mkdir(parents=True, exist_ok=True)
    for split in ("train", "test"):
        tables = [pq.read_table(path) for path in sorted((source / "data").glob(f"{split}-*.parquet"))]
        if not tables:
            raise SystemExit(f"{source} has no {split} parquet shards: run scripts/prepare_fashion_mnist.py first.")
        table = pa.concat_tables(tables)
        table = table.filter(pc.is_in(table["label"], value_set=pa.array(classes, type=table["label"].type)))
        rows_per_shard = -(-table.num_rows // num_shards)
        for index in range(num_shards):
            shard = table.slice(index * rows_per_shard, rows_per_shard)
            pq.write_table(shard, destination / "data" / f"{split}-{index:05d}-of-{num_shards:05d}.parquet")
    (destination / ".written").write_text(json.dumps({"classes": classes}) + "\n")
    return destination


# --------------------------------------------------------------------------------------------------
# Runs through scripts/train.py
# --------------------------------------------------------------------------------------------------
def architecture_flags(name: str, work_dir: Path) -> list[str]:
    """scripts/train.py flags of ``name``: the recipe's ViT, or a DINOv2 of the same shape."""
    if name == "vit":
        return []
    # A config folder (--config_overrides edits fields and cannot change a config's class); its heads
    # are the recipe's, so the recipe's ViT overrides are dropped.
    return ["--model_config", str(_dinov2_config_folder(work_dir)), "--config_overrides", ""]


def _dinov2_config_folder(work_dir: Path) -> Path:
    from transformers import Dinov2Config

    from dino_hf.train.argument_parsing import parse_training_args
    from dino_hf.train.builders import build_model_config

    recipe = build_model_config(parse_training_args(["--config", str(RECIPE)]))
    vit = recipe.backbone_config
    recipe.backbone_config = Dinov2Config(
        hidden_size=vit.hidden_size, num_hidden_layers=vit.num_hidden_layers, num_attention_heads=vit.num_attention_heads,
        mlp_ratio=vit.intermediate_size // vit.hidden_size, patch_size=vit.patch_size, image_size=28,
        layer_norm_eps=1e-6, layerscale_value=1.0,
    )
    folder = work_dir / "dinov2_config"
    recipe.save_pretrained(folder)
    return folder


def run_training(name: str, flags: list[str], work_dir: Path) -> tuple[Path, list[dict], float]:
    """``scripts/train.py --config <demo recipe> <flags>``; returns its output folder, metrics rows, wall time."""
    output_dir = work_dir / name
    command = [sys.executable, str(REPO_ROOT / "scripts" / "train.py"), "--config", str(RECIPE),
               "--output_dir", str(output_dir), "--overwrite_output_dir", "--checkpointing_steps", str(10**9),
               "--report_to", "none", *flags]
    print("$ " + shlex.join(command), flush=True)
    started = time.monotonic()
    log_path = work_dir / f"{name}.log"
    with log_path.open("w", encoding="utf-8") as log:
        result = subprocess.run(command, cwd=REPO_ROOT, stdout=log, stderr=subprocess.STDOUT, check=False)
    wall = time.monotonic() - started
    if result.returncode != 0:
        raise RuntimeError(f"{name}: scripts/train.py exited with {result.returncode}; see {log_path}")
    rows = [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return output_dir, rows, wall


def knn_curve(rows: list[dict]) -> list[tuple[int, float]]:
    return [(row["step"], row["knn_top1_k20"]) for row in rows if "knn_top1_k20" in row]


def final_knn(backbone_dir: Path, domain: Path) -> float:
    """Weighted 20-NN of an exported backbone on all of B (memory: B train, classified: B test)."""
    import torch

    from dino_hf.data.streaming import load_image_dataset
    from dino_hf.eval.evaluation import extract_features, knn_accuracy, make_eval_dataloader
    from dino_hf.eval.loading import load_backbone, load_image_processor

    torch.set_num_threads(2)
    backbone = load_backbone(backbone_dir)
    processor = load_image_processor(backbone_dir, backbone.config)
    features = {}
    for split in ("train", "test"):
        dataset = load_image_dataset(str(domain), split=split, streaming=False)
        loader = make_eval_dataloader(dataset, processor, batch_size=500)
        features[split] = extract_features(backbone, loader)
    return knn_accuracy(*features["train"], *features["test"], k=(20,))[20]


def monitor_knn(backbone_dir: Path, eval_flags: list[str]) -> float:
    """Weighted 20-NN of an exported backbone with the in-training evaluation's own protocol (the
    `KnnMonitor` that ``eval_flags`` give every run: the same seeded subsets and processor), so that a
    run's curve can be compared with its starting point."""
    from dino_hf.eval.loading import load_backbone
    from dino_hf.models.backbones import image_processor_dict
    from dino_hf.train.argument_parsing import parse_training_args
    from dino_hf.train.builders import build_knn_monitor

    args = parse_training_args(["--config", str(RECIPE), "--output_dir", str(backbone_dir.parent / "unused"),
                                *eval_flags])
    # with the processor a run continued from this folder evaluates with (DinoForPreTraining.from_backbone's)
    monitor = build_knn_monitor(args, image_processor=image_processor_dict(backbone_dir))
    return monitor.evaluate(load_backbone(backbone_dir))["knn_top1_k20"]


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    work_dir = Path(args.output_dir)
    work_dir.mkdir(parents=True, exist_ok=True)
    source = Path(args.data_dir)
    domain_a = write_domain(source, work_dir / "domain_a", DOMAIN_A)
    domain_b = write_domain(source, work_dir / "domain_b", DOMAIN_B)
    eval_steps = max(int(args.continue_minutes * 60 * args.expected_steps_per_second / args.num_evaluations), 1)
    b_eval = ["--eval_dataset_name", str(domain_b), "--eval_split", "test", "--eval_train_split", "train",
              "--eval_max_samples", "4000", "--eval_steps", str(eval_steps)]
    results: dict = {}
    for architecture in args.architectures:
        model = architecture_flags(architecture, work_dir)
        start_dir, _, start_wall = run_training(
            f"{architecture}_pretrain_a", [*model, "--dataset_name", str(domain_a), "--eval_dataset_name", "",
                                           "--max_train_minutes", str(args.pretrain_minutes)], work_dir)
        entry = {"start": final_knn(start_dir / "backbone", domain_b),
                 "start_in_training_protocol": monitor_knn(start_dir / "backbone", b_eval),
                 "pretrain_minutes": round(start_wall / 60, 2)}
        continued = {name: VARIANTS[name] for name in args.variants}
        for name, flags in continued.items():
            output_dir, rows, _ = run_training(
                f"{architecture}_{name}",
                ["--dataset_name", str(domain_b), "--model_name_or_path", str(start_dir / "backbone"),
                 "--max_train_minutes", str(args.continue_minutes), *b_eval, *flags], work_dir)
            curve = knn_curve(rows)
            entry[name] = {"final": final_knn(output_dir / "backbone", domain_b), "curve": curve,
                           "minimum": min(value for _, value in curve)}
        output_dir, rows, _ = run_training(
            f"{architecture}_scratch",
            [*model, "--dataset_name", str(domain_b), "--max_train_minutes", str(args.continue_minutes), *b_eval],
            work_dir)
        entry["scratch"] = {"final": final_knn(output_dir / "backbone", domain_b), "curve": knn_curve(rows)}
        results[architecture] = entry
        print(json.dumps({architecture: entry}), flush=True)
    (work_dir / "results.json").write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")

    metrics: dict = {"pretrain_minutes": args.pretrain_minutes, "continue_minutes": args.continue_minutes}
    for architecture, entry in results.items():
        metrics[f"{architecture}_start"] = round(entry["start"], 4)
        metrics[f"{architecture}_start_in_training_protocol"] = round(entry["start_in_training_protocol"], 4)
        for name in args.variants:
            metrics[f"{architecture}_{name}_final"] = round(entry[name]["final"], 4)
            metrics[f"{architecture}_{name}_lowest_in_training"] = round(entry[name]["minimum"], 4)
        metrics[f"{architecture}_scratch_final"] = round(entry["scratch"]["final"], 4)
    notes = (
        "Fashion-MNIST domain shift: pre-trained on classes 0-4,6 for pretrain_minutes (demo recipe), continued on "
        "classes 5,7,8,9 for continue_minutes per run through scripts/train.py --model_name_or_path; weighted 20-NN "
        "on B (memory B train 24k, classified B test 4k) of the exported teacher (*_final), and the lowest in-training "
        "20-NN (4000/4000 images) of each run, to compare with *_start_in_training_protocol (the start backbone on those images); today = fresh heads, no warm-up, full backbone rate; default = dino_hf's "
        "continued-pre-training defaults; scratch = same budget from random weights. Curves in outputs/"
        f"{BENCHMARK}/results.json."
    )
    publish(BENCHMARK, "benchmarks/continued_pretraining.py", argv, metrics, notes, record=not args.no_record)
    return metrics


if __name__ == "__main__":
    main()

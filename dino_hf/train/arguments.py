"""Command-line arguments of DINO pre-training: the recipe plus runtime options.

`DinoTrainingArguments` is a frozen dataclass parsed with `transformers.HfArgumentParser`, either
from the command line alone or from one YAML/JSON file (`--config FILE`) whose values the command
line overrides. It is never mutated after parsing: values that depend on the run (the batch-scaled
learning rate, the number of optimiser steps, epoch-denominated settings converted to steps) are
computed by `dino_hf.train.step_plan.plan_steps` (from `run_length()`) into a separate `StepPlan` and
logged.

Defaults are those of the official DINO code (`main_dino.py`, ViT-S/16, 100 epochs); each help
string says why and what range is sane.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal

from dino_hf.base.official_recipe import (
    OFFICIAL_LEARNING_RATE,
    OFFICIAL_MAX_GRAD_NORM,
    OFFICIAL_MIN_LEARNING_RATE,
    OFFICIAL_TEACHER_MOMENTUM,
    OFFICIAL_TEACHER_TEMPERATURE,
    OFFICIAL_WEIGHT_DECAY,
    OFFICIAL_WEIGHT_DECAY_END,
)
from dino_hf.models.configuration_dino import DinoConfig
from dino_hf.train.argument_checks import check_training_arguments
from dino_hf.train.recipes import applies_its_recipe, shipped_recipes
from dino_hf.train.step_plan import RunLength

__all__ = [
    "DinoTrainingArguments",
]


def _help(text: str, **metadata: Any) -> dict[str, Any]:
    return {"help": text, **metadata}


@applies_its_recipe
@dataclass(frozen=True)
class DinoTrainingArguments:
    """Everything `scripts/train.py` accepts. See each field's help string (`--help`)."""

    # ------------------------------------------------------------------ config file
    config: str | None = field(
        default=None,
        metadata=_help(
            "YAML or JSON file with any of these arguments (keys are the flag names without '--'), or "
            f"the name of a recipe shipped with dino_hf ({', '.join(sorted(shipped_recipes()))}); flags given on the "
            "command line override it."
        ),
    )

    # ------------------------------------------------------------------ data
    dataset_name: str | None = field(
        default=None,
        metadata=_help(
            "Training images: a Hub dataset id, a local image folder, a parquet file or folder of "
            "parquet shards, or webdataset .tar shards. Required. Labels are ignored."
        ),
    )
    dataset_config_name: str | None = field(
        default=None, metadata=_help("Configuration (subset) name of a Hub dataset, if it has several.")
    )
    train_split: str = field(default="train", metadata=_help("Dataset split to train on."))
    image_column: str | None = field(
        default=None,
        metadata=_help(
            "Column that holds the images (PIL images or encoded bytes); unset finds it: 'image', "
            "'img', else the first column of the Image type."
        ),
    )
    streaming: bool = field(
        default=True,
        metadata=_help(
            "Stream the training dataset instead of downloading and converting it first: training starts at "
            "once, needs no disk space and reads each image once per epoch anyway (a stream whose length is "
            "unknown needs --max_steps). dino-hf-eval and dino-hf-embed default to --no_streaming: they "
            "read every image of a split anyway, and an indexed split gives their seeded --max_*_samples subsets an "
            "unbiased draw even from a class-sorted folder."
        ),
    )
    shuffle_buffer_size: int = field(
        default=10_000,
        metadata=_help(
            "Images held in the streaming shuffle buffer. Larger mixes better and costs memory "
            "(about 10k decoded-on-demand records is a good trade-off; 1 disables shuffling)."
        ),
    )
    dataloader_num_workers: str = field(
        default="auto",
        metadata=_help(
            "Data-loading worker processes per training process, or 'auto': on a GPU every core but "
            "the training process's own (the official code uses 10 per GPU: multi-crop augmentation "
            "is CPU heavy), on a CPU a quarter of the cores (the rest compute), never more than the "
            "shards this process reads nor than its cores. 0 loads in the training process (bit-exact "
            "resume)."
        ),
    )
    torch_num_threads: str = field(
        default="auto",
        metadata=_help(
            "Compute threads of each training process, or 'auto': its share of the cores minus its "
            "loader workers, so that compute and loading do not oversubscribe the cores (accelerate "
            "launch and torchrun set OMP_NUM_THREADS=1 for every process, so that variable alone does "
            "not decide)."
        ),
    )

    # ------------------------------------------------------------------ model
    model_config: str = field(
        default="vit_small_patch16",
        metadata=_help(
            f"Model architecture: a preset name ({', '.join(DinoConfig.preset_names())}) or a folder/JSON file written by "
            "DinoConfig.save_pretrained. ViT-S/16 is the official default: best accuracy per "
            "compute in the paper."
        ),
    )
    config_overrides: str | None = field(
        default=None,
        metadata=_help(
            "Comma-separated key=value changes to the model config, e.g. "
            "'backbone_config.hidden_size=192,num_prototypes=4096,norm_last_layer=false'. "
            "Ignored keys are an error."
        ),
    )
    model_name_or_path: str | None = field(
        default=None,
        metadata=_help(
            "Start from weights instead of a random initialisation: a DinoForPreTraining folder "
            "(student, teacher and center) or a backbone folder or Hub id of any supported family (student and teacher "
            "both start from it; a new head is initialised)."
        ),
    )
    model_revision: str | None = field(
        default=None,
        metadata=_help("Hub revision (branch, tag or commit) of --model_name_or_path; unset is the default branch."),
    )
    cache_dir: str | None = field(
        default=None,
        metadata=_help("Where Hub models and datasets are cached; unset is the Hugging Face cache (HF_HOME)."),
    )
    token: str | None = field(
        default=None,
        repr=False,  # never printed with the arguments
        metadata=_help(
            "Hub token for private or gated models and datasets; unset uses HF_TOKEN or the `hf auth login` "
            "token. Never written to the run folder, the logs or the card."
        ),
    )

    # ------------------------------------------------------------------ distillation
    distillation_teacher: str | None = field(
        default=None,
        metadata=_help(
            "Distil a frozen foundation model into the student: a Hub id, a backbone folder, a run's --output_dir "
            "or a DinoForPreTraining folder (its teacher network), of any supported family. It sees the student's "
            "global crops through its own image processor, runs in the run's precision without gradients and is "
            "never trained nor checkpointed (its weights' SHA-256 is recorded; a resume with another teacher is "
            "refused). The student exports as its own stock class, without the projectors."
        ),
    )
    distillation_teacher_revision: str | None = field(
        default=None, metadata=_help("Hub revision (branch, tag or commit) of --distillation_teacher.")
    )
    distillation_cosine_weight: float | None = field(
        default=None,
        metadata=_help("Weight of the global cosine term: the student's projected embedding against the teacher's "
                       "embedding of the same crop (unset: DinoConfig's 1.0)."),
    )
    distillation_soft_weight: float | None = field(
        default=None,
        metadata=_help("Weight of the soft-target term: both embeddings' softmax over a queue of teacher embeddings, "
                       "the teacher's the target (LightlyTrain's v1; unset: DinoConfig's 0)."),
    )
    distillation_dense_weight: float | None = field(
        default=None,
        metadata=_help("Weight of the dense term: the student's feature map (patch tokens or last ConvNet stage) "
                       "through a 1x1 projection against the teacher's patch tokens on the same grid, MSE of "
                       "L2-normalised features (LightlyTrain's v2; a ViT-family teacher; unset: DinoConfig's 0)."),
    )
    distillation_queue_size: int | None = field(
        default=None, metadata=_help("Teacher embeddings the soft targets compare with (unset: DinoConfig's 4096).")
    )
    distillation_student_temperature: float | None = field(
        default=None, metadata=_help("Student softmax temperature of the soft targets (unset: DinoConfig's 0.1).")
    )
    distillation_teacher_temperature: float | None = field(
        default=None, metadata=_help("Teacher softmax temperature of the soft targets (unset: DinoConfig's 0.04).")
    )
    dino_loss_weight: float | None = field(
        default=None,
        metadata=_help("Weight of DINO's own self-distillation term (unset: DinoConfig's 1.0). With a distillation "
                       "teacher, 0 trains on the teacher alone: the EMA teacher and the local crops are then not "
                       "run, which makes each step far cheaper; DINOv3's distillation keeps the term."),
    )

    # ------------------------------------------------------------------ crops
    num_local_crops: int = field(
        default=8,
        metadata=_help(
            "Small local views per image, seen by the student only. 8 is the official default; "
            "10 gives slightly better features, 0 disables multi-crop (much worse in the paper)."
        ),
    )
    global_crop_size: int = field(
        default=224,
        metadata=_help("Side in pixels of the 2 global views (teacher and student); a multiple of the patch size."),
    )
    local_crop_size: int = field(
        default=96,
        metadata=_help("Side in pixels of the local views; a multiple of the patch size, at most --global_crop_size."),
    )
    global_crop_scale: list[float] = field(
        default_factory=lambda: [0.4, 1.0],
        metadata=_help(
            "Min and max area fraction of the image kept by a global crop. The official (0.4, 1) "
            "was chosen with multi-crop; use (0.14, 1) when --num_local_crops is 0."
        ),
    )
    local_crop_scale: list[float] = field(
        default_factory=lambda: [0.05, 0.4],
        metadata=_help(
            "Min and max area fraction of the image kept by a local crop; its max should equal the "
            "min of --global_crop_scale."
        ),
    )

    color_jitter_probability: float = field(
        default=0.8,
        metadata=_help("Probability of colour jitter per view (official 0.8)."),
    )
    color_jitter_strength: float = field(
        default=1.0,
        metadata=_help(
            "Multiplier of the official jitter strengths (brightness 0.4, contrast 0.4, saturation "
            "0.2, hue 0.1). Lower it for small or grayscale images, where strong jitter destroys "
            "the little signal there is."
        ),
    )
    grayscale_probability: float = field(
        default=0.2, metadata=_help("Probability of grayscale conversion per view (official 0.2).")
    )
    blur_probability_scale: float = field(
        default=1.0,
        metadata=_help(
            "Multiplier of the official Gaussian-blur probabilities (1.0 and 0.1 on the global views, "
            "0.5 on local views); 0 disables blur, which is sensible below ~64 px."
        ),
    )
    blur_sigma: list[float] = field(
        default_factory=lambda: [0.1, 2.0],
        metadata=_help("Min and max blur standard deviation in output pixels (official 0.1 2.0, for 224 px views)."),
    )
    solarize_probability: float = field(
        default=0.2,
        metadata=_help("Probability of solarisation of the second global view (official 0.2)."),
    )
    augmentation_device: Literal["loader", "cpu", "cuda"] = field(
        default="loader",
        metadata=_help(
            "Where the multi-crop augmentation runs. 'loader': per image in the loader workers (the "
            "official way). 'cuda': loader workers only decode each image to uint8 at "
            "--augmentation_working_size and the whole multi-crop runs as batched tensor operations on "
            "the GPU, with the official distributions: removes the CPU-loader ceiling on fast GPUs. "
            "'cpu': the same batched operations on the CPU of the training process (for testing, and "
            "for tiny images, where per-image work dominates)."
        ),
    )
    augmentation_working_size: int | None = field(
        default=None,
        metadata=_help(
            "With --augmentation_device cpu or cuda: the longer side, in pixels, to which loader workers "
            "shrink each image (aspect kept, never enlarged) before the batched crops are cut from it. "
            "Default: twice --global_crop_size (448 for 224), so that a 4:3 photo keeps 1.5x the global "
            "crop on its shorter side and crops are cut at a higher resolution than they are shown."
        ),
    )

    # ------------------------------------------------------------------ optimisation
    per_device_train_batch_size: int = field(
        default=64,
        metadata=_help(
            "Source images per process per micro-step (each gives 2 + --num_local_crops views). "
            "The official runs use 64 per GPU for a global batch of 1024 on 16 GPUs."
        ),
    )
    gradient_accumulation_steps: int = field(
        default=1,
        metadata=_help(
            "Micro-steps per optimiser step. Schedules, the teacher EMA and the center update advance "
            "once per optimiser step, so a global batch built by accumulation trains like a real one."
        ),
    )
    max_steps: int | None = field(
        default=None,
        metadata=_help(
            "Total optimiser steps; overrides --num_train_epochs. Required for a stream of unknown "
            "length (or --max_train_minutes), where epoch-denominated settings then count "
            "total steps / --num_train_epochs (default 100) steps per epoch."
        ),
    )
    max_train_minutes: float | None = field(
        default=None,
        metadata=_help(
            "Train for this many minutes instead of a number of steps or epochs: a short calibration "
            "at the start (a few warm-up steps, then timed steps and one evaluation when evaluation "
            "is on) measures this machine, and the step count is planned so that the training loop, "
            "its evaluations included, ends within the budget with every schedule (cosine learning "
            "rate, weight decay and momentum, teacher-temperature warm-up, last-layer freeze) "
            "complete. The plan is logged, saved in training_args.json and kept on resume."
        ),
    )
    num_train_epochs: float | None = field(
        default=None,
        metadata=_help(
            "Passes over the dataset; unset means 100, the official short recipe (k-NN 69.3%% for "
            "ViT-S/16 on ImageNet); 300-800 epochs add a few points."
        ),
    )
    base_learning_rate: float = field(
        default=OFFICIAL_LEARNING_RATE,
        metadata=_help(
            "Peak learning rate per 256 images, the recipes' value (official 5e-4 for AdamW): the rate used is "
            "this times the global batch size / 256 (the linear scaling rule of DINO and of transformers' "
            "run_mae.py), reached after the warm-up. --learning_rate, when given, replaces it."
        ),
    )
    learning_rate: float | None = field(
        default=None,
        metadata=_help(
            "Absolute peak learning rate, as in transformers' TrainingArguments: used as given, whatever the "
            "batch (overrides --base_learning_rate). Before dino_hf 0.2 this flag was the per-256 value: "
            "that value is now --base_learning_rate."
        ),
    )
    min_learning_rate: float = field(
        default=OFFICIAL_MIN_LEARNING_RATE,
        metadata=_help("Final learning rate of the cosine decay (not scaled by the batch size)."),
    )
    warmup_epochs: float = field(
        default=10.0,
        metadata=_help("Epochs of linear learning-rate warm-up from 0 (official: 10)."),
    )
    warmup_steps: int | None = field(
        default=None, metadata=_help("Learning-rate warm-up in optimiser steps; overrides --warmup_epochs.")
    )
    weight_decay: float = field(
        default=OFFICIAL_WEIGHT_DECAY,
        metadata=_help(
            "Initial AdamW weight decay, on weights only (not on biases and norms). A cosine schedule "
            "raises it to --weight_decay_end: a small decay early and a larger one late is what "
            "worked for ViTs in the paper."
        ),
    )
    weight_decay_end: float = field(
        default=OFFICIAL_WEIGHT_DECAY_END, metadata=_help("Final weight decay of the cosine schedule (official: 0.4).")
    )
    teacher_momentum: float = field(
        default=OFFICIAL_TEACHER_MOMENTUM,
        metadata=_help(
            "Initial EMA momentum of the teacher, raised to 1 with a cosine schedule. 0.996 suits "
            "batch 1024; with small batches try 0.99-0.995 (the teacher must move faster)."
        ),
    )
    teacher_temperature: float = field(
        default=OFFICIAL_TEACHER_TEMPERATURE,
        metadata=_help(
            "Teacher softmax temperature after the warm-up. Lower sharpens the targets; above 0.07 "
            "training tends to collapse to a uniform output. 0.04 is the official default, 0.07 the "
            "'boost' recipe (with a 30-epoch warm-up)."
        ),
    )
    warmup_teacher_temperature: float = field(
        default=OFFICIAL_TEACHER_TEMPERATURE,
        metadata=_help(
            "Teacher temperature at step 0, raised linearly to --teacher_temperature. Start low "
            "(0.04): a too high value early makes the training collapse."
        ),
    )
    warmup_teacher_temperature_epochs: float = field(
        default=0.0,
        metadata=_help("Epochs of the teacher-temperature warm-up (official: 0; 30 with teacher temperature 0.07)."),
    )
    warmup_teacher_temperature_steps: int | None = field(
        default=None,
        metadata=_help("Teacher-temperature warm-up in optimiser steps; overrides --warmup_teacher_temperature_epochs."),
    )
    num_prototypes: int | None = field(
        default=None,
        metadata=_help(
            "K, the number of prototypes of the DINO head's last layer (official 65536). Smaller K learns faster on "
            "small data and CPUs (the Fashion-MNIST recipe: 1024). Default: the model config's."
        ),
    )
    student_temperature: float | None = field(
        default=None,
        metadata=_help("Student softmax temperature; default: the model config's (0.1, as the official code)."),
    )
    center_momentum: float | None = field(
        default=None,
        metadata=_help("EMA momentum of the teacher center; default: the model config's (0.9, as the official code)."),
    )
    teacher_centering: str | None = field(
        default=None,
        metadata=_help(
            "How both teachers (DINO's and iBOT's) avoid collapse: centering (DINO: subtract an EMA of the "
            "teacher logits, then sharpen) or sinkhorn_knopp (DINOv2's large runs: a few Sinkhorn-Knopp "
            "iterations make the batch use every prototype equally, no center). Default: the model config's "
            "(centering)."
        ),
    )
    sinkhorn_iterations: int | None = field(
        default=None,
        metadata=_help("Sinkhorn-Knopp iterations with --teacher_centering sinkhorn_knopp; default: the model config's (3, as DINOv2)."),
    )
    ibot_loss_weight: float | None = field(
        default=None,
        metadata=_help(
            "Weight of DINOv2's iBOT masked-patch loss: the student's global crops are block-masked through "
            "the backbone's own mask token and its masked patch tokens learn the teacher's (unmasked) ones. "
            "1.0 in the DINOv2 recipe; 0 disables it (DINO v1). Needs a ViT-style backbone (ViT, DeiT, DINOv2, "
            "DINOv3 ViT). Default: the model config's (0)."
        ),
    )
    ibot_separate_head: bool | None = field(
        default=None,
        metadata=_help(
            "true: give the iBOT loss a projection head of its own (DINOv2's ViT-L/g recipes); false: share the "
            "DINO head (DINOv2's default config). Default: the model config's (shared)."
        ),
    )
    ibot_num_prototypes: int | None = field(
        default=None,
        metadata=_help("Prototypes of the separate iBOT head; default: the model config's (that of the DINO head)."),
    )
    koleo_loss_weight: float | None = field(
        default=None,
        metadata=_help(
            "Weight of DINOv2's KoLeo regulariser, which spreads the student's global-crop embeddings over the "
            "sphere within each process's batch (0.1 in the DINOv2 recipe; 0 disables it). Default: the model "
            "config's (0)."
        ),
    )
    mask_ratio_min_max: list[float] = field(
        default_factory=lambda: [0.1, 0.5],
        metadata=_help(
            "With iBOT: range of the fraction of a masked crop's patches that is masked (DINOv2: 0.1 0.5); the "
            "masked crops of a batch spread their ratios evenly over it."
        ),
    )
    mask_sample_probability: float = field(
        default=0.5,
        metadata=_help("With iBOT: fraction of the student's global crops that are masked (DINOv2: 0.5)."),
    )
    freeze_last_layer_epochs: float = field(
        default=1.0,
        metadata=_help(
            "Epochs during which the head's last (prototype) layer is not updated. Freezing it for "
            "the first epoch helps optimisation (official: 1; 3 for ViT-B)."
        ),
    )
    freeze_last_layer_steps: int | None = field(
        default=None,
        metadata=_help("Last-layer freeze in optimiser steps; overrides --freeze_last_layer_epochs."),
    )
    freeze_backbone_epochs: float | None = field(
        default=None,
        metadata=_help(
            "Head warm-up of continued pre-training: epochs during which the student's backbone is frozen "
            "(no backward pass through it) while the fresh heads learn on its features. Unset: none from "
            "scratch, a tenth of the run when --model_name_or_path is a pretrained backbone (fresh heads "
            "on a trained backbone otherwise drag it away from what it knew)."
        ),
    )
    freeze_backbone_steps: int | None = field(
        default=None,
        metadata=_help("Head warm-up in optimiser steps; overrides --freeze_backbone_epochs."),
    )
    backbone_learning_rate_scale: float | None = field(
        default=None,
        metadata=_help(
            "Learning-rate factor of the student's backbone (the heads keep the full rate). Unset: 1 from "
            "scratch, 0.1 when continuing from a pretrained backbone (it should move less than its fresh "
            "heads)."
        ),
    )
    layerwise_learning_rate_decay: float = field(
        default=1.0,
        metadata=_help(
            "Learning-rate factor per block from the top of the backbone (DINOv2 / BEiT fine-tuning use "
            "0.65-0.9): the lower blocks of a pretrained backbone change least. 1 disables it."
        ),
    )
    copy_student_head_after_freeze: bool = field(
        default=True,
        metadata=_help(
            "At the end of the head warm-up, give the teacher the student's head (the teacher's EMA of "
            "a fast-learning fresh head lags far behind it)."
        ),
    )
    optimizer: Literal["adamw", "sgd", "lars"] = field(
        default="adamw",
        metadata=_help(
            "adamw (the official ViT recipe), sgd (momentum 0.9, the official ResNet-50 recipe with "
            "--learning_rate 0.03 --weight_decay 1e-4 --weight_decay_end 1e-4) or lars (SGD with "
            "layer-wise adaptive rate scaling, for large batches of ConvNets)."
        ),
    )
    max_grad_norm: float = field(
        default=OFFICIAL_MAX_GRAD_NORM,
        metadata=_help(
            "Gradient clipping threshold (official: 3.0; 0.3 for ViT-B). Clipping helps ViT "
            "optimisation; 0 disables it."
        ),
    )
    clip_mode: Literal["per_parameter", "global"] = field(
        default="per_parameter",
        metadata=_help(
            "per_parameter clips each parameter's gradient norm separately, as the official code; "
            "global clips the norm of all gradients together (torch.nn.utils.clip_grad_norm_)."
        ),
    )
    mixed_precision: Literal["auto", "no", "bf16", "fp16"] = field(
        default="auto",
        metadata=_help(
            "Autocast precision, or 'auto' (chosen once at the start, logged and recorded): bf16 on a "
            "GPU that supports it, else fp16 with loss scaling; on a CPU bf16 only where a sub-second "
            "probe finds it faster than fp32 (CPUs with native bf16 instructions), else fp32 (no), "
            "since bf16 on a CPU without them is several times slower. An explicit no, bf16 or fp16 is "
            "obeyed; fp16 needs a CUDA GPU."
        ),
    )
    seed: int = field(
        default=0,
        metadata=_help("Random seed of initialisation, augmentation and data order (official: 0)."),
    )
    max_consecutive_nonfinite_steps: int = field(
        default=10,
        metadata=_help(
            "A step with a non-finite loss or gradient is skipped (no optimiser, teacher or center "
            "update); the run stops after this many in a row, keeping the last good checkpoint."
        ),
    )
    grad_norm_spike_factor: float = field(
        default=10.0,
        metadata=_help(
            "Warn when a logging window's largest gradient norm exceeds this many times the running "
            "median of the logged gradient norms (spikes often precede a divergence); 0 disables."
        ),
    )
    collapse_warning_steps: int = field(
        default=500,
        metadata=_help(
            "Warn when the loss stays at ln(K) (uniform collapse) or the teacher's batch-mean "
            "entropy near 0 (one-hot collapse) for this many optimiser steps."
        ),
    )
    torch_compile: bool = field(
        default=False,
        metadata=_help(
            "Compile the student and teacher backbones with torch.compile. Pays off for long GPU "
            "runs; the first steps are slow while it compiles."
        ),
    )
    activation_checkpointing: bool = field(
        default=False,
        metadata=_help(
            "Recompute the student backbone's activations during backward to save memory "
            "(about a third more compute); for large backbones or batches."
        ),
    )

    # ------------------------------------------------------------------ output
    output_dir: str | None = field(
        default=None,
        metadata=_help(
            "Folder for checkpoints, metrics.jsonl, the final model and the exported backbone. Required."
        ),
    )
    overwrite_output_dir: bool = field(
        default=False,
        metadata=_help(
            "Start afresh even if --output_dir already holds checkpoints (they are deleted). "
            "Without it such a folder is refused unless --resume_from_checkpoint is given."
        ),
    )
    checkpointing_steps: int = field(
        default=1000,
        metadata=_help(
            "Save a resumable checkpoint every this many optimiser steps (and on SIGTERM/SIGINT)."
        ),
    )
    checkpoints_total_limit: int | None = field(
        default=2,
        metadata=_help(
            "Keep only the newest this many checkpoints (each holds model and optimiser state); 0 keeps all (as "
            "does unset, in a config file). Keep at least 2 where disks or copies can fail: a damaged newest "
            "checkpoint is skipped for the one before."
        ),
    )
    resume_from_checkpoint: str | None = field(
        default=None,
        metadata=_help(
            "Continue a run: 'latest' (the newest complete checkpoint in --output_dir; starts "
            "afresh if there is none, so a requeued job can always pass it) or a checkpoint folder."
        ),
    )
    logging_steps: int = field(
        default=10,
        metadata=_help(
            "Log metrics every this many optimiser steps. Logging reads values from the device, so "
            "it is the only place the loop waits for it."
        ),
    )
    report_to: list[str] = field(
        default_factory=lambda: ["none"],
        metadata=_help(
            "Trackers besides output_dir/metrics.jsonl: any accelerate tracker (tensorboard, wandb, "
            "trackio, mlflow, comet_ml, aim, clearml, dvclive, swanlab; several allowed), all (every "
            "installed one) or none. TensorBoard logs go to output_dir/TRACKER_PROJECT_NAME."
        ),
    )
    tracker_project_name: str = field(
        default="dino_hf", metadata=_help("Project name under which trackers record the run.")
    )
    debug: bool = field(
        default=False, metadata=_help("Show full tracebacks instead of one-sentence errors.")
    )

    # ------------------------------------------------------------------ evaluation (k-NN monitor)
    eval_dataset_name: str | None = field(
        default=None,
        metadata=_help(
            "Labelled dataset for the periodic weighted k-NN evaluation of the teacher (same forms as "
            "--dataset_name). Unset disables evaluation."
        ),
    )
    eval_split: str = field(default="test", metadata=_help("Split of --eval_dataset_name to classify."))
    eval_train_split: str = field(
        default="train", metadata=_help("Split of --eval_dataset_name whose features are the k-NN memory bank.")
    )
    label_column: str = field(
        default="label",
        metadata=_help("Column of --eval_dataset_name holding the class labels (integers or strings).",
                       aliases=["--eval_label_column"]),
    )
    eval_steps: int | None = field(
        default=None,
        metadata=_help("Evaluate every this many optimiser steps; unset evaluates once at the end."),
    )
    eval_max_samples: int | None = field(
        default=10_000,
        metadata=_help(
            "Use at most this many images of each evaluation split, so that a periodic evaluation "
            "stays cheap; unset uses all."
        ),
    )
    eval_k: list[int] = field(
        default_factory=lambda: [20],
        metadata=_help(
            "Numbers of neighbours of the weighted k-NN evaluation (one metric knn_top1_kK each; they "
            "share one neighbour search). 20 is DINO's headline figure; the paper also reports 10, 100, 200."
        ),
    )
    eval_linear_probe: bool = field(
        default=False,
        metadata=_help(
            "Also fit a logistic-regression probe on the frozen teacher features at each evaluation "
            "(metric linear_probe_top1; seconds for 10k images, more for large feature sets)."
        ),
    )

    # ------------------------------------------------------------------ hub
    push_to_hub: bool = field(
        default=False,
        metadata=_help(
            "Push the exported backbone, model card and metrics to the Hub (main process only; a "
            "failed push warns and never stops training)."
        ),
    )
    hub_model_id: str | None = field(
        default=None, metadata=_help("Hub repository 'user/name' to push to (needed with --push_to_hub).")
    )
    hub_private_repo: bool = field(default=False, metadata=_help("Create the Hub repository as private."))
    hub_strategy: Literal["end", "checkpoint"] = field(
        default="end",
        metadata=_help("'end' pushes once after training; 'checkpoint' also pushes at every checkpoint."),
    )

    def __post_init__(self) -> None:
        check_training_arguments(self)  # every rule in one place, the flags' own names in each sentence

    # ------------------------------------------------------------------ derived values
    @property
    def requested_num_workers(self) -> int | None:
        """``--dataloader_num_workers`` as a count, ``None`` for auto."""
        return None if self.dataloader_num_workers == "auto" else int(self.dataloader_num_workers)

    @property
    def requested_num_threads(self) -> int | None:
        """``--torch_num_threads`` as a count, ``None`` for auto."""
        return None if self.torch_num_threads == "auto" else int(self.torch_num_threads)

    @classmethod
    def from_recipe(cls, name: str, **overrides: Any) -> DinoTrainingArguments:
        """The arguments of a shipped recipe (``fashion_mnist_cpu``...) or a YAML/JSON file, with
        ``overrides`` (e.g. ``output_dir``, ``max_steps``) on top: ``cls(config=name, **overrides)``."""
        return cls(config=name, **overrides)

    def hub_options(self, model: bool = False) -> dict[str, Any]:
        """``token`` and ``cache_dir`` for ``datasets.load_dataset``, with ``revision`` (``--model_revision``)
        for ``from_pretrained`` when ``model``; unset values are left out, so the libraries' defaults apply."""
        options = {"token": self.token, "cache_dir": self.cache_dir, **({"revision": self.model_revision} if model else {})}
        return {key: value for key, value in options.items() if value is not None}

    def run_length(self) -> RunLength:
        """The values the step plan reads (:func:`dino_hf.train.step_plan.plan_steps`)."""
        return RunLength(**{field.name: getattr(self, field.name) for field in dataclasses.fields(RunLength)
                            if field.name != "evaluates"}, evaluates=bool(self.eval_dataset_name))

    def global_batch_size(self, num_processes: int) -> int:
        """Source images per optimiser step over all processes and accumulation micro-steps."""
        return self.run_length().global_batch_size(num_processes)

    def scaled_learning_rate(self, num_processes: int) -> float:
        """The peak learning rate: ``--learning_rate`` when given, else ``--base_learning_rate`` x global batch / 256."""
        return self.run_length().scaled_learning_rate(num_processes)

    def to_dict(self) -> dict[str, Any]:
        """The arguments as plain values, for ``training_args.json`` and the trackers: without ``token``,
        which is never written or logged."""
        return {key: value for key, value in dataclasses.asdict(self).items() if key != "token"}

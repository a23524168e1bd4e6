"""Turning `DinoTrainingArguments` into the run's parts: model, augmentation, data, accelerator,
optimiser, schedules and the evaluation monitor.

Each ``build_*`` function takes the parsed arguments (and what the run already knows, e.g. the
device) and raises `ValueError` with one sentence naming the flag on bad input, before anything is
written. `dino_hf.train.loop` calls them in order; tests and scripts can call any one alone.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import warnings
from collections.abc import Callable
from typing import Any

import torch
from accelerate import Accelerator, PartialState
from accelerate.state import AcceleratorState
from accelerate.utils import (
    DistributedDataParallelKwargs,
    DistributedType,
    FullyShardedDataParallelPlugin,
    broadcast_object_list,
    parse_flag_from_env,
)
from transformers import AutoConfig, PreTrainedConfig

from dino_hf.base.run_folder import CONFIG_NAME
from dino_hf.data.augmentation import MultiCropAugmentation
from dino_hf.data.batched_augmentation import BatchedMultiCropAugmentation, DeviceMultiCrop
from dino_hf.data.loader import DinoDataLoader, create_train_dataloader, mix_seeds
from dino_hf.data.masking import MaskSampler
from dino_hf.data.sources import describe_image_source, is_named_source
from dino_hf.eval.evaluation import KnnMonitor
from dino_hf.models.backbones import SUPPORTED_MODEL_TYPES, config_patch_size, family_of
from dino_hf.models.configuration_dino import TRAINING_FLAG_FIELDS, DinoConfig
from dino_hf.models.modeling_dino import DinoForPreTraining
from dino_hf.train.arguments import DinoTrainingArguments
from dino_hf.train.hardware import (
    PrecisionChoice,
    choose_mixed_precision,
    choose_num_threads,
    choose_num_workers,
    measure_cpu_bf16_speedup,
    usable_cores,
)
from dino_hf.train.optimizers import build_optimizer_for_groups
from dino_hf.train.schedules import DinoSchedules
from dino_hf.train.step_plan import StepPlan
from dino_hf.train.trackers import resolve_report_to

logger = logging.getLogger(__name__)

__all__ = [
    "apply_config_overrides",
    "augmentation_working_size",
    "build_accelerator",
    "build_augmentation",
    "build_dataloader",
    "build_device_augmentation",
    "build_knn_monitor",
    "build_mask_sampler",
    "build_model",
    "build_model_config",
    "build_optimizer",
    "backbone_learning_rate_scale",
    "build_schedules",
    "choose_precision",
    "cores_per_process",
    "open_training_data",
    "prepare_model_and_optimizer",
    "set_compute_threads",
    "starts_from_backbone",
    "training_device",
    "worker_policy",
]


def apply_config_overrides(config: PreTrainedConfig, overrides: str | None, flag: str = "--config_overrides") -> None:
    """Apply ``"key=value,section.key=value"`` to a (nested) ``PreTrainedConfig`` in place.

    Values are converted to the type of the current value (bool: true/false; int; float; str).
    Raises:
        ValueError: one sentence naming ``flag`` for a malformed item, an unknown key or a bad value.
    """
    if not overrides:
        return
    for item in overrides.split(","):
        item = item.strip()
        if not item:
            continue
        key, separator, raw_value = item.partition("=")
        key, raw_value = key.strip(), raw_value.strip()
        if not separator or not key:
            raise ValueError(f"{flag} item {item!r} is not of the form key=value.")
        *sections, leaf = key.split(".")
        target = config
        for section in sections:
            target = getattr(target, section, None)
            if target is None or not hasattr(target, "to_dict"):
                raise ValueError(f"{flag} key {key!r} does not name a field of the model config.")
        if not hasattr(target, leaf) or leaf.startswith("_"):
            raise ValueError(f"{flag} key {key!r} does not name a field of the model config.")
        value = _convert_override(raw_value, getattr(target, leaf), key, flag)
        try:
            setattr(target, leaf, value)
        except (TypeError, ValueError) as error:
            raise ValueError(f"{flag} value {raw_value!r} is not valid for {key!r} ({error}).") from None


def _convert_override(raw_value: str, current: Any, key: str, flag: str) -> Any:
    lowered = raw_value.lower()
    try:
        if isinstance(current, bool):
            if lowered not in ("true", "false", "1", "0"):
                raise ValueError
            return lowered in ("true", "1")
        if isinstance(current, int):
            try:
                return int(raw_value)
            except ValueError:
                return float(raw_value)
        if isinstance(current, float):
            return float(raw_value)
        if current is None:
            if lowered in ("none", "null"):
                return None
            for convert in (int, float):
                with contextlib.suppress(ValueError):
                    return convert(raw_value)
            return {"true": True, "false": False}.get(lowered, raw_value)
        if isinstance(current, str):
            return raw_value
    except ValueError:
        raise ValueError(
            f"{flag} value {raw_value!r} for {key!r} is not a valid {type(current).__name__}."
        ) from None
    raise ValueError(f"{flag} cannot set {key!r}: its value is a {type(current).__name__}, not a number or string.")


def build_model_config(args: DinoTrainingArguments, distillation_embedding_size: int | None = None) -> DinoConfig:
    """`DinoConfig` from ``--model_config`` (preset name, folder or JSON) plus overrides; a distillation
    teacher's width when there is one."""
    name = os.path.expanduser(args.model_config)
    if name in DinoConfig.preset_names():
        config = DinoConfig.from_preset(name)
    elif os.path.isdir(name) and os.path.isfile(os.path.join(name, CONFIG_NAME)):
        _check_dino_config_file(os.path.join(name, CONFIG_NAME), name)
        config = DinoConfig.from_pretrained(name)
    elif os.path.isfile(name) and name.endswith(".json"):
        _check_dino_config_file(name, name)
        config = DinoConfig.from_json_file(name)
    else:
        raise ValueError(
            f"--model_config {name!r} is neither a preset ({', '.join(DinoConfig.preset_names())}) nor a "
            "folder or JSON file written by DinoConfig.save_pretrained."
        )
    _apply_model_settings(config, args, distillation_embedding_size)
    return config


def _check_dino_config_file(path: str, flag_value: str) -> None:
    """Refuse a config file of another model (e.g. a ResNet's): `DinoConfig` would silently ignore its
    fields and build the default ViT-S/16."""
    try:
        with open(path, encoding="utf-8") as handle:
            values = json.load(handle)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"--model_config {flag_value} could not be read as JSON ({type(error).__name__}).") from None
    model_type = values.get("model_type") if isinstance(values, dict) else None
    if model_type != DinoConfig.model_type:
        raise ValueError(
            f"--model_config {flag_value} holds a {model_type!r} config, not a DinoConfig: pass a preset "
            f"({', '.join(DinoConfig.preset_names())}) or a folder written by DinoConfig.save_pretrained (start from a "
            "backbone's weights with --model_name_or_path)."
        )


def _apply_model_settings(config: DinoConfig, args: DinoTrainingArguments,
                          distillation_embedding_size: int | None = None) -> None:
    """``--config_overrides``, then the model-setting flags that are given
    (:data:`dino_hf.models.configuration_dino.TRAINING_FLAG_FIELDS`), into ``config``; and the width of the
    distillation teacher (``None``: the run distils nothing)."""
    backbone = config.backbone_config
    width = getattr(backbone, "hidden_size", None)
    follows_width = width is not None and getattr(backbone, "pooler_output_size", None) == width
    apply_config_overrides(config, args.config_overrides)
    if follows_width and "pooler_output_size" not in (args.config_overrides or ""):
        # ViTConfig sets pooler_output_size to hidden_size when it is built; a width override must
        # carry it along, or an exported backbone describes a pooler of the preset's width.
        backbone.pooler_output_size = backbone.hidden_size
    for name in TRAINING_FLAG_FIELDS:
        value = getattr(args, name)
        if value is not None:
            setattr(config, name, value)
    config.distillation_embedding_size = distillation_embedding_size
    if args.ibot_num_prototypes is not None and not config.ibot_separate_head:
        raise ValueError(
            f"--ibot_num_prototypes {args.ibot_num_prototypes} sets the separate iBOT head's size: add "
            "--ibot_separate_head true (a shared head has the DINO head's num_prototypes)."
        )
    if config.uses_ibot:
        family_of(config.backbone_config).check_masking(config.backbone_config, "--ibot_loss_weight")


def _checkpoint_model_type(path: str, hub_options: dict[str, Any] | None = None) -> str:
    """``model_type`` of a local folder or Hub id (e.g. ``"vit"`` for an exported backbone); ``hub_options``:
    ``revision``, ``token``, ``cache_dir`` of a Hub id."""
    config_file = os.path.join(path, CONFIG_NAME)
    if os.path.isdir(path):
        if not os.path.isfile(config_file):
            raise ValueError(f"--model_name_or_path {path} holds no config.json: pass a folder written by save_pretrained.")
        with open(config_file, encoding="utf-8") as handle:
            return str(json.load(handle).get("model_type", ""))
    if os.path.exists(path):
        raise ValueError(f"--model_name_or_path {path} is a file: pass a folder written by save_pretrained or a Hub id.")
    try:
        return str(AutoConfig.from_pretrained(path, **(hub_options or {})).model_type)
    except (OSError, ValueError):
        raise ValueError(
            f"--model_name_or_path {path} is neither a local folder nor a reachable Hub model id."
        ) from None


def starts_from_backbone(args: DinoTrainingArguments) -> bool:
    """Whether the run continues pre-training of a backbone with fresh heads (``--model_name_or_path``
    names a backbone, not a DinoForPreTraining folder): the head warm-up and the lower backbone
    learning rate of continued pre-training then apply by default."""
    return (args.model_name_or_path is not None
            and _checkpoint_model_type(args.model_name_or_path, args.hub_options(model=True)) != DinoConfig.model_type)


def build_model(args: DinoTrainingArguments, distillation_embedding_size: int | None = None) -> DinoForPreTraining:
    """The `DinoForPreTraining` to train: fresh, from a DINO checkpoint or from a backbone of any family; with
    the projectors to a frozen teacher of ``distillation_embedding_size`` when the run distils one.

    A fresh backbone whose config has an ``image_size`` gets ``--global_crop_size`` unless the
    overrides set it; crop sizes must suit the backbone (multiples of the patch size for ViTs).
    """
    try:
        if args.model_name_or_path is None:
            config = build_model_config(args, distillation_embedding_size)
            backbone_config = config.backbone_config
            if hasattr(backbone_config, "image_size") and "backbone_config.image_size" not in (args.config_overrides or ""):
                backbone_config.image_size = args.global_crop_size
            _check_crop_sizes(args, backbone_config)
            model = DinoForPreTraining(config)
        else:
            hub_options = args.hub_options(model=True)
            model_type = _checkpoint_model_type(args.model_name_or_path, hub_options)
            if model_type == DinoConfig.model_type:
                config = DinoConfig.from_pretrained(args.model_name_or_path, **hub_options)
                if args.num_prototypes is not None and args.num_prototypes != config.num_prototypes:
                    raise ValueError(
                        f"--num_prototypes {args.num_prototypes} differs from the {config.num_prototypes} trained "
                        f"prototypes of {args.model_name_or_path}: drop the flag, or start a new head from its "
                        "exported backbone (--model_name_or_path of the run's backbone/ folder)."
                    )
                _apply_model_settings(config, args, distillation_embedding_size)
                model = DinoForPreTraining.from_pretrained(args.model_name_or_path, config=config, **hub_options)
            elif model_type in SUPPORTED_MODEL_TYPES:
                model = DinoForPreTraining.from_backbone(
                    args.model_name_or_path, config=build_model_config(args, distillation_embedding_size),
                    hub_options=hub_options)
            else:
                raise ValueError(
                    f"--model_name_or_path {args.model_name_or_path} holds a {model_type!r} model: pass a "
                    f"DinoForPreTraining folder or a backbone of one of these families: {', '.join(SUPPORTED_MODEL_TYPES)}."
                )
            _check_crop_sizes(args, model.config.backbone_config)
    except ValueError as error:
        message = str(error)
        if "--" not in message:
            message = f"--model_config/--config_overrides describe an impossible model: {message}"
        raise ValueError(message) from None
    if args.activation_checkpointing:
        backbone = model.student.backbone
        if not getattr(backbone, "supports_gradient_checkpointing", False):
            raise ValueError(
                f"--activation_checkpointing: {type(backbone).__name__} does not support activation checkpointing."
            )
        backbone.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    return model


def build_mask_sampler(args: DinoTrainingArguments, config: DinoConfig, process_index: int) -> MaskSampler | None:
    """The iBOT masks of the student's global crops (``None`` without iBOT), on the global crops' patch
    grid, from a generator seeded per process.

    Raises:
        ValueError: masking settings that would leave the iBOT loss nothing to learn from.
    """
    if not config.uses_ibot:
        return None
    if args.mask_sample_probability == 0 or args.mask_ratio_min_max[1] == 0:
        flag = "--mask_sample_probability 0" if args.mask_sample_probability == 0 else "--mask_ratio_min_max max 0"
        raise ValueError(
            f"{flag} masks no patch, so iBOT (--ibot_loss_weight {config.ibot_loss_weight:g}) would learn nothing: "
            "raise it (DINOv2: --mask_sample_probability 0.5 --mask_ratio_min_max 0.1 0.5) or pass --ibot_loss_weight 0."
        )
    patch_height, patch_width = config_patch_size(config.backbone_config)
    grid = (args.global_crop_size // patch_height, args.global_crop_size // patch_width)
    return MaskSampler(grid, args.mask_ratio_min_max, args.mask_sample_probability,
                       seed=mix_seeds(args.seed, process_index, 0x1B07))


def _check_crop_sizes(args: DinoTrainingArguments, backbone_config: PreTrainedConfig) -> None:
    family = family_of(backbone_config)
    for name in ("global_crop_size", "local_crop_size"):
        family.check_crop_size(backbone_config, getattr(args, name), f"--{name}")


def build_augmentation(args: DinoTrainingArguments) -> MultiCropAugmentation:
    """`MultiCropAugmentation` for the crop and augmentation flags (the official recipe's strengths scaled)."""
    return MultiCropAugmentation.with_strengths(
        args.color_jitter_strength,
        args.blur_probability_scale,
        global_crop_size=args.global_crop_size,
        local_crop_size=args.local_crop_size,
        num_local_crops=args.num_local_crops,
        global_crop_scale=tuple(args.global_crop_scale),
        local_crop_scale=tuple(args.local_crop_scale),
        color_jitter_probability=args.color_jitter_probability,
        grayscale_probability=args.grayscale_probability,
        blur_sigma=tuple(args.blur_sigma),
        global_solarize_probabilities=(0.0, args.solarize_probability),
    )


def augmentation_working_size(args: DinoTrainingArguments) -> int:
    """Longer side of the decoded images with on-device augmentation (default twice the global crop).

    Twice, because the longer side is what is fitted: a 4:3 photo then keeps a shorter side of 1.5x
    the global crop, so even a full-scale global crop is cut at a higher resolution than it is shown.
    """
    if args.augmentation_working_size is not None:
        return args.augmentation_working_size
    return 2 * args.global_crop_size


def build_device_augmentation(
    args: DinoTrainingArguments, device: torch.device, process_index: int
) -> DeviceMultiCrop | None:
    """`DeviceMultiCrop` for ``--augmentation_device cpu|cuda`` (``None`` for ``loader``).

    The batched pipeline copies every recipe field of `build_augmentation`'s per-image one, so both
    devices train with the same distributions. Its generator is seeded per process.
    """
    if args.augmentation_device == "loader":
        return None
    if args.augmentation_device == "cuda":
        if device.type != "cuda":
            raise ValueError(
                f"--augmentation_device cuda needs training on a CUDA GPU, but this run trains on {device.type}: "
                "use --augmentation_device loader or cpu."
            )
        target = device
    else:
        target = torch.device("cpu")
    batched = BatchedMultiCropAugmentation.from_augmentation(build_augmentation(args))
    return DeviceMultiCrop(batched, target, seed=mix_seeds(args.seed, process_index, 0xA06),
                           working_size=augmentation_working_size(args))


def build_dataloader(
    args: DinoTrainingArguments,
    augmentation: MultiCropAugmentation,
    process_index: int,
    num_processes: int,
    num_workers: int | Callable[[int | None], int] | None = None,
    dataset: Any = None,
) -> DinoDataLoader:
    """This process's shard of the training data (`DinoDataLoader`, CPU tensors).

    ``dataset``: the images as an object (a ``datasets`` or torch dataset,
    :func:`dino_hf.data.sources.open_image_source`) instead of ``--dataset_name``.

    With ``--augmentation_device cpu|cuda`` the loader only decodes (``augmentation`` is not used).
    ``num_workers`` defaults to ``--dataloader_num_workers`` (0 for auto: pass the policy of
    :func:`worker_policy` to resolve auto from the shards).
    """
    if num_workers is None:
        num_workers = args.requested_num_workers or 0
    on_loader = args.augmentation_device == "loader"
    return create_train_dataloader(
        args.dataset_name if dataset is None else dataset,
        augmentation=augmentation if on_loader else None,
        working_size=None if on_loader else augmentation_working_size(args),
        pin_memory=args.augmentation_device == "cuda",
        batch_size=args.per_device_train_batch_size,
        dataset_config_name=args.dataset_config_name,
        split=args.train_split,
        image_column=args.image_column,
        streaming=args.streaming,
        num_workers=num_workers,
        shuffle_buffer_size=args.shuffle_buffer_size,
        seed=args.seed,
        process_index=process_index,
        num_processes=num_processes,
        hub_options=args.hub_options(),
    )


def cores_per_process(num_processes: int) -> int:
    """Usable cores over the training processes on this machine (at least 1)."""
    local_processes = int(os.environ.get("LOCAL_WORLD_SIZE", num_processes))
    return max(1, usable_cores() // max(local_processes, 1))


def worker_policy(args: DinoTrainingArguments, accelerator: Accelerator) -> Callable[[int | None], int]:
    """``--dataloader_num_workers`` as a function of the shards this process reads (auto: `choose_num_workers`)."""
    cores = cores_per_process(accelerator.num_processes)

    def policy(num_shards_per_process: int | None) -> int:
        return choose_num_workers(args.requested_num_workers, cores, num_shards_per_process, accelerator.device.type)

    return policy


def open_training_data(args: DinoTrainingArguments, accelerator: Accelerator, dataset: Any = None) -> DinoDataLoader:
    """`build_dataloader` with the worker count resolved for this machine; library errors that name
    no flag are attributed to the data flags."""
    if dataset is None and not args.dataset_name:
        raise ValueError("--dataset_name is required: pass a Hub dataset id or a local path (or, from Python, "
                         "DinoTrainer(train_dataset=...)).")
    try:
        return build_dataloader(
            args,
            build_augmentation(args),
            accelerator.process_index,
            accelerator.num_processes,
            num_workers=worker_policy(args, accelerator),
            dataset=dataset,
        )
    except (ValueError, KeyError) as error:
        message = str(error).strip("'\"")
        if "--" in message:
            raise
        source = args.dataset_name if dataset is None else describe_image_source(dataset)
        raise ValueError(
            f"--dataset_name {source} (split --train_split {args.train_split}) could not be opened: {message}"
        ) from None


def _trackers(report_to: list[str]) -> list[str] | None:
    """``--report_to`` as accelerate's ``log_with``: every named tracker, ``all`` the installed ones."""
    return resolve_report_to(report_to) or None


def training_device() -> torch.device:
    """The device accelerate will train on (its process state is created here, once per process).

    ``ACCELERATE_USE_CPU`` is read as `Accelerator` reads it: the shared state created here is the one
    the accelerator then uses. Several processes launched on a machine without an accelerator
    (``torchrun --nproc_per_node 2`` on a CPU-only machine) train on the CPU together: accelerate
    1.15 without ``cpu=True`` would give each of them a state of its own, and they would run as
    independent copies writing to one folder.
    """
    return PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU") or _several_processes_without_accelerator()).device


def _several_processes_without_accelerator() -> bool:
    """A multi-process launch (``WORLD_SIZE`` > 1, as torchrun and accelerate launch set) with no GPU or
    other accelerator to give each process."""
    if int(os.environ.get("WORLD_SIZE", "1") or 1) <= 1:
        return False
    accelerator_api = getattr(torch, "accelerator", None)
    if accelerator_api is not None:
        return not accelerator_api.is_available()
    return not torch.cuda.is_available()


def choose_precision(args: DinoTrainingArguments, device: torch.device, recorded: str | None = None) -> PrecisionChoice:
    """``--mixed_precision`` resolved for ``device`` (`choose_mixed_precision`); fp16 refused without a GPU.

    ``recorded``: the precision a run being resumed chose at its start (its ``training_args.json``):
    ``auto`` keeps it, since a probe near its threshold may decide otherwise now and the resumed run
    would no longer be the same run.

    Raises:
        ValueError: fp16 on a device other than a CUDA GPU (on the CPU it would silently do nothing).
    """
    if args.mixed_precision == "fp16" and device.type != "cuda":
        raise ValueError(
            "--mixed_precision fp16 needs a CUDA GPU (on the CPU it would silently do nothing); use --mixed_precision "
            "auto, which picks fp32 or --mixed_precision bf16, whichever is faster on this CPU."
        )
    if args.mixed_precision == "auto" and recorded in ("no", "bf16", "fp16") and not (recorded == "fp16" and
                                                                                   device.type != "cuda"):
        return PrecisionChoice(recorded, f"{recorded}: the precision this run chose at its start, kept on resume.")
    cuda_bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
    return choose_mixed_precision(args.mixed_precision, device.type, cuda_bf16, _bf16_probe_of_the_main_process)


def _bf16_probe_of_the_main_process() -> float:
    """`measure_cpu_bf16_speedup` on the main process, shared with the others: every process must
    decide the same precision, and two probes on a busy machine can disagree."""
    state = PartialState()
    value = [measure_cpu_bf16_speedup() if state.is_main_process else 0.0]
    if state.num_processes > 1:
        broadcast_object_list(value, from_process=0)
    return float(value[0])


def set_compute_threads(args: DinoTrainingArguments, accelerator: Accelerator, num_workers: int) -> int:
    """Set torch's compute threads (``--torch_num_threads``, auto: `choose_num_threads`); returns the count."""
    threads = args.requested_num_threads
    if threads is None:
        threads = choose_num_threads(cores_per_process(accelerator.num_processes), num_workers, accelerator.device.type)
    torch.set_num_threads(threads)
    return threads


def _may_freeze_backbone(args: DinoTrainingArguments) -> bool:
    """Whether the run may have a head warm-up (explicit, or the default of continued pre-training)."""
    if args.freeze_backbone_steps is not None or args.freeze_backbone_epochs is not None:
        return bool(args.freeze_backbone_steps or args.freeze_backbone_epochs)
    return starts_from_backbone(args)


def build_accelerator(args: DinoTrainingArguments, mixed_precision: str) -> Accelerator:
    """`Accelerator` with the resolved precision (`choose_precision`) and the trackers; under
    ``accelerate launch --use_fsdp``, FSDP2 (also on CPU processes, see :func:`_enable_fsdp_on_cpu`).

    Raises:
        ValueError: FSDP options that cannot work (one process, FSDP1, unsharded checkpoints, the
            periodic evaluation), naming the flag.
    """
    use_fsdp = parse_flag_from_env("ACCELERATE_USE_FSDP")
    if use_fsdp:
        _check_fsdp_options(args)
    # Buffers need no broadcast: the center is all-reduced by DinoLoss.update_center, and the
    # teacher (inside the wrapped module) is kept identical by identical EMA updates. A head warm-up
    # leaves the backbone without gradients for a while, which DDP must be told about.
    ddp_kwargs = DistributedDataParallelKwargs(broadcast_buffers=False,
                                               find_unused_parameters=_may_freeze_backbone(args))
    accelerator = Accelerator(
        mixed_precision=mixed_precision,
        log_with=_trackers(args.report_to),
        project_dir=args.output_dir,
        step_scheduler_with_optimizer=False,
        kwargs_handlers=[ddp_kwargs],
    )
    if use_fsdp and accelerator.distributed_type == DistributedType.MULTI_CPU:
        _enable_fsdp_on_cpu(accelerator)
    return accelerator


def _check_fsdp_options(args: DinoTrainingArguments) -> None:
    """One sentence naming the ``accelerate launch`` FSDP flag (or ours) that cannot work."""
    if PartialState().num_processes == 1:
        raise ValueError(
            "--use_fsdp (accelerate launch) shards the student, teacher and optimiser state over processes, and this "
            "run has one: launch several (--num_processes) or drop --use_fsdp."
        )
    version = os.environ.get("FSDP_VERSION", "1")
    if version != "2":
        raise ValueError(
            f"--fsdp_version {version}: dino_hf shards with FSDP2 (torch's fully_shard, whose shards the EMA and the "
            "gradient clipping handle): pass --fsdp_version 2."
        )
    state_dict_type = os.environ.get("FSDP_STATE_DICT_TYPE", "SHARDED_STATE_DICT").upper()
    if state_dict_type not in ("SHARDED_STATE_DICT", "3"):  # (3: torch's StateDictType.SHARDED_STATE_DICT)
        raise ValueError(
            f"--fsdp_state_dict_type {state_dict_type}: checkpoints under FSDP are sharded (torch.distributed.checkpoint, "
            "each process writes its shards; the final model and the backbone export are consolidated safetensors): "
            "pass --fsdp_state_dict_type SHARDED_STATE_DICT."
        )
    if args.eval_dataset_name:
        raise ValueError(
            "--eval_dataset_name: the periodic k-NN evaluation does not run on a sharded teacher yet; under "
            "--use_fsdp evaluate the exported backbone with scripts/eval_knn.py instead."
        )
    if parse_flag_from_env("FSDP_CPU_RAM_EFFICIENT_LOADING"):
        # accelerate launch's default: process 0 alone would load weights and broadcast the parameters, which
        # leaves the loss centers (buffers) out and fails; every process builds the same model anyway (same seed,
        # same files), so the usual loading is kept. Set before transformers or the plugin read it.
        os.environ["FSDP_CPU_RAM_EFFICIENT_LOADING"] = "false"
        logger.info("--fsdp_cpu_ram_efficient_loading is not used: every process builds the model itself.")


def _enable_fsdp_on_cpu(accelerator: Accelerator) -> None:
    """Turn on FSDP2 for CPU processes (gloo), where accelerate silently falls back to DDP.

    accelerate enables FSDP only for accelerator devices, although torch's ``fully_shard`` also
    shards over CPU processes; dino_hf then sets the distributed type and the plugin (read from the
    ``FSDP_*`` variables of ``accelerate launch``) that ``Accelerator`` would have set, so that its
    ``prepare``, ``save_state`` and ``load_state`` shard as on GPUs (what the 2-process CPU tests run).
    """
    plugin = FullyShardedDataParallelPlugin()
    if accelerator.mixed_precision != "no":
        plugin.set_mixed_precision(accelerator.mixed_precision)
    # both shared states: every AcceleratorState() re-reads PartialState's distributed type
    PartialState._shared_state["distributed_type"] = DistributedType.FSDP
    AcceleratorState._shared_state["distributed_type"] = DistributedType.FSDP
    accelerator.state.fsdp_plugin = plugin


def build_optimizer(
    model: DinoForPreTraining, device: torch.device, args: DinoTrainingArguments | None = None
) -> torch.optim.Optimizer:
    """``--optimizer`` (AdamW by default) over the student's parameter groups (`get_parameter_groups`:
    no weight decay on biases and norms; the backbone's learning-rate scale and layer-wise decay).

    Learning rate and weight decay are set each step. ``args`` ``None`` gives AdamW at full scale.
    """
    name, backbone_scale, layer_decay = "adamw", 1.0, 1.0
    if args is not None:
        name, layer_decay = args.optimizer, args.layerwise_learning_rate_decay
        backbone_scale = backbone_learning_rate_scale(args)
    groups = model.get_parameter_groups(0.0, backbone_scale, layer_decay)
    groups = [group for group in groups if group["params"]]
    return build_optimizer_for_groups(name, groups, device)


#: The backbone's learning-rate factor when continuing from a pretrained backbone and
#: --backbone_learning_rate_scale is unset (chosen by measurement: the ``continued_pretraining`` rows
#: of benchmarks/RESULTS.md).
CONTINUED_BACKBONE_LEARNING_RATE_SCALE = 0.1


def backbone_learning_rate_scale(args: DinoTrainingArguments) -> float:
    """``--backbone_learning_rate_scale``, else :data:`CONTINUED_BACKBONE_LEARNING_RATE_SCALE` for continued
    pre-training and 1 from scratch or from a DinoForPreTraining folder."""
    if args.backbone_learning_rate_scale is not None:
        return args.backbone_learning_rate_scale
    return CONTINUED_BACKBONE_LEARNING_RATE_SCALE if starts_from_backbone(args) else 1.0


def build_schedules(args: DinoTrainingArguments, plan: StepPlan) -> DinoSchedules:
    """`DinoSchedules` from the arguments and the step plan (all step counts resolved)."""
    return DinoSchedules(
        total_steps=plan.total_steps,
        learning_rate=plan.learning_rate,
        min_learning_rate=args.min_learning_rate,
        warmup_steps=plan.warmup_steps,
        weight_decay=args.weight_decay,
        weight_decay_end=args.weight_decay_end,
        teacher_momentum=args.teacher_momentum,
        teacher_temperature=args.teacher_temperature,
        warmup_teacher_temperature=args.warmup_teacher_temperature,
        warmup_teacher_temperature_steps=plan.warmup_teacher_temperature_steps,
        freeze_last_layer_steps=plan.freeze_last_layer_steps,
        freeze_backbone_steps=plan.freeze_backbone_steps,
    )


def build_knn_monitor(
    args: DinoTrainingArguments, num_workers: int = 0, image_processor: dict | None = None, dataset: Any = None
) -> KnnMonitor | None:
    """The periodic k-NN evaluation of ``--eval_dataset_name``, or of ``dataset`` (an object holding
    both splits, :func:`dino_hf.data.sources.open_image_source`); ``None`` without either.

    A Hub dataset is streamed when the training data is (``--streaming``), so that
    ``--eval_max_samples`` images are read rather than the whole split downloaded; a local one is read
    map-style (its seeded subset is then an unbiased draw even from class-sorted folders).
    ``image_processor``: the one a continued backbone came with (evaluation sees what its export will).
    """
    source = args.eval_dataset_name if dataset is None else dataset
    if source is None or (is_named_source(source) and not source):
        return None
    is_local = not is_named_source(source) or os.path.exists(os.path.expanduser(source))
    return KnnMonitor(
        source,
        train_split=args.eval_train_split,
        test_split=args.eval_split,
        image_column=args.image_column,
        label_column=args.label_column,
        max_train_samples=args.eval_max_samples,
        max_test_samples=args.eval_max_samples,
        k=tuple(args.eval_k),
        linear_probe=args.eval_linear_probe,
        num_workers=num_workers,
        streaming=args.streaming and not is_local,
        seed=args.seed,
        image_processor=image_processor,
        # without the processor a backbone came with, the export's: a resize to the global crop
        image_size=None if image_processor else args.global_crop_size,
        hub_options=args.hub_options(),
    )


def _maybe_convert_sync_batch_norm(model: DinoForPreTraining, accelerator: Accelerator) -> DinoForPreTraining:
    """Batch norms (a ResNet backbone, a batch-norm head) are synchronised across GPUs, as in the
    official code (``nn.SyncBatchNorm`` needs CUDA: CPU processes keep per-process statistics)."""
    if accelerator.num_processes > 1 and accelerator.device.type == "cuda" and _batch_norms(model):
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    return model


def _batch_norms(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The model's batch norm layers (a ResNet backbone's, a batch-norm head's)."""
    return [module for module in model.modules() if isinstance(module, torch.nn.modules.batchnorm._BatchNorm)]


def _shard_batch_norms_in_float32(model: torch.nn.Module, accelerator: Accelerator) -> None:
    """Under FSDP with mixed precision, each batch norm becomes an FSDP2 unit of its own whose weights stay
    float32, before accelerate shards the rest (it leaves modules that are already units as they are).

    FSDP2 casts a unit's parameters to bf16 (fp16) for compute but not its buffers, and batch norm refuses
    bf16 weights beside float32 running statistics ("expected scalar type BFloat16 but found Float"); under
    DDP, autocast keeps batch norms in float32 as well. The unit takes its input as it comes (bf16 from the
    layer before: batch norm accepts it beside float32 weights and returns bf16), so the layers after it
    get the dtype they compute in.
    """
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    plugin = accelerator.state.fsdp_plugin
    policy = MixedPrecisionPolicy(param_dtype=torch.float32, reduce_dtype=torch.float32, cast_forward_inputs=False)
    for module in _batch_norms(model):
        fully_shard(module, mp_policy=policy, reshard_after_forward=plugin.reshard_after_forward,
                    offload_policy=plugin.cpu_offload)


def prepare_model_and_optimizer(
    args: DinoTrainingArguments, accelerator: Accelerator, model: DinoForPreTraining
) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    """Sync batch norm, the attention kernel, compilation, device placement, float32 batch-norm units under FSDP
    with mixed precision, AdamW and the (DDP or FSDP) wrapping."""
    model = _maybe_convert_sync_batch_norm(model, accelerator)
    if accelerator.mixed_precision == "bf16" and accelerator.device.type == "cpu" and model.student.family.has_attention:
        # The SDPA backward in bf16 is slow on the CPU and eager attention is faster there (see
        # benchmarks/RESULTS.md, bench_train_step); the exports keep the configured implementation.
        for network in (model.student, model.teacher):
            network.backbone.set_attn_implementation("eager")
    if args.torch_compile:
        model.student.compile_backbone()
        model.teacher.compile_backbone()
    model.to(accelerator.device)
    if accelerator.distributed_type == DistributedType.FSDP and accelerator.mixed_precision != "no":
        _shard_batch_norms_in_float32(model, accelerator)
    optimizer = build_optimizer(model, accelerator.device, args)
    with warnings.catch_warnings():  # accelerate 1.x forwards the still-needed broadcast_buffers=False
        warnings.filterwarnings("ignore", message=".*broadcast_buffers.*", category=FutureWarning)
        model, optimizer = accelerator.prepare(model, optimizer)
    if accelerator.distributed_type == DistributedType.FSDP:
        # FSDP2 warns at the first forward that an output is a view (student_logits, the head's (N, K)
        # output viewed as (crops, batch, K)), since an in-place op on it would drop the backward hook FSDP2
        # puts there. Nothing modifies the forward's outputs in place (the step reads the loss and the
        # statistics), and copying the logits to silence it would cost a (crops, batch, K) tensor a step.
        warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module \(FSDPDinoForPreTraining\) returned a view",
                                category=UserWarning)
    model.train()
    return model, optimizer

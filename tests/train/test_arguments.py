"""DinoTrainingArguments: parsing (command line, YAML/JSON config) and validation."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from dino_hf.base.official_recipe import OFFICIAL_NUM_TRAIN_EPOCHS
from dino_hf.train.argument_parsing import build_argument_parser, parse_training_args
from dino_hf.train.arguments import DinoTrainingArguments
from dino_hf.train.recipes import shipped_recipes
from dino_hf.train.step_plan import plan_steps

REPO = Path(__file__).resolve().parents[2]
CONFIGS = sorted((REPO / "scripts" / "configs").glob("*.yaml"))
REQUIRED = ["--dataset_name", "data", "--output_dir", "out"]
REQUIRED_VALUES = {"dataset_name": "data", "output_dir": "out"}


def make_args(**overrides) -> DinoTrainingArguments:
    return DinoTrainingArguments(dataset_name="data", output_dir="out", **overrides)


def test_defaults_are_the_official_recipe():
    args = make_args()
    assert args.base_learning_rate == 5e-4 and args.learning_rate is None
    assert args.min_learning_rate == 1e-6 and args.warmup_epochs == 10
    assert (args.weight_decay, args.weight_decay_end) == (0.04, 0.4)
    assert args.teacher_momentum == 0.996 and args.teacher_temperature == 0.04
    assert args.max_grad_norm == 3.0 and args.clip_mode == "per_parameter"
    assert args.num_local_crops == 8 and (args.global_crop_size, args.local_crop_size) == (224, 96)
    assert args.global_crop_scale == [0.4, 1.0] and args.local_crop_scale == [0.05, 0.4]
    assert args.freeze_last_layer_epochs == 1 and args.num_train_epochs is None  # unset: 100 epochs
    assert OFFICIAL_NUM_TRAIN_EPOCHS == 100 and plan_steps(args.run_length(), 6400, 1).total_steps == 100 * 100
    assert args.model_config == "vit_small_patch16"


def test_every_flag_has_a_help_string_and_help_exits_zero(capsys):
    for field in dataclasses.fields(DinoTrainingArguments):
        assert len(field.metadata.get("help", "")) > 20, field.name
    with pytest.raises(SystemExit) as exit_info:
        parse_training_args(["--help"])
    assert exit_info.value.code == 0
    assert "official" in capsys.readouterr().out


def test_command_line_types_lists_and_booleans():
    args = parse_training_args(
        REQUIRED + ["--global_crop_scale", "0.3", "1", "--no_streaming", "--max_steps", "7",
                    "--learning_rate", "1e-3", "--torch_compile", "--clip_mode", "global"]
    )
    assert args.global_crop_scale == [0.3, 1.0]
    assert args.streaming is False and args.torch_compile is True
    assert args.max_steps == 7 and args.learning_rate == 1e-3 and args.clip_mode == "global"


def test_config_file_values_with_command_line_overrides(tmp_path):
    config = tmp_path / "recipe.yaml"
    # 5e-4 without a dot is a *string* for YAML 1.1; it must still become a float.
    config.write_text(
        "dataset_name: data\noutput_dir: out\nlearning_rate: 5e-4\nmax_steps: 10\n"
        "local_crop_scale: [0.1, 0.3]\nstreaming: false\nmixed_precision: bf16\n"
    )
    args = parse_training_args(["--config", str(config), "--max_steps", "20"])
    assert args.learning_rate == 5e-4 and isinstance(args.learning_rate, float)
    assert args.max_steps == 20  # the command line wins
    assert args.local_crop_scale == [0.1, 0.3] and args.streaming is False
    assert args.mixed_precision == "bf16" and args.config == str(config)


def test_a_runs_training_args_json_replays_with_config(tmp_path):
    """``training_args.json`` (the arguments plus facts of the run) is a valid ``--config``."""
    args = make_args(max_steps=3, global_crop_scale=[0.5, 1.0])
    path = tmp_path / "training_args.json"
    path.write_text(json.dumps({**args.to_dict(), "num_processes": 1, "hardware": "cpu", "train_runtime": 1.5}))
    parsed = parse_training_args(["--config", str(path)])
    assert parsed == dataclasses.replace(args, config=str(path))


def test_a_training_args_json_of_dino_hf_0_1_keeps_its_per_256_learning_rate(tmp_path):
    """Before 0.2 ``learning_rate`` was per 256 images; a recorded run of then (``scaled_learning_rate`` beside
    it, no ``base_learning_rate``) replays with that value as ``--base_learning_rate``."""
    path = tmp_path / "training_args.json"
    path.write_text(json.dumps({**REQUIRED_VALUES, "learning_rate": 2e-3, "scaled_learning_rate": 5e-4}))
    parsed = parse_training_args(["--config", str(path)])
    assert parsed.base_learning_rate == 2e-3 and parsed.learning_rate is None


def test_the_token_is_never_printed_nor_recorded():
    args = make_args(token="hf_abcdefghijklmnopqrstuvwxyz")
    assert args.token == "hf_abcdefghijklmnopqrstuvwxyz" and args.hub_options() == {"token": args.token}
    assert "hf_abc" not in repr(args) and "token" not in args.to_dict()
    assert make_args(model_revision="v1", cache_dir="cache").hub_options(model=True) == {
        "revision": "v1", "cache_dir": "cache"}


def test_negative_flags_say_what_they_do(capsys):
    with pytest.raises(SystemExit):
        parse_training_args(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--no_streaming, --no-streaming Turn --streaming off (it is on by default)." in text
    assert "Turn --streaming off (it is on by default). (default: False)" not in text


@pytest.mark.parametrize(
    ("content", "fragment"),
    [
        ("learning_rate: fast\n", "'learning_rate' has value 'fast'"),
        ("no_such_flag: 1\n", "'no_such_flag' is not a training argument"),
        ("clip_mode: sometimes\n", "'clip_mode' must be one of"),
        ("- a list\n", "must hold a mapping"),
        ("max_steps: [1, 2]\n", "'max_steps' takes a single value"),
    ],
)
def test_bad_config_files_name_the_key(tmp_path, content, fragment):
    config = tmp_path / "bad.yaml"
    config.write_text(content)
    with pytest.raises(ValueError, match="--config") as error:
        parse_training_args(["--config", str(config)] + REQUIRED)
    assert fragment in str(error.value)


def test_missing_config_file():
    with pytest.raises(ValueError, match="--config nowhere.yaml is neither a YAML/JSON file nor a shipped recipe"):
        parse_training_args(["--config", "nowhere.yaml"])


def test_config_takes_a_shipped_recipe_by_name_from_any_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no scripts/configs here: the package's own copy is read
    by_name = parse_training_args(["--config", "fashion_mnist_cpu"])
    assert by_name.global_crop_size == 28 and by_name.dataset_name == "data/fashion_mnist"
    assert parse_training_args(["--config", "scripts/configs/fashion_mnist_cpu.yaml"]).global_crop_size == 28
    assert set(shipped_recipes()) == {path.stem for path in CONFIGS}  # scripts/configs is the package's folder
    help_text = DinoTrainingArguments.__dataclass_fields__["config"].metadata["help"]
    assert all(name in help_text for name in shipped_recipes())  # --help names every shipped recipe


def test_old_spellings_are_aliases_on_the_command_line_and_in_config_files(tmp_path):
    old = parse_training_args(REQUIRED + ["--eval_label_column", "fine_label"])
    new = parse_training_args(REQUIRED + ["--label_column", "fine_label"])
    assert old == new and new.label_column == "fine_label"
    config = tmp_path / "old.json"
    config.write_text(json.dumps({"dataset_name": "data", "output_dir": "out", "eval_label_column": "kind"}))
    assert parse_training_args(["--config", str(config)]).label_column == "kind"


def test_report_to_takes_any_accelerate_tracker_and_several():
    assert make_args().report_to == ["none"]
    assert make_args(report_to=["tensorboard,mlflow"]).report_to == ["tensorboard", "mlflow"]
    assert parse_training_args(REQUIRED + ["--report_to", "trackio", "comet_ml"]).report_to == ["trackio", "comet_ml"]
    assert make_args(report_to=["all"]).report_to == ["all"]
    with pytest.raises(ValueError, match="--report_to nosuch is not a tracker accelerate knows"):
        make_args(report_to=["nosuch"])


@pytest.mark.parametrize(
    ("flags", "flag_named"),
    [
        (["--dataset_name", "d"], "--output_dir"),
        (REQUIRED + ["--num_local_crops", "-1"], "--num_local_crops"),
        (REQUIRED + ["--per_device_train_batch_size", "0"], "--per_device_train_batch_size"),
        (REQUIRED + ["--global_crop_size", "0"], "--global_crop_size"),
        (REQUIRED + ["--local_crop_size", "256"], "--local_crop_size"),
        (REQUIRED + ["--global_crop_scale", "0.5", "0.2"], "--global_crop_scale"),
        (REQUIRED + ["--local_crop_scale", "0.1"], "--local_crop_scale"),
        (REQUIRED + ["--learning_rate", "0"], "--learning_rate"),
        (REQUIRED + ["--teacher_momentum", "1.5"], "--teacher_momentum"),
        (REQUIRED + ["--teacher_temperature", "-0.1"], "--teacher_temperature"),
        (REQUIRED + ["--max_steps", "0"], "--max_steps"),
        (REQUIRED + ["--gradient_accumulation_steps", "0"], "--gradient_accumulation_steps"),
        (REQUIRED + ["--max_grad_norm", "-1"], "--max_grad_norm"),
        (REQUIRED + ["--push_to_hub"], "--hub_model_id"),
        (REQUIRED + ["--blur_sigma", "2", "1"], "--blur_sigma"),
        (REQUIRED + ["--color_jitter_probability", "2"], "--color_jitter_probability"),
        (REQUIRED + ["--dataloader_num_workers", "-1"], "--dataloader_num_workers"),
        (REQUIRED + ["--dataloader_num_workers", "many"], "--dataloader_num_workers"),
        (REQUIRED + ["--torch_num_threads", "0"], "--torch_num_threads"),
        (REQUIRED + ["--max_train_minutes", "0"], "--max_train_minutes"),
        (REQUIRED + ["--max_train_minutes", "5", "--max_steps", "100"], "--max_train_minutes"),
        (REQUIRED + ["--max_train_minutes", "5", "--num_train_epochs", "3"], "--num_train_epochs"),
        (REQUIRED + ["--mask_ratio_min_max", "0.5", "0.1"], "--mask_ratio_min_max"),
        (REQUIRED + ["--mask_ratio_min_max", "-0.1", "0.5"], "--mask_ratio_min_max"),
        (REQUIRED + ["--mask_ratio_min_max", "0.1", "1.5"], "--mask_ratio_min_max"),
        (REQUIRED + ["--mask_ratio_min_max", "0.1"], "--mask_ratio_min_max"),
        (REQUIRED + ["--mask_sample_probability", "1.5"], "--mask_sample_probability"),
        (REQUIRED + ["--ibot_loss_weight", "-1"], "--ibot_loss_weight"),
        (REQUIRED + ["--koleo_loss_weight", "nan"], "--koleo_loss_weight"),
        (REQUIRED + ["--sinkhorn_iterations", "0"], "--sinkhorn_iterations"),
        (REQUIRED + ["--teacher_centering", "mean"], "--teacher_centering"),
    ],
)
def test_invalid_values_raise_one_sentence_naming_the_flag(flags, flag_named):
    with pytest.raises(ValueError) as error:
        parse_training_args(flags)
    message = str(error.value)
    assert flag_named in message
    assert message.endswith(".") and message.count(". ") == 0 and "\n" not in message


def test_dinov2_flags_parse_and_default_to_the_model_config():
    args = parse_training_args(REQUIRED)
    assert (args.ibot_loss_weight, args.koleo_loss_weight, args.teacher_centering, args.ibot_separate_head) == (
        None, None, None, None)  # the model config's (DINO v1)
    assert args.mask_ratio_min_max == [0.1, 0.5] and args.mask_sample_probability == 0.5  # DINOv2's
    args = parse_training_args(REQUIRED + ["--ibot_loss_weight", "1", "--koleo_loss_weight", "0.1", "--teacher_centering",
                                           "sinkhorn_knopp", "--sinkhorn_iterations", "5", "--ibot_separate_head",
                                           "true", "--ibot_num_prototypes", "4096"])
    assert (args.ibot_loss_weight, args.koleo_loss_weight, args.teacher_centering, args.sinkhorn_iterations,
            args.ibot_separate_head, args.ibot_num_prototypes) == (1.0, 0.1, "sinkhorn_knopp", 5, True, 4096)


def test_usage_errors_are_one_line_and_exit_2(capsys):
    for argv in (REQUIRED + ["--no_such_flag"], REQUIRED + ["--clip_mode", "sometimes"],
                 REQUIRED + ["--max_steps", "ten"]):
        with pytest.raises(SystemExit) as exit_info:
            parse_training_args(argv)
        assert exit_info.value.code == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "error:" in err


@pytest.mark.parametrize("config", CONFIGS, ids=[path.name for path in CONFIGS])
def test_shipped_recipes_parse(config):
    args = parse_training_args(["--config", str(config)])
    assert args.dataset_name and args.output_dir


def test_parser_lists_every_field():
    parser = build_argument_parser()
    destinations = {action.dest for action in parser._actions}
    assert {field.name for field in dataclasses.fields(DinoTrainingArguments)} <= destinations

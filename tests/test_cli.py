"""The commands (dino_hf.cli): one vocabulary with the old spellings as aliases, and every tool that takes a
backbone taking a run folder or a DinoForPreTraining folder too (teacher by default, --which student)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from types import ModuleType

import pytest
import torch
from PIL import Image
from tiny_models import tiny_args

from dino_hf.cli import attention, convert, embed, evaluate, push


@pytest.fixture(scope="module")
def finished_run(dataset, tiny_config_file, tmp_path_factory) -> Path:
    """A real 2-step run's --output_dir (backbone/, config.json, model.safetensors, training_args.json)."""
    from accelerate.state import AcceleratorState, GradientState

    from dino_hf.train.loop import train

    output_dir = tmp_path_factory.mktemp("finished") / "run"
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    try:
        train(tiny_args(dataset, output_dir, tiny_config_file, max_steps=2, logging_steps=1,
                        base_learning_rate=0.5, teacher_momentum=0.5))  # a student far from its teacher
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)
        GradientState._reset_state()
    return output_dir


def _evaluate(tmp_path: Path, model: Path, dataset: Path, *extra: str) -> dict:
    output = tmp_path / f"results-{len(list(tmp_path.iterdir()))}.json"
    status = evaluate.main(["--model_name_or_path", str(model), "--dataset_name", str(dataset), "--k", "1", "3",
                            "--output_file", str(output), "--per_device_eval_batch_size", "8", *extra])
    assert status == 0
    return json.loads(output.read_text())


def test_eval_on_a_run_folder_a_dino_folder_and_either_network(finished_run, labelled_parquet, tmp_path, capsys):
    from dino_hf.eval.loading import load_backbone
    from dino_hf.models.modeling_dino import DinoForPreTraining

    exported = _evaluate(tmp_path, finished_run / "backbone", labelled_parquet)
    teacher = _evaluate(tmp_path, finished_run, labelled_parquet)
    assert {key: teacher[key] for key in ("knn_top1_k1", "knn_top1_k3")} == {
        key: exported[key] for key in ("knn_top1_k1", "knn_top1_k3")}
    # a bare DinoForPreTraining folder (no backbone/): the teacher inside it, the same network
    dino_folder = tmp_path / "dino"
    DinoForPreTraining.from_pretrained(finished_run).save_pretrained(dino_folder)
    pixels = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        from_run = load_backbone(finished_run)(pixels).last_hidden_state[:, 0]
        from_dino = load_backbone(dino_folder)(pixels).last_hidden_state[:, 0]
        student = load_backbone(dino_folder, which="student")(pixels).last_hidden_state[:, 0]
    torch.testing.assert_close(from_run, from_dino)
    assert not torch.allclose(student, from_dino, atol=1e-3)  # --which student is another network
    assert _evaluate(tmp_path, finished_run, labelled_parquet, "--which", "student")["which"] == "student"
    capsys.readouterr()
    # the student of an exported backbone does not exist: one sentence, status 2
    assert evaluate.main(["--model_name_or_path", str(finished_run / "backbone"), "--dataset_name",
                          str(labelled_parquet), "--which", "student"]) == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert error.startswith("dino-hf-eval: error: ") and "--which student" in error


def test_attention_on_a_run_folder_for_both_networks(finished_run, tmp_path):
    image = tmp_path / "picture.png"
    Image.new("RGB", (40, 40), (200, 30, 90)).save(image)
    for which in ("teacher", "student"):
        output_dir = tmp_path / which
        assert attention.main(["--model_name_or_path", str(finished_run), "--image", str(image),
                               "--output_dir", str(output_dir), "--which", which]) == 0
        with Image.open(output_dir / "picture" / "grid.png") as grid:
            assert grid.width > grid.height > 0


def test_old_spellings_are_aliases_of_the_shared_vocabulary():
    pairs = [
        (evaluate.build_parser(), ["--model", "m", "--dataset_name", "d", "--test_split", "validation",
                                   "--num_workers", "3", "--max_test_samples", "5"],
         ["--model_name_or_path", "m", "--dataset_name", "d", "--eval_split", "validation",
          "--dataloader_num_workers", "3", "--max_eval_samples", "5"]),
        (push.build_parser(), ["--model_dir", "run", "--repo_id", "me/x", "--private"],
         ["--output_dir", "run", "--hub_model_id", "me/x", "--hub_private_repo"]),
        (attention.build_parser(), ["--model", "m", "--image", "a.png"],
         ["--model_name_or_path", "m", "--image", "a.png"]),
        (embed.build_parser(), ["--model", "m", "--dataset_name", "d", "--output_dir", "o", "--num_workers", "2",
                                "--split", "test", "--batch_size", "4", "--revision", "v1"],
         ["--model_name_or_path", "m", "--dataset_name", "d", "--output_dir", "o", "--dataloader_num_workers", "2",
          "--dataset_split", "test", "--per_device_eval_batch_size", "4", "--model_revision", "v1"]),
        (evaluate.build_parser(), ["--model", "m", "--dataset_name", "d", "--batch_size", "4", "--revision", "v1"],
         ["--model", "m", "--dataset_name", "d", "--per_device_eval_batch_size", "4", "--model_revision", "v1"]),
    ]
    for parser, old, new in pairs:
        assert parser.parse_args(old) == parser.parse_args(new), parser.prog


@pytest.mark.parametrize("command", [evaluate, embed, attention, push, convert])
def test_every_command_spells_booleans_and_old_flags_as_dino_hf_train_does(command):
    """--debug is a switch that also takes a value, as every dino-hf-train boolean; eval and embed stream with
    --streaming and stop with --no_streaming; an old spelling's --help says it is deprecated."""
    parser = command.build_parser()
    required = {evaluate: ["--model", "m", "--dataset_name", "d"], attention: ["--model", "m", "--image", "a.png"],
                embed: ["--model", "m", "--dataset_name", "d", "--output_dir", "o"],
                push: ["--output_dir", "run", "--hub_model_id", "me/x"],
                convert: ["--checkpoint", "c.pth", "--output_dir", "o"]}[command]
    assert parser.parse_args(required).debug is False
    assert parser.parse_args([*required, "--debug"]).debug is True
    assert parser.parse_args([*required, "--debug", "false"]).debug is False
    assert parser.parse_args([*required, "--debug", "true"]).debug is True
    help_text = " ".join(parser.format_help().split())
    if command in (evaluate, embed):
        assert parser.parse_args(required).streaming is False
        assert parser.parse_args([*required, "--streaming"]).streaming is True
        assert parser.parse_args([*required, "--streaming", "false"]).streaming is False
        assert "--per_device_eval_batch_size PER_DEVICE_EVAL_BATCH_SIZE, --batch_size" in help_text
        assert "(--batch_size: the old spelling, deprecated.)" in help_text
    if command in (evaluate, embed, attention):
        assert "(--revision: the old spelling, deprecated.)" in help_text
    if command is embed:
        assert "(--split: the old spelling, deprecated.)" in help_text


def _bad_inputs(tmp_path: Path) -> tuple[str, list[tuple[ModuleType, list[str]]]]:
    """A missing path, and every command given it."""
    missing = str(tmp_path / "missing")
    return missing, [
        (evaluate, ["--model_name_or_path", missing, "--dataset_name", missing]),
        (attention, ["--model_name_or_path", missing, "--image", missing]),
        (embed, ["--model_name_or_path", missing, "--dataset_name", missing, "--output_dir", str(tmp_path / "o")]),
        (push, ["--output_dir", missing, "--hub_model_id", "me/x", "--dry_run"]),
        (convert, ["--checkpoint", missing, "--output_dir", str(tmp_path / "o")]),
    ]


def test_every_command_says_bad_input_in_one_sentence_with_status_2(tmp_path, capsys):
    missing, commands = _bad_inputs(tmp_path)
    for command, argv in commands:
        assert command.main(argv) == 2, command.PROG
        lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
        assert lines[-1].startswith(f"{command.PROG}: error: ") and "Traceback" not in "\n".join(lines), lines
        assert missing in lines[-1] or "--" in lines[-1], lines


def test_every_command_shows_the_traceback_with_debug(tmp_path):
    _, commands = _bad_inputs(tmp_path)
    for command, argv in commands:
        with pytest.raises((ValueError, FileNotFoundError, NotADirectoryError)):
            command.main([*argv, "--debug"])


@pytest.mark.parametrize("prefix", [True, False])
def test_a_refused_push_is_one_sentence_without_the_token_and_debug_raises(prefix, capsys):
    from dino_hf.cli.console import CommandParser, run_main
    from dino_hf.hub.push import MissingTokenError

    def build_parser(prog: str) -> CommandParser:
        parser = CommandParser(prog=prog)
        parser.add_argument("--token", default=None)
        return parser

    def refuse(args: argparse.Namespace) -> int:
        raise MissingTokenError(f"the Hub refused {args.token}", repo_id="me/x")

    token = "hf_NotARealToken0123456789abcdef"
    assert run_main("prog", ["--token", token], build_parser, refuse, prefix_hub_errors=prefix) == 2
    error = capsys.readouterr().err
    assert error == ("prog: error: " if prefix else "") + "the Hub refused ***\n"
    with pytest.raises(MissingTokenError):
        run_main("prog", ["--token", token, "--debug"], build_parser, refuse, prefix_hub_errors=prefix)


def test_push_exports_the_chosen_network_of_a_dino_folder(finished_run, tmp_path, capsys):
    from dino_hf.models.modeling_dino import DinoForPreTraining

    dino_folder = tmp_path / "dino"
    DinoForPreTraining.from_pretrained(finished_run).save_pretrained(dino_folder)  # no backbone/ inside
    for folder, which in ((dino_folder, "teacher"), (finished_run, "student")):
        assert push.main(["--output_dir", str(folder), "--hub_model_id", "me/x", "--which", which, "--dry_run"]) == 0
        listing = capsys.readouterr().out
        weights = next(line for line in listing.splitlines() if line.startswith("model.safetensors  <-  "))
        assert "dino_hf_push_" in weights  # exported on the fly into a temporary folder
        assert "ViT, width 32" in listing
    assert push.main(["--output_dir", str(finished_run), "--hub_model_id", "me/x", "--dry_run"]) == 0
    assert f"model.safetensors  <-  {finished_run / 'backbone' / 'model.safetensors'}" in capsys.readouterr().out

"""The model card (dino_hf.hub.model_card) of a training output: only recorded numbers, metadata the Hub reads."""

from __future__ import annotations

import json

from huggingface_hub import ModelCard, metadata_load
from tiny_models import KNN_ACCURACY, RAW_PIXELS_ACCURACY, TOKEN, write_training_output

from dino_hf.base.run_folder import TRAINING_MODEL_SUBFOLDER
from dino_hf.hub.model_card import render_model_card


def test_card_states_only_recorded_numbers(training_output, tmp_path):
    card = render_model_card(training_output, "tester/tiny-dino")
    text = str(card)
    data = ModelCard(text).data.to_dict()
    readme = tmp_path / "README.md"
    readme.write_text(text)
    assert metadata_load(readme) == data
    assert f"{KNN_ACCURACY:.4f}" in text and f"{RAW_PIXELS_ACCURACY:.4f}" in text
    assert "0.04 -> 0.07 (linear over 30 steps)" in text
    assert "Prototypes (K) | 128" in text
    assert "128 images per step (64 per device x 2 processes)" in text
    assert "peak 0.00025 for the global batch" in text
    assert "| Hardware | 2 x CPU |" in text and "10 min 11 s" in text
    assert "Optimiser steps | 100 (of 100 planned)" in text
    assert "add_pooling_layer=False" in text and 'attn_implementation="eager"' in text
    assert "Caron" in text and "Emerging Properties in Self-Supervised Vision Transformers" in text
    assert TOKEN not in text
    assert TRAINING_MODEL_SUBFOLDER not in text  # not pushed unless asked
    # Only the model's own accuracy goes into model-index; the baseline stays in the body.
    values = [m["value"] for r in data["model-index"][0]["results"] for m in r["metrics"]]
    assert values == [KNN_ACCURACY]


def test_card_without_evaluation_from_a_hub_checkpoint_and_local_data(tmp_path):
    run = write_training_output(
        tmp_path / "run",
        eval_results=False,
        model_name_or_path="facebook/dino-vits16",
        dataset_name=str(tmp_path / "images"),
    )
    card = render_model_card(run, "tester/continued")
    data = card.data.to_dict()
    assert data["base_model"] == "facebook/dino-vits16"
    assert "model-index" not in data and "datasets" not in data  # no results, local data is no Hub id
    assert "No evaluation results were recorded" in card.text
    assert "local image set" in card.text
    # Without eval_results.json, the in-training k-NN rows of metrics.jsonl are used and labelled.
    with (run / "metrics.jsonl").open("a") as handle:
        handle.write(json.dumps({"step": 100, "knn_top1_k20": 0.61}) + "\n")
    card = render_model_card(run, "tester/continued")
    assert "0.6100" in card.text and "in-training k-NN monitor at step 100" in card.text
    assert "model-index" not in card.data.to_dict()  # no eval dataset recorded: body only


def test_architecture_row_follows_the_actual_config_and_local_sets_stay_out_of_the_metadata(tmp_path):
    # the fake run's backbone is 32 wide, 2 layers: not the vit_tiny_patch16 its arguments name
    run = write_training_output(tmp_path / "run")
    text = render_model_card(run, "tester/x").content
    assert "| Preset |" not in text
    assert "custom: `vit_tiny_patch16` with hidden_size, num_hidden_layers, num_attention_heads" in text
    preset = write_training_output(tmp_path / "preset", model_config=str(tmp_path / "config_folder"))
    assert "Preset" not in render_model_card(preset, "tester/x").content  # a config folder: the rows describe it
    # evaluation on a local folder: named in the body by its folder name only, no model-index entry
    local = write_training_output(tmp_path / "local", dataset_name=str(tmp_path / "secret_place" / "images"))
    results = json.loads((local / "eval_results.json").read_text())
    results["eval_dataset_name"] = str(tmp_path / "secret_place" / "fashion")
    (local / "eval_results.json").write_text(json.dumps(results))
    card = render_model_card(local, "tester/x")
    assert "model-index" not in card.data.to_dict() and "datasets" not in card.data.to_dict()
    assert "`fashion`" in card.text and "`images`" in card.text and "secret_place" not in card.text
    assert 'model_kwargs={"add_pooling_layer": False}' in card.text


def test_card_names_dinov2s_terms_when_the_run_used_them(tmp_path):
    run = write_training_output(tmp_path / "run")
    config = json.loads((run / "config.json").read_text())
    assert "Objective |" not in str(render_model_card(run, "tester/tiny-dino"))  # DINO alone: as before
    config.update(ibot_loss_weight=1.0, ibot_separate_head=True, ibot_num_prototypes=256, koleo_loss_weight=0.1,
                  teacher_centering="sinkhorn_knopp")
    (run / "config.json").write_text(json.dumps(config))
    text = str(render_model_card(run, "tester/tiny-dinov2"))
    assert ("| Objective | DINO + iBOT masked patches (weight 1, own head, K 256) + KoLeo (weight 0.1), teachers: "
            "sinkhorn-knopp |") in text


def test_card_records_the_precision_that_ran_not_auto(tmp_path):
    auto = write_training_output(tmp_path / "auto", mixed_precision="auto", resolved_mixed_precision="bf16")
    text = render_model_card(auto, "tester/x").text
    assert "| Mixed precision | bf16 autocast, chosen for the machine by `--mixed_precision auto` |" in text
    asked = write_training_output(tmp_path / "asked", mixed_precision="no")
    assert "| Mixed precision | fp32 (no autocast) |" in render_model_card(asked, "tester/x").text
    unknown = write_training_output(tmp_path / "unknown", mixed_precision="auto")  # a run that did not record it
    assert "Mixed precision" not in render_model_card(unknown, "tester/x").text


def test_a_local_start_names_the_hub_model_it_came_from(tmp_path):
    # a folder of the Hub cache (what from_pretrained downloads into): its repository is in the path
    snapshot = tmp_path / "hub" / "models--facebook--dinov2-small" / "snapshots" / "0123abcd"
    snapshot.mkdir(parents=True)
    run = write_training_output(tmp_path / "cached", model_name_or_path=str(snapshot))
    card = render_model_card(run, "tester/x")
    assert card.data.to_dict()["base_model"] == "facebook/dinov2-small"
    assert "Pre-training started from `facebook/dinov2-small`" in card.text and "0123abcd" not in card.text
    # the backbone of an earlier dino_hf run: that run's own start, or its Hub repository when it pushed
    earlier = write_training_output(tmp_path / "earlier", model_name_or_path="facebook/dino-vits16")
    continued = write_training_output(tmp_path / "continued", model_name_or_path=str(earlier / "backbone"))
    assert render_model_card(continued, "tester/x").data.to_dict()["base_model"] == "facebook/dino-vits16"
    pushed = write_training_output(tmp_path / "pushed", push_to_hub=True, hub_model_id="tester/first")
    again = write_training_output(tmp_path / "again", model_name_or_path=str(pushed))
    assert render_model_card(again, "tester/x").data.to_dict()["base_model"] == "tester/first"
    # a local folder that records nothing: no relation, rather than a wrong one
    plain = tmp_path / "plain"
    plain.mkdir()
    nothing = write_training_output(tmp_path / "nothing", model_name_or_path=str(plain))
    assert "base_model" not in render_model_card(nothing, "tester/x").data.to_dict()


def test_a_continued_run_has_no_preset_row(tmp_path):
    run = write_training_output(tmp_path / "run", model_name_or_path="facebook/dino-vits16")
    text = render_model_card(run, "tester/x").text
    assert "vit_tiny_patch16" not in text and "| Backbone | ViT, width 32, 2 layers" in text

"""Experiment trackers (dino_hf.train.trackers): --report_to names and ``all``, and a real TensorBoard run whose
event file is read back with TensorBoard's own reader (scalars and the attention images)."""

from __future__ import annotations

import importlib.util
import io

import numpy as np
import pytest
from PIL import Image
from tiny_models import tiny_args

from dino_hf.train.trackers import known_tracker_names, log_images, parse_report_to, resolve_report_to

pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")


def test_every_accelerate_tracker_name_passes_and_unknown_ones_are_one_sentence():
    assert set(known_tracker_names()) == {"aim", "tensorboard", "wandb", "trackio", "comet_ml", "mlflow", "clearml",
                                          "dvclive", "swanlab"}
    assert parse_report_to(["none"]) == [] and parse_report_to("") == [] and parse_report_to(None) == []
    assert parse_report_to(["tensorboard,wandb", "mlflow"]) == ["tensorboard", "wandb", "mlflow"]
    with pytest.raises(ValueError, match="--report_to tensorbored is not a tracker accelerate knows"):
        parse_report_to(["tensorbored"])
    with pytest.raises(ValueError, match="pass it alone"):
        parse_report_to(["all", "wandb"])


def test_all_means_every_installed_tracker_and_a_missing_one_says_what_to_install():
    from accelerate.tracking import get_available_trackers

    installed = [str(tracker) for tracker in get_available_trackers()]
    assert resolve_report_to(["all"]) == installed
    assert "tensorboard" in installed  # the dev extra installs it
    missing = [name for name in ("wandb", "trackio", "mlflow") if importlib.util.find_spec(name) is None]
    if not missing:
        pytest.skip("every tracker with an extra is installed here")
    assert all(name not in installed for name in missing)
    with pytest.raises(ValueError, match=rf"needs the {missing[0]} package \(pip install 'dino_hf\[{missing[0]}\]'\)"):
        resolve_report_to([missing[0]])


def test_a_failing_tracker_is_logged_and_skipped(caplog):
    class Broken:
        name = "tensorboard"

        def log_images(self, *args, **kwargs):
            raise RuntimeError("disk full")

    log_images([Broken()], "attention", [Image.new("RGB", (4, 4))], step=1)
    assert "Could not send attention images to tensorboard: disk full" in caplog.text


def test_a_tensorboard_run_is_read_back_scalars_and_attention_images(dataset, tiny_config_file, tmp_path):
    """``--report_to all`` with TensorBoard the only installed tracker with a package here (or one of
    several): the event file holds the metrics rows' scalars and the attention grids as images."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from dino_hf.train.loop import train

    output_dir = tmp_path / "run"
    train(tiny_args(dataset, output_dir, tiny_config_file, report_to=["all"], eval_dataset_name=str(dataset),
                    eval_split="train", eval_steps=2, eval_max_samples=8, tracker_project_name="tb_test"))
    # the run's writer (accelerate's hparams writer keeps its own file in a sub-folder)
    [event_file] = (output_dir / "tb_test").glob("events.out.tfevents.*")
    events = EventAccumulator(str(event_file), size_guidance={"images": 0, "scalars": 0})
    events.Reload()
    tags = events.Tags()
    for tag in ("loss", "grad_norm", "grad_norm_max", "teacher_entropy", "student_entropy", "teacher_student_kl",
                "learning_rate", "knn_top1_k20"):
        assert tag in tags["scalars"], (tag, tags["scalars"])
    assert [event.step for event in events.Scalars("loss")] == [2, 4]
    assert "attention" in tags["images"], tags["images"]
    images = events.Images("attention")
    assert [image.step for image in images] == [2, 4]  # one grid picture per evaluation
    picture = Image.open(io.BytesIO(images[0].encoded_image_string))
    assert picture.width > picture.height > 0 and np.asarray(picture).std() > 0  # a real picture, not blank

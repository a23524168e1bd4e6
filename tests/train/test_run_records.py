"""What a run says about itself: the learning rate both ways, and a resumed run whose peak changed."""

from __future__ import annotations

from dino_hf.train.run_records import learning_rate_line, resumed_learning_rate_warning


def test_the_learning_rate_is_logged_per_256_images_and_absolute():
    assert learning_rate_line(2e-3, None, 5e-4, 1024) == (
        "learning rate 0.002 (--base_learning_rate 0.0005 x global batch 1024 / 256)")
    line = learning_rate_line(1e-3, 1e-3, 5e-4, 128)
    assert "--learning_rate, absolute; 0.002 per 256 images at global batch 128" in line
    assert "--base_learning_rate is ignored" in line


def test_a_resumed_run_whose_peak_learning_rate_changed_says_so():
    recorded = {"base_learning_rate": 5e-4, "learning_rate": None, "scaled_learning_rate": 2.5e-4}
    assert resumed_learning_rate_warning(recorded, 2.5e-4) is None
    assert resumed_learning_rate_warning({}, 2.5e-4) is None  # nothing recorded: nothing to compare
    changed = resumed_learning_rate_warning(recorded, 5e-4)
    assert "is 0.0005, not the 0.00025 it started with" in changed and "Before dino_hf 0.2" not in changed
    # a run started before 0.2 (learning_rate per 256 images), resumed with a recipe still saying learning_rate
    legacy = resumed_learning_rate_warning({"learning_rate": 2e-3, "scaled_learning_rate": 5e-4}, 2e-3)
    assert "pass that value as --base_learning_rate" in legacy

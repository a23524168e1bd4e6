"""The shared checks (dino_hf/losses/validation.py): DinoLoss and IBOTPatchLoss refuse the same bad
settings with the same one-sentence message, and check the teacher temperature alike."""

from __future__ import annotations

import pytest
import torch

from dino_hf.losses.dino import DinoLoss
from dino_hf.losses.ibot import IBOTPatchLoss
from dino_hf.losses.validation import CENTERING_METHODS, check_loss_settings

SETTINGS = {
    "num_prototypes": 8,
    "student_temperature": 0.1,
    "center_momentum": 0.9,
    "centering": "centering",
    "sinkhorn_iterations": 3,
}

BAD_SETTINGS = [
    ("num_prototypes", {"num_prototypes": 0}),
    ("num_prototypes", {"num_prototypes": True}),
    ("student_temperature", {"student_temperature": 0}),
    ("student_temperature", {"student_temperature": float("inf")}),
    ("center_momentum", {"center_momentum": 1.5}),
    ("centering", {"centering": "sinkhorn"}),
    ("sinkhorn_iterations", {"sinkhorn_iterations": 0}),
]


def _assert_one_sentence(message: str) -> None:
    assert "\n" not in message and message.endswith(".")


@pytest.mark.parametrize("loss_class", [DinoLoss, IBOTPatchLoss])
@pytest.mark.parametrize(("expected_text", "changes"), BAD_SETTINGS, ids=[str(c) for _, c in BAD_SETTINGS])
def test_bad_setting_raises_one_sentence_value_error(loss_class, expected_text, changes):
    with pytest.raises(ValueError, match=expected_text) as error:
        loss_class(**{**SETTINGS, **changes})
    message = str(error.value)
    _assert_one_sentence(message)
    # one rule for both heads: the loss raises exactly what the shared check raises
    with pytest.raises(ValueError) as direct:
        check_loss_settings(**{**SETTINGS, **changes})
    assert str(direct.value) == message


@pytest.mark.parametrize("centering", CENTERING_METHODS)
def test_both_losses_keep_the_checked_settings(centering):
    settings = {**SETTINGS, "student_temperature": 1, "center_momentum": 0, "centering": centering,
                "sinkhorn_iterations": 5}
    dino, ibot = DinoLoss(**settings), IBOTPatchLoss(**settings)
    for loss_fn in (dino, ibot):
        assert (loss_fn.num_prototypes, loss_fn.student_temperature, loss_fn.center_momentum,
                loss_fn.centering, loss_fn.sinkhorn_iterations) == (8, 1.0, 0.0, centering, 5)
        assert isinstance(loss_fn.student_temperature, float) and isinstance(loss_fn.center_momentum, float)
        assert loss_fn.center.shape == (1, 8) and loss_fn.center.dtype == torch.float32
    assert CENTERING_METHODS == ("centering", "sinkhorn_knopp")


@pytest.mark.parametrize(
    "teacher_temperature", [0.0, -0.04, float("nan"), torch.tensor(0.0), torch.ones(1), torch.tensor(1)],
    ids=["zero", "negative", "nan", "zero_tensor", "1d_tensor", "integer_tensor"],
)
def test_both_losses_check_the_teacher_temperature(teacher_temperature):
    dino_logits = torch.zeros(2, 3, 8)
    with pytest.raises(ValueError, match="teacher_temperature") as dino_error:
        DinoLoss(8).teacher_probabilities(dino_logits, teacher_temperature)
    with pytest.raises(ValueError, match="teacher_temperature") as ibot_error:
        IBOTPatchLoss(8).teacher_probabilities(torch.zeros(3, 8), teacher_temperature)
    _assert_one_sentence(str(dino_error.value))
    assert str(ibot_error.value) == str(dino_error.value)

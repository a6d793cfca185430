"""Hyperparameters: defaults, "auto", and refusals that name the field and its range."""

import pytest

from loraplex.errors import InvalidInput
from loraplex.training.hyperparameters import DEFAULTS, check_hyperparameters


def test_defaults_and_auto():
    assert check_hyperparameters(None, 32) == DEFAULTS
    got = check_hyperparameters({"n_epochs": "auto", "rank": 16, "learning_rate_multiplier": 2.5}, 32)
    assert got == DEFAULTS | {"rank": 16, "learning_rate_multiplier": 2.5}


@pytest.mark.parametrize("raw, needle", [
    ({"n_epochs": 0}, "n_epochs must be an integer in [1, 50]"),
    ({"batch_size": 2.5}, "batch_size must be an integer"),
    ({"rank": 64}, "rank must be an integer in [1, 32]"),
    ({"learning_rate_multiplier": -1}, "learning_rate_multiplier must be a number"),
    ({"n_epochs": True}, "n_epochs"),
    ({"target_modules": []}, "target_modules"),
    ({"warmup": 3}, "unknown hyperparameters: warmup"),
])
def test_out_of_range_is_named(raw, needle):
    with pytest.raises(InvalidInput, match=needle.replace("[", r"\[").replace("]", r"\]")):
        check_hyperparameters(raw, 32)

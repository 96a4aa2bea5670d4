import pytest

from trainables.config import DEFAULTS, resolve_config
from trainables.errors import UserError


def test_defaults_resolve_unchanged():
    assert resolve_config({}) == DEFAULTS


def test_unknown_key_is_named():
    with pytest.raises(UserError, match="Unknown config key 'learning_rate'"):
        resolve_config({"learning_rate": 0.1})


@pytest.mark.parametrize("key, value", [("optimizer", "adamax"), ("split_ratio", 1.5), ("warmup_frac", 1.0),
                                        ("epochs", 0), ("lr", -1), ("loss_weighting", "focal")])
def test_invalid_values_are_refused(key, value):
    with pytest.raises(UserError, match=key):
        resolve_config({key: value})

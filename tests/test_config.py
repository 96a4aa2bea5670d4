import pytest

from trainables.config import DEFAULTS, resolve_config
from trainables.errors import UserError


def test_the_defaults_a_space_checks_are_the_ones_a_trial_runs():
    """DEFAULTS is built without validation (no registry imports); search spaces check a key they do not set at
    DEFAULTS' value, so a validator that changed a default would have them check another value than trials use."""
    assert resolve_config({}) == DEFAULTS


def test_unknown_key_is_named():
    with pytest.raises(UserError, match="Unknown config key 'learning_rate'"):
        resolve_config({"learning_rate": 0.1})


@pytest.mark.parametrize("key, value", [("optimizer", "adamax"), ("split_ratio", 1.5), ("warmup_frac", 1.0),
                                        ("epochs", 0), ("lr", -1), ("loss_weighting", "focal")])
def test_invalid_values_are_refused(key, value):
    with pytest.raises(UserError, match=key):
        resolve_config({key: value})


@pytest.mark.parametrize("key, value, expected", [
    ("normalize", "zscore", "Invalid normalize 'zscore': input should be 'auto', 'half', 'dataset', 'imagenet' or 'mean_image'"),
    ("sampling", "smote", "Invalid sampling 'smote': input should be 'none', 'oversample' or 'undersample'"),
    ("jitter_hue", 0.6, "Invalid jitter_hue 0.6: input should be less than or equal to 0.5"),
    ("jitter_saturation", -0.1, "Invalid jitter_saturation -0.1"),
    ("shift_frac", 0.6, "Invalid shift_frac 0.6"),
    ("crop_scale", 0.0, "Invalid crop_scale 0.0: input should be greater than 0"),
    ("rotation_crop", 1.5, "Invalid rotation_crop 1.5"),
    ("blur_kernel", 4, "blur_kernel 4 must be odd"),
    ("blur_sigma_min", 2.0, "blur_sigma_min 2.0 is above blur_sigma 1.0"),
    ("drop_path_rate", 1.0, "Invalid drop_path_rate 1.0: input should be less than 1"),
    ("attn_drop_rate", 0.3, "Model resnet18 has no attn_drop_rate"),
])
def test_the_study_keys_are_checked(key, value, expected):
    with pytest.raises(UserError) as error:
        resolve_config({key: value})
    assert expected in str(error.value)


def test_the_study_protocols_resolve():
    """The five studies' own settings are expressible as trial keys."""
    resnetd = resolve_config({"model": "resnet50d", "schedule": "constant", "warmup_frac": 0.1, "minority_aug_pct": 20,
                              "rotation_degrees": 6, "rotation_crop": 210 / 224, "blur_sigma_min": 6, "blur_sigma": 8})
    kermany = resolve_config({"augment": "rotation+jitter+hflip", "rotation_degrees": 25, "jitter_saturation": 0.2,
                              "jitter_hue": 0.1, "normalize": "dataset", "schedule": "constant"})
    medmnist = resolve_config({"augment": "hflip+shift+rotation+crop+jitter+noise", "shift_frac": 0.1, "crop_scale": 0.8})
    chestxray8 = resolve_config({"model": "vgg_like", "drop_rate": 0.0, "normalize": "mean_image", "loss_weighting": "wcel",
                                 "sampling": "oversample"})
    zoo = [resolve_config({"model": "efficientnet_b0", "drop_path_rate": 0.06}),
           resolve_config({"model": "vit_small_patch8", "drop_rate": 0.3, "attn_drop_rate": 0.3, "image_size": 32})]
    assert resnetd["blur_sigma_min"] == 6 and kermany["jitter_hue"] == 0.1 and medmnist["crop_scale"] == 0.8
    assert chestxray8["loss_weighting"] == "wcel" and zoo[1]["attn_drop_rate"] == 0.3


def test_new_keys_default_to_the_old_behaviour():
    defaults = resolve_config({})
    assert (defaults["normalize"], defaults["sampling"]) == ("auto", "none")
    assert (defaults["blur_sigma_min"], defaults["blur_kernel"]) == (0.1, 3)
    assert defaults["drop_path_rate"] is None and defaults["attn_drop_rate"] is None and defaults["rotation_crop"] is None

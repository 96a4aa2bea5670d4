"""Every key a trial understands, with its default. Unknown keys are an error, never ignored."""

from __future__ import annotations

from .errors import UserError

DEFAULTS: dict = {
    # --- data ---
    "dataset": "pneumoniamnist",  # registered name (trainables.datasets) or kind:PATH
    "image_size": 28,  # MedMNIST size 28/64/128/224; folder datasets are resized to it
    "split_ratio": None,  # train share of the development pool; None keeps the official train/val split
    "seed": 0,  # seeds the split, the initialisation, the augmentation and the loader order
    # --- model ---
    "model": "resnet18",  # registered name (trainables.models)
    "pretrained": False,  # start from ImageNet weights (needs `pretrained_path` offline)
    "pretrained_path": None,  # local weights file (.pth / .safetensors) for `pretrained`
    "freeze_backbone": False,  # train the classifier head only
    "drop_rate": None,  # classifier dropout; None keeps the model's default
    # --- augmentation (training split only) ---
    "augment": "none",  # "+"-joined names, e.g. "hflip+rotation+jitter", or "autoaugment_imagenet"
    "rotation_degrees": 15.0,  # for "rotation"
    "jitter": 0.2,  # brightness/contrast strength for "jitter"
    "blur_sigma": 1.0,  # upper sigma for "blur"
    "noise_std": 0.05,  # std (on the 0-1 scale) for "noise"
    "minority_aug_pct": 0.0,  # each minority class gets this % extra augmented copies of its own samples
    # --- loss ---
    "loss_weighting": "none",  # none | inverse | effective (multi-label: positive weights per label)
    "effective_beta": 0.999,  # beta of the effective-number weighting
    # --- optimisation ---
    "optimizer": "adam",  # adam | adamw | sgd
    "lr": 1e-3,  # peak learning rate
    "weight_decay": 0.0,
    "momentum": 0.9,  # sgd only
    "batch_size": 128,
    "epochs": 3,
    "schedule": "cosine",  # cosine (linear warm-up then cosine) | step (MultiStepLR) | constant
    "warmup_frac": 0.0,  # fraction of all steps spent in linear warm-up (cosine schedule)
    "step_milestones": [0.5, 0.75],  # step schedule: fractions of the epochs where lr *= step_gamma
    "step_gamma": 0.1,
    # --- selection (validation only; the test split never chooses anything) ---
    "metric": "val_auc",  # picks the best epoch of a trial (and, in tune.py, the best trial)
    "mode": "max",  # max | min
    # --- runtime ---
    "device": "auto",  # auto | cpu | cuda
    "num_workers": 0,  # DataLoader workers for per-sample augmentation
    "data_root": None,  # where datasets live; None: $MEDTUNE_DATA_ROOT or ~/.medmnist
}

CHOICES = {
    "optimizer": ("adam", "adamw", "sgd"),
    "schedule": ("cosine", "step", "constant"),
    "loss_weighting": ("none", "inverse", "effective"),
    "device": ("auto", "cpu", "cuda"),
    "mode": ("max", "min"),
}


def resolve_config(overrides: dict) -> dict:
    """DEFAULTS updated by `overrides`; raises UserError on an unknown key or an invalid value."""
    unknown = sorted(set(overrides) - set(DEFAULTS))
    if unknown:
        raise UserError(f"Unknown config key {unknown[0]!r}; valid keys: {', '.join(DEFAULTS)}")
    config = {**DEFAULTS, **overrides}
    for key, valid in CHOICES.items():
        if config[key] not in valid:
            raise UserError(f"Invalid {key} {config[key]!r}; choose one of: {', '.join(valid)}")
    ratio = config["split_ratio"]
    if ratio is not None and not 0.0 < float(ratio) < 1.0:
        raise UserError(f"Invalid split_ratio {ratio}; use a train share between 0 and 1, e.g. 0.8")
    if not 0.0 <= float(config["warmup_frac"]) < 1.0:
        raise UserError(f"Invalid warmup_frac {config['warmup_frac']}; use a fraction in [0, 1)")
    if float(config["minority_aug_pct"]) < 0:
        raise UserError(f"Invalid minority_aug_pct {config['minority_aug_pct']}; use a percentage >= 0")
    for key in ("epochs", "batch_size"):
        if int(config[key]) < 1:
            raise UserError(f"Invalid {key} {config[key]}; use a positive integer")
    if float(config["lr"]) <= 0:
        raise UserError(f"Invalid lr {config['lr']}; use a positive learning rate")
    return config

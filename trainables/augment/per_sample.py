"""Training-split augmentation from config, with torchvision v2, applied per sample (the batched path on the
trial's device, with the same names and ranges, is trainables/augment/batched.py; `augment_device` picks).

Names (joined with "+"): hflip, rotation, jitter, blur, noise, invert, shift, crop, autoaugment_imagenet,
autoaugment_cifar10, autoaugment_svhn; "none" for no augmentation. Their keys (trainables/config.py):
- rotation: +-rotation_degrees, then a centre crop (rotation_crop of the side, or automatic) resized back
- jitter: brightness/contrast +-jitter; on RGB images also jitter_saturation and jitter_hue (grey images have
  neither: a one-line warning says so)
- blur: kernel blur_kernel x blur_kernel, sigma drawn in [blur_sigma_min, blur_sigma]
- shift: translation up to shift_frac of the side; crop: random resized crop of crop_scale..1 of the area
Minority-class augmentation (the ResNet-D study) adds X % extra copies of each minority class,
each copy transformed by one of: rotation with centre crop, inversion, Gaussian blur, Gaussian noise.
"""

from __future__ import annotations

import warnings

import numpy as np
import torch
from torchvision.transforms import v2

from trainables.data.sampling import balance_groups
from trainables.errors import UserError

AUGMENTATIONS = ("hflip", "rotation", "jitter", "blur", "noise", "invert", "shift", "crop",
                 "autoaugment_imagenet", "autoaugment_cifar10", "autoaugment_svhn")
_POLICIES = {"imagenet": v2.AutoAugmentPolicy.IMAGENET, "cifar10": v2.AutoAugmentPolicy.CIFAR10,
             "svhn": v2.AutoAugmentPolicy.SVHN}


def parse_augment(spec: str) -> list[str]:
    names = [] if spec in ("", "none", None) else spec.split("+")
    for name in names:
        if name not in AUGMENTATIONS:
            raise UserError(f"Unknown augmentation {name!r} in {spec!r}; valid names: none, {', '.join(AUGMENTATIONS)}")
    return names


def centre_crop_side(degrees: float, size: int, crop_frac: float | None = None) -> int:
    """The side kept after rotating: `crop_frac` of it (e.g. 210/224), or None: enough that no black corners
    reach the model. Shared with the batched path (trainables/augment/batched.py) so both crop alike."""
    if crop_frac is None:
        return max(1, int(round(size / (1 + np.sin(np.radians(min(degrees, 45))) * 0.75))))
    return max(1, int(round(size * crop_frac)))


def _rotate_and_centre_crop(degrees: float, size: int, crop_frac: float | None = None) -> v2.Transform:
    """Rotate, then crop the centre (see `centre_crop_side`), then restore the size."""
    crop = centre_crop_side(degrees, size, crop_frac)
    return v2.Compose([v2.RandomRotation(degrees), v2.CenterCrop(crop), v2.Resize(size, antialias=True)])


def _blur(config: dict) -> v2.Transform:
    return v2.GaussianBlur(kernel_size=int(config["blur_kernel"]),
                           sigma=(float(config["blur_sigma_min"]), float(config["blur_sigma"])))


def jitter_strengths(config: dict, channels: int) -> dict:
    """ColorJitter's keyword arguments for `channels` (both paths): saturation and hue only on RGB."""
    colour = {"saturation": config["jitter_saturation"], "hue": config["jitter_hue"]}
    if channels != 3 and any(colour.values()):
        warnings.warn(f"jitter on {channels}-channel images: only brightness and contrast apply "
                      "(jitter_saturation and jitter_hue need RGB)", UserWarning, stacklevel=4)
    return {"brightness": config["jitter"], "contrast": config["jitter"], **(colour if channels == 3 else {})}


def _jitter(config: dict, channels: int) -> v2.Transform:
    return v2.ColorJitter(**jitter_strengths(config, channels))


def _op(name: str, config: dict, size: int, channels: int) -> v2.Transform:
    if name == "hflip":
        return v2.RandomHorizontalFlip()
    if name == "rotation":
        return _rotate_and_centre_crop(float(config["rotation_degrees"]), size, config["rotation_crop"])
    if name == "jitter":
        return _jitter(config, channels)
    if name == "blur":
        return _blur(config)
    if name == "shift":
        return v2.RandomAffine(degrees=0.0, translate=(config["shift_frac"], config["shift_frac"]))
    if name == "crop":
        return v2.RandomResizedCrop(size, scale=(config["crop_scale"], 1.0), antialias=True)
    if name == "noise":
        return v2.Compose([v2.ToDtype(torch.float32, scale=True), v2.GaussianNoise(sigma=float(config["noise_std"])),
                           v2.ToDtype(torch.uint8, scale=True)])
    if name == "invert":
        return v2.RandomInvert(p=0.5)
    return v2.AutoAugment(_POLICIES[name.removeprefix("autoaugment_")])


def build_train_transform(config: dict, size: int, channels: int, names: list[str] | None = None) -> v2.Transform | None:
    """The per-sample uint8 CHW -> uint8 CHW transform for every training image, or None.
    `names`: only these augmentations (the batched path keeps AutoAugment here); default: all of `augment`."""
    names = parse_augment(config["augment"]) if names is None else names
    return v2.Compose([_op(name, config, size, channels) for name in names]) if names else None


def minority_degrees(config: dict) -> float:
    """The copies' rotation range: `rotation_degrees`, or 15 when that is 0 (a copy must differ)."""
    return float(config["rotation_degrees"]) or 15.0


def build_minority_transform(config: dict, size: int, channels: int) -> v2.Transform:
    """One of the study's four transforms, drawn per copy."""
    return v2.RandomChoice([
        _rotate_and_centre_crop(minority_degrees(config), size, config["rotation_crop"]),
        v2.RandomInvert(p=1.0),
        _blur(config),
        _op("noise", config, size, channels),
    ])


def minority_copies(labels: np.ndarray, pct: float, seed: int) -> np.ndarray:
    """Indices to copy: each class smaller than the largest gets round(pct % of its size) extra samples.

    Multi-label samples count toward their rarest positive label (or "no label").
    """
    if pct <= 0:
        return np.empty(0, dtype=np.int64)
    classes = balance_groups(labels)
    rng = np.random.default_rng(seed)
    extra = [rng.choice(np.flatnonzero(classes == value), size=count, replace=True)
             for value, count in minority_counts(classes, pct).items()]
    return np.concatenate(extra).astype(np.int64) if extra else np.empty(0, dtype=np.int64)


def minority_counts(classes: np.ndarray, pct: float) -> dict[int, int]:
    """{class: extra samples}: each class smaller than the largest gets round(pct % of its size); the one rule of
    `minority_aug_pct` (copies) and `synthetic_pct` (generated images)."""
    if pct <= 0:
        return {}
    values, counts = np.unique(classes, return_counts=True)
    return {int(v): int(round(c * pct / 100)) for v, c in zip(values, counts) if c < counts.max()}

"""Training-split augmentation applied to whole batches on the trial's device (CUDA or CPU), with Kornia.

Why: torchvision v2 draws ONE set of parameters per call, so per-image randomness needs one call per image in
the DataLoader (~1.4-1.9k images/s per CPU core at 28 px), which starves a GPU. Kornia's augmentation module
draws independently per image on a whole batch, on the batch's device.

Same names, ranges and order as trainables/augment/per_sample.py (`augment_device: cpu`), so both paths train on the same
distributions. Differences: images stay float in [0, 1] between ops (the per-sample path rounds to uint8 after
each); rotation, centre crop and resize are one bilinear warp (a zoom by side/crop about the centre).
Seeding: Kornia draws from torch's global RNG on the batch's device; the train loop reseeds it every epoch.
AutoAugment has no Kornia equivalent with torchvision's policies: it stays per-sample in the DataLoader (before
the batched ops).
"""

from __future__ import annotations

import kornia.augmentation as K
import torch
from torch import nn

from trainables.augment.per_sample import centre_crop_side, jitter_strengths, minority_degrees, parse_augment
from trainables.data.normalization import Normalization

PER_SAMPLE_ONLY = ("autoaugment_imagenet", "autoaugment_cifar10", "autoaugment_svhn")


def split_names(spec: str) -> tuple[list[str], list[str]]:
    """(names applied per batch, names left per sample): AutoAugment has no batched equivalent."""
    names = parse_augment(spec)
    return [n for n in names if n not in PER_SAMPLE_ONLY], [n for n in names if n in PER_SAMPLE_ONLY]


def rotate_and_centre_crop(degrees: float, size: int, crop_frac: float | None) -> K.RandomAffine:
    """Rotation then centre crop then resize back, as ONE warp: zooming by size/crop about the centre is what
    crop + resize does, without two more passes over the pixels."""
    zoom = size / centre_crop_side(degrees, size, crop_frac)
    return K.RandomAffine(degrees=degrees, scale=(zoom, zoom), p=1.0)


def _op(name: str, config: dict, size: int, channels: int) -> nn.Module:
    """The Kornia twin of augment._op (same parameters, p = 1 where torchvision always applies)."""
    if name == "hflip":
        return K.RandomHorizontalFlip(p=0.5)
    if name == "rotation":
        return rotate_and_centre_crop(float(config["rotation_degrees"]), size, config["rotation_crop"])
    if name == "jitter":
        return K.ColorJitter(**jitter_strengths(config, channels), p=1.0)
    if name == "blur":
        return _blur(config)
    if name == "shift":
        return K.RandomAffine(degrees=0.0, translate=(config["shift_frac"], config["shift_frac"]), p=1.0)
    if name == "crop":
        return K.RandomResizedCrop((size, size), scale=(config["crop_scale"], 1.0), cropping_mode="resample")
    if name == "noise":
        return K.RandomGaussianNoise(std=float(config["noise_std"]), p=1.0)
    if name == "invert":
        return K.RandomInvert(p=0.5)
    raise ValueError(f"{name!r} has no batched version; it stays per-sample")


def _blur(config: dict) -> K.RandomGaussianBlur:
    kernel = int(config["blur_kernel"])
    return K.RandomGaussianBlur((kernel, kernel), (float(config["blur_sigma_min"]), float(config["blur_sigma"])), p=1.0)


def _minority_ops(config: dict, size: int, channels: int) -> list[nn.Module]:
    """The study's four copy transforms, as augment.build_minority_transform (one drawn per copy)."""
    return [rotate_and_centre_crop(minority_degrees(config), size, config["rotation_crop"]), K.RandomInvert(p=1.0),
            _blur(config), _op("noise", config, size, channels)]


class BatchAugment:
    """uint8 (N, C, H, W) images on any device (+ which rows are minority copies) -> augmented float in [0, 1],
    with an independent draw per image."""

    def __init__(self, ops: list[nn.Module], minority: list[nn.Module] | None = None):
        self.ops, self.minority = ops, minority or []

    def __call__(self, images: torch.Tensor, copy: torch.Tensor | None = None) -> torch.Tensor:
        out = images.float().div_(255.0)
        if self.minority and copy is not None and bool(copy.any()):
            out = self._copies(out, copy)
        for op in self.ops:
            out = op(out).clamp_(0.0, 1.0)  # as torchvision's uint8 steps clip
        return out

    def _copies(self, images: torch.Tensor, copy: torch.Tensor) -> torch.Tensor:
        """Only the copy rows get a minority transform, one of the four chosen per image."""
        rows = torch.nonzero(copy.to(images.device), as_tuple=True)[0]
        choice = torch.randint(len(self.minority), (len(rows),), device=images.device)
        for k, op in enumerate(self.minority):
            chosen = rows[choice == k]
            if len(chosen):
                images[chosen] = op(images[chosen]).clamp_(0.0, 1.0)
        return images


def build_batch_augment(config: dict, size: int, channels: int, copies: bool) -> BatchAugment | None:
    """The batched augmentation of `config` (None when there is nothing to do on the device)."""
    names, _ = split_names(config["augment"])
    ops = [_op(name, config, size, channels) for name in names]
    minority = _minority_ops(config, size, channels) if copies else None
    return BatchAugment(ops, minority) if ops or minority else None


class DeviceInputs:
    """What the training step calls on each batch (on the trial's device): augment, then normalise."""

    def __init__(self, augment: BatchAugment | None, normalization: Normalization):
        self.augment, self.normalization = augment, normalization

    def __call__(self, images: torch.Tensor, copy: torch.Tensor) -> torch.Tensor:
        unit = self.augment(images, copy) if self.augment is not None else images.float().div_(255.0)
        mean = self.normalization.mean.to(unit.device, non_blocking=True)
        std = self.normalization.std.to(unit.device, non_blocking=True)
        return (unit - mean) / std


def use_batched(choice: str, device: torch.device, augments: bool = True) -> bool:
    """`augment_device`: batch = on the trial's device; cpu = per sample in the DataLoader; auto = batched on
    CUDA (where the CPU would starve the GPU) and for a trial that `augments` nothing (the same inputs either way,
    read in one index per batch instead of one per image, whose small allocations grew a trial's heap by GiBs in an
    epoch at 224 px: BENCHMARKS.md section 9); per sample for augmented CPU trials (the path earlier results used)."""
    return choice == "batch" or (choice == "auto" and (device.type == "cuda" or not augments))

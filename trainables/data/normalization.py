"""How pixels become model inputs: `(pixel / 255 - mean) / std`, with the statistics chosen by `normalize`.

- `half`: mean 0.5, std 0.5 on every channel, i.e. [-1, 1] (the MedMNIST baselines; what medtune always did)
- `dataset`: per-channel mean and std of the TRAINING split (never validation or test, never the minority copies)
- `imagenet`: ImageNet's mean and std, averaged over RGB for 1-channel images
- `mean_image`: the mean training image subtracted per pixel (the ChestX-ray8 study), then divided by the
  per-channel std of what is left, so inputs have unit scale as with the other choices
- `auto`: `half` for a model trained from scratch, the pretrained weights' own statistics (timm's
  `pretrained_cfg` mean/std, averaged over RGB for 1-channel input) for a pretrained one

The resolved statistics travel in the checkpoint's "dataset" entry (`Normalization.as_meta`), so replay, export
and predict prepare images exactly as the trial did (`Normalization.from_meta`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
CHOICES = ("auto", "half", "dataset", "imagenet", "mean_image")
_CHUNK_VALUES = 1 << 22  # float64 values per chunk when summing the training images (~32 MB)
_MIN_STD = 1.0 / 255  # a constant channel would divide by zero


@dataclass(frozen=True)
class Normalization:
    """`name` as resolved (`auto` never appears here: it becomes `half` or `weights`)."""

    name: str
    mean: torch.Tensor  # (C, 1, 1) per channel, or (C, H, W) per pixel for mean_image; on the 0-1 scale
    std: torch.Tensor  # (C, 1, 1)

    def __call__(self, uint8_images: torch.Tensor) -> torch.Tensor:
        """uint8 (C, H, W) or (N, C, H, W) -> normalised float32."""
        return (uint8_images.float() / 255.0 - self.mean) / self.std

    def as_meta(self) -> dict:
        """What the checkpoint records: `normalize`, per-channel `mean` and `std` lists, and for mean_image the
        (C, H, W) float32 `mean_image` tensor (the per-channel `mean` is then only its channel average)."""
        meta = {"normalize": self.name, "mean": [float(v) for v in self.mean.mean(dim=(1, 2))],
                "std": [float(v) for v in self.std.flatten()]}
        if self.name == "mean_image":
            meta["mean_image"] = self.mean.clone()
        return meta

    @classmethod
    def from_meta(cls, meta: dict) -> Normalization:
        """Back from a checkpoint's "dataset" entry; checkpoints from before `normalize` hold scalars 0.5 / 0.5."""
        if meta.get("mean_image") is not None:
            mean = torch.as_tensor(meta["mean_image"], dtype=torch.float32)
        else:
            mean = torch.as_tensor(meta.get("mean", 0.5), dtype=torch.float32).reshape(-1, 1, 1)
        std = torch.as_tensor(meta.get("std", 0.5), dtype=torch.float32).reshape(-1, 1, 1)
        return cls(meta.get("normalize", "half"), mean, std)


def per_channel(name: str, mean, std) -> Normalization:
    return Normalization(name, torch.tensor(mean, dtype=torch.float32).reshape(-1, 1, 1),
                         torch.tensor(std, dtype=torch.float32).reshape(-1, 1, 1))


HALF = per_channel("half", [0.5], [0.5])  # broadcasts over any number of channels


def resolve_normalization(choice: str, *, model: str, pretrained: bool, train_images: np.ndarray) -> Normalization:
    """The statistics of `choice` for a trial training `model` on `train_images` ((N, H, W, C) uint8)."""
    channels = int(train_images.shape[-1])
    if choice == "auto":
        if not pretrained:
            return per_channel("half", [0.5] * channels, [0.5] * channels)
        from trainables.models import weights_statistics

        return per_channel("weights", *weights_statistics(model, channels))
    if choice == "half":
        return per_channel("half", [0.5] * channels, [0.5] * channels)
    if choice == "imagenet":
        if channels == len(IMAGENET_MEAN):
            return per_channel("imagenet", IMAGENET_MEAN, IMAGENET_STD)
        return per_channel("imagenet", [float(np.mean(IMAGENET_MEAN))] * channels, [float(np.mean(IMAGENET_STD))] * channels)
    if choice in ("dataset", "mean_image"):
        mean_image, squares = _pixel_sums(train_images)
        channel_mean = mean_image.mean(axis=(0, 1))
        if choice == "dataset":
            std = np.sqrt(np.maximum(squares - channel_mean ** 2, 0.0))
            return per_channel("dataset", channel_mean, np.maximum(std, _MIN_STD))
        # residual variance per channel: E[x^2] - E[mean_image^2] (averaged over the pixels)
        std = np.sqrt(np.maximum(squares - (mean_image ** 2).mean(axis=(0, 1)), 0.0))
        return Normalization("mean_image", torch.tensor(mean_image, dtype=torch.float32).permute(2, 0, 1).contiguous(),
                             torch.tensor(np.maximum(std, _MIN_STD), dtype=torch.float32).reshape(-1, 1, 1))
    raise ValueError(f"Unknown normalize {choice!r}; valid: {', '.join(CHOICES)}")


def _pixel_sums(images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(mean image (H, W, C), per-channel mean of x^2), on the 0-1 scale, summed in chunks (memmaps stay on disk)."""
    if len(images) == 0:
        raise ValueError("the training split is empty: no statistics to normalise with")
    total = np.zeros(images.shape[1:], dtype=np.float64)
    squares = np.zeros(images.shape[-1], dtype=np.float64)
    step = max(1, _CHUNK_VALUES // int(np.prod(images.shape[1:])))
    for start in range(0, len(images), step):
        chunk = np.asarray(images[start:start + step], dtype=np.float64) / 255.0
        total += chunk.sum(axis=0)
        squares += np.square(chunk).sum(axis=(0, 1, 2))
    n = len(images)
    return total / n, squares / (n * images.shape[1] * images.shape[2])

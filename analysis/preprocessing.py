"""An export folder's preprocessing read back: preprocessing.json (+ mean_image.safetensors for `mean_image`) as the
trial's `Normalization`, the one way `analysis.predict` and the ensemble's flip correction prepare pixels."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from trainables.data.normalization import Normalization
from trainables.errors import UserError

MEAN_IMAGE = "mean_image.safetensors"  # only for `normalize: mean_image` (a per-pixel mean)


def exported_normalization(folder: str | Path, prep: dict) -> Normalization:
    """`(pixel / 255 - mean) / std` as the trial applied it, from the folder's preprocessing.json `prep`."""
    mean = torch.tensor(prep["mean"], dtype=torch.float32).view(-1, 1, 1)
    if prep.get("mean_image"):  # the training split's mean image, per pixel
        try:
            mean = load_file(Path(folder) / prep["mean_image"], device="cpu")["mean_image"]
        except (OSError, SafetensorError, KeyError) as error:
            raise UserError(f"Cannot read the mean image {Path(folder) / prep['mean_image']} ({type(error).__name__}); "
                            "export the model again") from error
    return Normalization(prep["normalize"], mean, torch.tensor(prep["std"], dtype=torch.float32).view(-1, 1, 1))

"""An exported ensemble as ONE network: its members' calibrated probabilities averaged (weighted, with ensemble
selection's weights; equally, for an export without them), optionally over a horizontal flip of the image
(test-time augmentation). analysis.predict builds it from `ensemble.json` and
`members/<label>/` (each member a model.json + model.safetensors pair, as a single export); model.ts traces it.

Its output sits where a single model's logits sit: the log of the mean probability for softmax tasks, its logit
for multi-label. So whatever turns logits into probabilities at temperature 1 (trainables.training.metrics) gets
the averaged calibrated probabilities back; analysis.predict divides it by decision.json's temperature, which
analysis.export fits on this output on validation (out-of-fold for a cross-validated winner), as for one network.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError

from analysis.preprocessing import exported_normalization
from trainables.data.normalization import Normalization
from trainables.errors import UserError

ENSEMBLE, MEMBERS = "ensemble.json", "members"


def flip_shift(normalization: Normalization) -> torch.Tensor:
    """What flipping a normalised input gets wrong: with a per-pixel mean (`mean_image`) the mean is flipped
    too, so `flip(x) - shift` is the flipped image normalised with the unflipped mean. Zero for per-channel means."""
    return (normalization.mean - torch.flip(normalization.mean, dims=(2,))) / normalization.std


class Flipped(torch.nn.Module):
    """`model` applied to the horizontally flipped image (normalised (N, C, H, W) in, logits out)."""

    def __init__(self, model: torch.nn.Module, shift: torch.Tensor):
        super().__init__()
        self.model = model
        self.register_buffer("shift", shift.float())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(torch.flip(x, dims=(3,)) - self.shift)


class Ensemble(torch.nn.Module):
    """Weighted mean of `members`' probabilities at their own temperatures (each member's own the mean over the
    image and its mirror image with `tta`). `weights`: ensemble selection's, normalised to sum to one; None
    (an export from before weights existed, or top-K averaging): equal."""

    def __init__(self, members: list[torch.nn.Module], temperatures: list[float], task: str, tta: bool,
                 shift: torch.Tensor, weights: list[float] | None = None):
        super().__init__()
        self.members = torch.nn.ModuleList(members)
        self.register_buffer("temperatures", torch.tensor(temperatures, dtype=torch.float32))
        weights = torch.ones(len(members)) if weights is None else torch.tensor(weights, dtype=torch.float64)
        if len(weights) != len(members) or not bool((weights >= 0).all()) or float(weights.sum()) <= 0:
            raise ValueError(f"ensemble weights {weights.tolist()} do not weigh {len(members)} members")
        self.register_buffer("weights", (weights / weights.sum()).float())
        self.register_buffer("shift", shift.float())
        self.multilabel, self.tta = task == "multilabel", tta

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        views = [x, torch.flip(x, dims=(3,)) - self.shift] if self.tta else [x]
        mean = torch.zeros(())
        for index, member in enumerate(self.members):
            probs = []
            for view in views:
                logits = member(view).float() / self.temperatures[index]
                probs.append(torch.sigmoid(logits) if self.multilabel else torch.softmax(logits, dim=1))
            mean = mean + self.weights[index] * torch.stack(probs).mean(dim=0)
        return torch.logit(mean) if self.multilabel else torch.log(mean)


def read_manifest(folder: str | Path) -> dict | None:
    """ensemble.json when the folder ships an ensemble network (None: a single model.json + model.safetensors)."""
    path = Path(folder) / ENSEMBLE
    if not path.exists():
        return None
    try:
        manifest = json.loads(path.read_text())
    except ValueError as error:
        raise UserError(f"{path} is not valid JSON ({error}); export the model again") from error
    return manifest if manifest.get("network") == "ensemble" else None


def load_ensemble(folder: str | Path, manifest: dict, load_member) -> Ensemble:
    """The ensemble of `manifest`, each member loaded by `load_member(member folder)` (analysis.predict.load_model),
    the flip correction rebuilt from the folder's own preprocessing (preprocessing.json, mean_image.safetensors)."""
    folder = Path(folder)
    try:
        members = manifest["members"]
        models = [load_member(folder / m["path"]) for m in members]
        prep = json.loads((folder / "preprocessing.json").read_text())
        normalization = exported_normalization(folder, prep)
        weights = [float(m["weight"]) for m in members] if all("weight" in m for m in members) else None
        return Ensemble(models, [float(m["temperature"]) for m in members], prep["task"], bool(manifest["tta"]),
                        flip_shift(normalization), weights).eval()
    except (OSError, KeyError, TypeError, ValueError, SafetensorError) as error:
        raise UserError(f"{folder / ENSEMBLE} does not describe a loadable ensemble ({type(error).__name__}: "
                        f"{str(error)[:120]}); export the model again") from error

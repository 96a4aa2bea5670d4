"""The files of an export folder: the network, its TorchScript twin, an ensemble's members and manifest, and
how an image becomes the network's input (preprocessing.json, with a per-pixel mean beside it).

`analysis.predict.load_model` reads what `save_weights` writes (model.json + model.safetensors); model.ts is for
other runtimes and the Model Registry. The decision (decision.json), the config, the metrics and the card are
written by analysis.export from what analysis.scoring and analysis.model_card return.
"""

from __future__ import annotations

import json
import re
import shutil
import warnings
from pathlib import Path

import torch
from safetensors.torch import save_file

from analysis.ensemble import Choice
from analysis.ensemble_model import ENSEMBLE, MEMBERS
from analysis.predict import ARCHITECTURE, FORMAT, TORCHSCRIPT, WEIGHTS, Architecture
from analysis.preprocessing import MEAN_IMAGE
from analysis.replay import Replay
from trainables.data.datasets import from_image_files, medmnist_file

FILES = (WEIGHTS, ARCHITECTURE, TORCHSCRIPT, "preprocessing.json", "decision.json", "config.json", "metrics.json",
         "model_card.md")


def architecture(rep: Replay) -> Architecture:
    """The constructor call that rebuilds the trial's network (model.json)."""
    return Architecture(name=rep.config["model"], num_classes=rep.dataset.num_classes, in_chans=rep.dataset.channels,
                        img_size=int(rep.dataset.dev.images.shape[1]), drop_rate=rep.config.get("drop_rate"),
                        drop_path_rate=rep.config.get("drop_path_rate"), attn_drop_rate=rep.config.get("attn_drop_rate"),
                        stem=rep.stem)


def save_model(model: torch.nn.Module, spec: Architecture, out: Path) -> torch.jit.ScriptModule:
    """model.json + float32 safetensors weights (what analysis.predict loads), and a traced TorchScript module
    for other runtimes and the Model Registry (normalised (N, C, H, W) float32 in, logits out)."""
    save_weights(model, spec, out)
    return save_torchscript(model, spec, out)


def save_weights(model: torch.nn.Module, spec: Architecture, folder: Path) -> None:
    """model.json + model.safetensors: what analysis.predict.load_model rebuilds the network from."""
    model = model.eval()
    (folder / ARCHITECTURE).write_text(spec.model_dump_json(indent=2))
    save_file({k: v.detach().contiguous() for k, v in model.state_dict().items()}, str(folder / WEIGHTS),
              metadata={"format": FORMAT})


def save_torchscript(model: torch.nn.Module, spec: Architecture, out: Path) -> torch.jit.ScriptModule:
    """model.ts, traced (normalised (N, C, H, W) float32 in, logits out), loaded back for the registry."""
    model = model.eval()
    example = torch.zeros(2, spec.in_chans, spec.img_size, spec.img_size)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit's deprecation notice; TorchScript is an extra
        torch.jit.trace(model, example).save(str(out / TORCHSCRIPT))
        return torch.jit.load(str(out / TORCHSCRIPT), map_location="cpu")


def save_ensemble(choice: Choice, out: Path) -> torch.jit.ScriptModule:
    """The chosen ensemble: members/<label>/ (model.json + model.safetensors each, as a single export), the
    manifest (ensemble.json: members, their temperatures and weights, TTA) and one traced module averaging them
    (model.ts)."""
    shutil.rmtree(out / MEMBERS, ignore_errors=True)
    for name in (ARCHITECTURE, WEIGHTS):  # a single model's files from an earlier export would shadow nothing, but mislead
        (out / name).unlink(missing_ok=True)
    shipped = []
    for index in choice.in_variant():
        member, rep = choice.members[index], choice.reps[index]
        folder = out / MEMBERS / re.sub(r"[^A-Za-z0-9_.-]", "_", member.label)
        folder.mkdir(parents=True)
        save_weights(rep.model, architecture(rep), folder)
        shipped.append({"label": member.label, "run_id": member.run_id, "path": folder.relative_to(out).as_posix(),
                        "temperature": choice.temperatures[index], "validation_score": member.score,
                        **({} if choice.weights is None else {"weight": choice.weights[index]})})
    write_manifest(choice, out, shipped)
    return save_torchscript(choice.module(), architecture(choice.reps[0]), out)


def write_manifest(choice: Choice, out: Path, shipped: list[dict]) -> None:
    """ensemble.json: which variant was chosen on validation and why; with `network: ensemble` also what
    analysis.predict builds (members, temperatures, tta). `network: single` ships model.json as without --ensemble."""
    (out / ENSEMBLE).write_text(json.dumps({"format": FORMAT, **choice.record(), "members": shipped}, indent=2))


def preprocessing(state: dict, rep: Replay, out: Path) -> dict:
    """preprocessing.json: how an image file becomes the model's input, as the trial prepared its images.
    A per-pixel mean (`normalize: mean_image`) goes to mean_image.safetensors next to it."""
    meta, channels, norm = state["dataset"], rep.dataset.channels, rep.normalization
    mean = norm.mean.mean(dim=(1, 2)).expand(channels) if norm.mean.shape[0] == 1 else norm.mean.mean(dim=(1, 2))
    std = norm.std.flatten().expand(channels) if norm.std.numel() == 1 else norm.std.flatten()
    prep = {"format": FORMAT, "task": rep.dataset.task, "class_names": list(rep.dataset.class_names),
            "image_size": int(meta["image_size"]), "channels": channels, "mode": "L" if channels == 1 else "RGB",
            "resize": resize_text(rep.config["dataset"], int(meta["image_size"])),
            "scale": 255.0, "normalize": norm.name, "mean": [float(v) for v in mean], "std": [float(v) for v in std],
            "input": "float32 (N, C, H, W): (pixel / scale - mean) / std", "output": "logits (N, num_classes)",
            "architecture": ARCHITECTURE, "weights": WEIGHTS, "torchscript": TORCHSCRIPT}
    if norm.mean.shape[1:] != (1, 1):  # per-pixel mean: the per-channel `mean` above is only its average
        save_file({"mean_image": norm.mean.contiguous()}, str(out / MEAN_IMAGE), metadata={"format": FORMAT})
        prep |= {"mean_image": MEAN_IMAGE, "input": "float32 (N, C, H, W): (pixel / scale - mean_image) / std, "
                 f"mean_image the (C, H, W) tensor in {MEAN_IMAGE}"}
    return prep


def resize_text(spec: str, size: int) -> str:
    """How the training images of dataset `spec` came to `size` px, and what analysis.predict does to a new image."""
    if from_image_files(spec):
        return ("bilinear, to image_size x image_size, aspect ratio not kept (trainables.data.image_cache), as the "
                "training images were; analysis.predict does the same")
    return (f"none in training: the MedMNIST file {medmnist_file(spec, size, Path()).name} holds the images at {size} x "
            f"{size} px as MedMNIST published them; analysis.predict resizes a new image to image_size x image_size "
            "(bilinear, aspect ratio not kept), which need not match MedMNIST's own resizing")

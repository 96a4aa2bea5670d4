"""Classify image files with an exported model folder (written by analysis.export).

    python -m analysis.predict --model exported/ chest1.jpeg chest2.png
    python -m analysis.predict --model exported/ --batch-size 256 scans/*.png
    python -m analysis.predict --model exported/ --runtime onnx study/*.dcm

One line per image: path, predicted label, then the calibrated probability of every class. The image (PNG, JPEG,
... or DICOM, told apart by content: analysis.image_files) goes through the preprocessing the model was trained with
(preprocessing.json: mode, size, bilinear resize, mean/std), then the model, temperature scaling and the
validation-chosen threshold. `--runtime onnx` runs model.onnx in onnxruntime instead (analysis.onnx_model; the
temperature is inside it), with the same preprocessing and threshold. Files are read and
classified `--batch-size` at a time and each batch is printed before the next is read, so a folder of any size
needs the memory of one batch.

Loading executes nothing from the folder: the model is built by medtune's own registry from its name and
constructor arguments (model.json), and the weights are plain tensors (model.safetensors). The folder's
TorchScript file (model.ts) is for other runtimes and is never loaded here. An exported ensemble (ensemble.json
and members/, each member a model.json + model.safetensors pair) is built the same way, as one network.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from safetensors import SafetensorError
from safetensors.torch import load_file

from analysis import runs
from analysis.ensemble_model import load_ensemble, read_manifest
from analysis.image_files import read_image
from analysis.onnx_model import OnnxModel
from analysis.preprocessing import exported_normalization
from trainables.errors import UserError
from trainables.models import create_model
from trainables.training.metrics import probabilities

FORMAT = "medtune-export-v2"  # v2: the model is model.json + model.safetensors (v1 shipped TorchScript only)
ARCHITECTURE, WEIGHTS, TORCHSCRIPT = "model.json", "model.safetensors", "model.ts"
BATCH_SIZE = 64  # images per forward pass: a few MB of input at 224 px, and fast on a CPU
RUNTIMES = ("torch", "onnx")


class Architecture(BaseModel):
    """model.json: what `trainables.models.create_model` needs to rebuild the exported network."""

    model_config = ConfigDict(extra="forbid")

    format: str = FORMAT
    name: str  # registered model name (trainables.models)
    num_classes: int = Field(ge=1)
    in_chans: int = Field(ge=1)
    img_size: int = Field(ge=1)
    drop_rate: float | None = None  # as trained; dropout is inactive at inference, but it shapes some heads
    drop_path_rate: float | None = None
    attn_drop_rate: float | None = None
    stem: Literal["imagenet", "small", "fixed"] = "imagenet"  # resolved; exports from before `stem`: timm's (imagenet)

    def options(self) -> dict:
        """The optional constructor arguments that were set (None: the model's default), and the stem."""
        return {**{k: v for k, v in (("drop_rate", self.drop_rate), ("drop_path_rate", self.drop_path_rate),
                                     ("attn_drop_rate", self.attn_drop_rate)) if v is not None}, "stem": self.stem}


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Predict the class of image files with an exported medtune model.")
    parser.add_argument("--model", required=True, help="folder written by `python -m analysis.export`")
    parser.add_argument("images", nargs="+", help="image files (PNG, JPEG, DICOM, ...)")
    parser.add_argument("--runtime", choices=RUNTIMES, default="torch",
                        help="torch (default): model.json + model.safetensors; onnx: model.onnx in onnxruntime "
                             "(needs pip install -e '.[export]')")
    parser.add_argument("--json", action="store_true", help="one JSON object per line instead of text")
    parser.add_argument("--batch-size", type=int, default=BATCH_SIZE,
                        help=f"images read and classified at a time (default {BATCH_SIZE})")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    return parser


def load_model(folder: str | Path) -> torch.nn.Module:
    """The exported network in eval mode, float32 on the CPU: rebuilt by name, weights from safetensors; an
    exported ensemble (ensemble.json) is one network averaging its members (analysis.ensemble_model)."""
    folder = Path(folder)
    manifest = read_manifest(folder)
    if manifest is not None:
        return load_ensemble(folder, manifest, load_model)
    try:
        spec = Architecture.model_validate_json((folder / ARCHITECTURE).read_text())
    except (OSError, ValidationError) as error:
        raise UserError(f"{folder / ARCHITECTURE} is missing or not a medtune model description "
                        f"({type(error).__name__}); export the model again") from error
    if spec.format != FORMAT:
        raise UserError(f"{folder / ARCHITECTURE} is format {spec.format!r}, {FORMAT} expected; export the model again")
    model = create_model(spec.name, num_classes=spec.num_classes, in_chans=spec.in_chans, img_size=spec.img_size,
                         **spec.options())  # an unknown name is a UserError from the registry
    try:
        model.load_state_dict(load_file(folder / WEIGHTS, device="cpu"))
    except (OSError, SafetensorError, RuntimeError) as error:  # missing/corrupt file, weights of another shape
        raise UserError(f"Cannot load the weights {folder / WEIGHTS} into {spec.name} ({type(error).__name__}: "
                        f"{str(error).splitlines()[0][:160]}); export the model again") from error
    return model.float().eval()


class ExportedModel:
    """An export folder: model.json + model.safetensors (or model.onnx, `runtime="onnx"`) + preprocessing.json +
    decision.json."""

    def __init__(self, folder: str | Path, runtime: str = "torch"):
        folder = Path(folder)
        try:
            self.prep = json.loads((folder / "preprocessing.json").read_text())
            self.decision = json.loads((folder / "decision.json").read_text())
        except (OSError, ValueError) as error:
            raise UserError(f"{folder} is not a medtune export ({type(error).__name__}: {error}); "
                            "create one with `python -m analysis.export --search NAME --out DIR`") from error
        if self.prep.get("format") != FORMAT:
            raise UserError(f"{folder}/preprocessing.json is not from this version of analysis.export (format "
                            f"{FORMAT} expected, found {self.prep.get('format')!r}); export the model again")
        if runtime not in RUNTIMES:
            raise UserError(f"Unknown runtime {runtime!r}; valid: {', '.join(RUNTIMES)}")
        self.model = load_model(folder) if runtime == "torch" else None
        self.onnx = OnnxModel(folder) if runtime == "onnx" else None
        self.normalization = exported_normalization(folder, self.prep)

    def tensor(self, path: str | Path | bytes) -> torch.Tensor:
        """One image file (a path, or its bytes) -> normalised float (C, H, W), exactly as the training images were
        prepared."""
        pixels = read_image(path, int(self.prep["image_size"]), self.prep["mode"])
        return self.normalization(torch.from_numpy(np.array(pixels)).permute(2, 0, 1))

    def predict(self, paths: Sequence, batch_size: int = BATCH_SIZE) -> tuple[np.ndarray, list]:
        """(calibrated probabilities (N, K), predicted label per image), `batch_size` images per forward pass."""
        done = list(self.batches(paths, batch_size))
        probs = np.concatenate([p for _, p, _ in done]) if done else np.zeros((0, len(self.prep["class_names"])))
        return probs, [label for _, _, labels in done for label in labels]

    def batches(self, paths: Sequence, batch_size: int = BATCH_SIZE) -> Iterator[tuple[list, np.ndarray, list]]:
        """(paths, calibrated probabilities, labels) of `batch_size` images at a time; a file is read only when its
        batch is classified."""
        if batch_size < 1:
            raise UserError(f"--batch-size {batch_size} is not a number of images; give 1 or more (e.g. {BATCH_SIZE})")
        for start in range(0, len(paths), batch_size):
            chunk = list(paths[start:start + batch_size])
            yield (chunk, *self.predict_batch(chunk))

    @torch.inference_mode()
    def predict_batch(self, paths: Sequence) -> tuple[np.ndarray, list]:
        """One forward pass over `paths`: (calibrated probabilities (N, K), predicted label per image)."""
        batch = torch.stack([self.tensor(p) for p in paths])
        task, names = self.prep["task"], self.prep["class_names"]
        if self.onnx is not None:  # the temperature is inside model.onnx
            probs = self.onnx(batch.numpy()).astype(np.float64)
        else:
            logits = self.model(batch).float().numpy().astype(np.float64)
            probs = probabilities(task, logits / float(self.decision["temperature"]))
        if task == "multilabel":
            labels = ["+".join(n for n, p in zip(names, row) if p >= 0.5) or "(none)" for row in probs]
        elif task == "binary" and self.decision.get("threshold") is not None:
            labels = [names[int(row[1] >= self.decision["threshold"])] for row in probs]
        else:
            labels = [names[int(i)] for i in probs.argmax(axis=1)]
        return probs, labels


def predict(args) -> int:
    model = ExportedModel(args.model, args.runtime)
    names = model.prep["class_names"]
    for paths, probs, labels in model.batches(args.images, args.batch_size):
        for path, label, row in zip(paths, labels, probs):
            if args.json:
                print(json.dumps({"image": path, "label": label, "probabilities": dict(zip(names, map(float, row)))}))
            else:
                print(f"{path}\t{label}\t" + "  ".join(f"{n}={p:.4f}" for n, p in zip(names, row)))
        sys.stdout.flush()  # a batch's lines out before the next batch is read
    return 0


def main(argv=None) -> int:
    args = get_args_parser().parse_args(argv)
    return runs.run_cli(lambda: predict(args), args.debug)


if __name__ == "__main__":
    sys.exit(main())

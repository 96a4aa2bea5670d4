"""Classify image files with an exported model folder (written by analysis.export).

    python -m analysis.predict --model exported/ chest1.jpeg chest2.png

One line per image: path, predicted label, then the calibrated probability of every class. The image
goes through the preprocessing the model was trained with (preprocessing.json: mode, size, bilinear
resize, mean/std), then the TorchScript module, temperature scaling and the validation-chosen threshold.
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from pathlib import Path

import numpy as np
import torch

from analysis import runs
from trainables.errors import UserError
from trainables.image_cache import READ_ERRORS, decode_image
from trainables.metrics import probabilities

FORMAT = "medtune-export-v1"


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Predict the class of image files with an exported medtune model.")
    parser.add_argument("--model", required=True, help="folder written by `python -m analysis.export`")
    parser.add_argument("images", nargs="+", help="image files (PNG, JPEG, ...)")
    parser.add_argument("--json", action="store_true", help="one JSON object per line instead of text")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    return parser


class ExportedModel:
    """An export folder: TorchScript module + preprocessing.json + decision.json."""

    def __init__(self, folder: str | Path):
        folder = Path(folder)
        try:
            self.prep = json.loads((folder / "preprocessing.json").read_text())
            self.decision = json.loads((folder / "decision.json").read_text())
        except (OSError, ValueError) as error:
            raise UserError(f"{folder} is not a medtune export ({type(error).__name__}: {error}); "
                            "create one with `python -m analysis.export --search NAME --out DIR`") from None
        if self.prep.get("format") != FORMAT:
            raise UserError(f"{folder}/preprocessing.json is not from analysis.export (format {FORMAT} expected)")
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", FutureWarning)  # torch.jit's deprecation notice
                self.module = torch.jit.load(str(folder / self.prep["model"]), map_location="cpu").eval()
        except (OSError, RuntimeError, ValueError) as error:
            raise UserError(f"Cannot load {folder / self.prep['model']} ({type(error).__name__}); export the model again") from None

    def tensor(self, path: str | Path) -> torch.Tensor:
        """One image file -> normalised float (C, H, W), exactly as the training images were prepared."""
        try:
            pixels = decode_image(path, int(self.prep["image_size"]), self.prep["mode"])
        except READ_ERRORS as error:
            raise UserError(f"Cannot read image {path} ({type(error).__name__}: {str(error)[:120]}); "
                            "pass a readable image file (PNG, JPEG, ...)") from None
        image = torch.from_numpy(np.array(pixels)).permute(2, 0, 1).float() / float(self.prep["scale"])
        mean = torch.tensor(self.prep["mean"]).view(-1, 1, 1)
        std = torch.tensor(self.prep["std"]).view(-1, 1, 1)
        return (image - mean) / std

    @torch.inference_mode()
    def predict(self, paths: list) -> tuple[np.ndarray, list]:
        """(calibrated probabilities (N, K), predicted label per image)."""
        batch = torch.stack([self.tensor(p) for p in paths])  # every file is read before any output
        logits = self.module(batch).float().numpy().astype(np.float64)
        task, names = self.prep["task"], self.prep["class_names"]
        probs = probabilities(task, logits / float(self.decision["temperature"]))
        if task == "multilabel":
            labels = ["+".join(n for n, p in zip(names, row) if p >= 0.5) or "(none)" for row in probs]
        elif task == "binary" and self.decision.get("threshold") is not None:
            labels = [names[int(row[1] >= self.decision["threshold"])] for row in probs]
        else:
            labels = [names[int(i)] for i in probs.argmax(axis=1)]
        return probs, labels


def predict(args) -> int:
    model = ExportedModel(args.model)
    probs, labels = model.predict(args.images)
    names = model.prep["class_names"]
    for path, label, row in zip(args.images, labels, probs):
        if args.json:
            print(json.dumps({"image": path, "label": label, "probabilities": dict(zip(names, map(float, row)))}))
        else:
            print(f"{path}\t{label}\t" + "  ".join(f"{n}={p:.4f}" for n, p in zip(names, row)))
    return 0


def main(argv=None) -> int:
    args = get_args_parser().parse_args(argv)
    return runs.run_cli(lambda: predict(args), args.debug)


if __name__ == "__main__":
    sys.exit(main())

"""The exported model as ONNX (model.onnx), for runtimes other than PyTorch: written with `torch.onnx.export` (torch's
default dynamo exporter, which needs onnxscript), checked with onnxruntime against the PyTorch model on the
validation images, and run by `python -m analysis.predict --runtime onnx`.

What the graph computes is what analysis.predict computes from the PyTorch files, the calibration included:
normalised float32 (N, C, H, W) in (the input of model.ts, as preprocessing.json describes it), each class's
calibrated probability (N, K) out -- softmax (sigmoid per label for multi-label) of the network's output divided by
decision.json's temperature. An ensemble is one graph: its members, their temperatures, weights and the flip of
TTA are inside. The batch size is dynamic. The threshold is applied outside, as with PyTorch; preprocessing.json
and decision.json travel in the file's metadata (`medtune.preprocessing`, `medtune.decision`) so an ONNX consumer
can read class names and threshold from the file alone. Weights are inside model.onnx below protobuf's 2 GB limit
and in `model.onnx.data` beside it above (torch's exporter decides); onnxruntime loads either from the folder.

onnx, onnxscript and onnxruntime are an optional extra (`pip install -e '.[export]'`), never a trial's dependency:
without them the export says so in one line and writes the rest.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import importlib.util
import io
import json
import time
import warnings
from pathlib import Path

import numpy as np
import torch

from analysis.calibration import calibrated
from trainables.data.datasets import ImageSet
from trainables.data.normalization import Normalization
from trainables.errors import UserError
from trainables.training.metrics import predictions
from trainables.training.split_run import eval_loader

ONNX_FILE = "model.onnx"
PACKAGES = ("onnx", "onnxscript", "onnxruntime")
EXPORT_EXTRA = "pip install -e '.[export]'"
INPUT, OUTPUT = "input", "probabilities"
# Largest |probability difference| allowed between onnxruntime and PyTorch. Both compute in float32; the exporter's
# graph optimiser and onnxruntime's kernels (fused convolution + batch norm, other summation orders) move a logit by
# float32 rounding of its activations: at most 4e-7 over all 17 registered networks with random weights (measured,
# 2026-12), and a probability moves by at most a quarter of its logit's change. 1e-4 leaves two orders of magnitude
# for deeper networks and larger logits, while every translation error we can name moves some probability of a
# validation split by far more: a temperature left out (T = 1.2 moves p = 0.9 by 0.03), a member or its weight
# dropped, the TTA flip lost, another normalisation.
TOLERANCE = 1e-4
CHECK_BATCH = 64  # images per onnxruntime call in the check: several calls, so the dynamic batch size is exercised


def missing_packages() -> list[str]:
    """The packages of the `export` extra that are not installed."""
    return [name for name in PACKAGES if importlib.util.find_spec(name) is None]


class Calibrated(torch.nn.Module):
    """`network` (normalised (N, C, H, W) in, logits or an ensemble's log-probabilities out) followed by the
    temperature and softmax / sigmoid: calibrated probabilities out, as analysis.predict computes them."""

    def __init__(self, network: torch.nn.Module, temperature: float, task: str):
        super().__init__()
        self.network = network
        self.register_buffer("temperature", torch.tensor(float(temperature), dtype=torch.float32))
        self.multilabel = task == "multilabel"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scaled = self.network(x).float() / self.temperature
        return torch.sigmoid(scaled) if self.multilabel else torch.softmax(scaled, dim=1)


def write_onnx(network: torch.nn.Module, prep: dict, decision: dict, out: Path) -> dict:
    """model.onnx (+ model.onnx.data for a model over 2 GB) in `out`: the calibrated network, dynamic batch size.
    Returns what metrics.json records; without the export extra, the reason it was skipped."""
    for stale in out.glob(f"{ONNX_FILE}*"):  # an earlier export's file must not pass for this model
        stale.unlink()
    missing = missing_packages()
    if missing:
        return {"skipped": f"{', '.join(missing)} not installed; {EXPORT_EXTRA} to write {ONNX_FILE}"}
    started = time.perf_counter()
    module = Calibrated(network, decision["temperature"], prep["task"]).eval()
    example = torch.zeros(2, int(prep["channels"]), int(prep["image_size"]), int(prep["image_size"]))
    batch = torch.export.Dim("batch", min=1)
    # the exporter prints progress and warns about its own internals; the check below is what vouches for the file
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), torch.no_grad():
            warnings.simplefilter("ignore")
            program = torch.onnx.export(module, (example,), dynamic_shapes=({0: batch},), input_names=[INPUT],
                                        output_names=[OUTPUT], verbose=False)
    except Exception as error:  # the exporter's errors have no common type; the export reports it and exits 1  # noqa: BLE001
        return {"error": f"torch.onnx.export failed: {type(error).__name__}: {str(error).splitlines()[0][:160]}",
                "ok": False}
    program.model.metadata_props.update({"medtune.format": str(prep["format"]),
                                         "medtune.preprocessing": json.dumps(prep),
                                         "medtune.decision": json.dumps(decision)})
    program.save(str(out / ONNX_FILE))
    return {"files": sorted(p.name for p in out.glob(f"{ONNX_FILE}*")),
            "opset": int(program.model.opset_imports.get("", 0)),
            "input": f"{INPUT}: float32 (N, C, H, W), normalised as preprocessing.json says (the input of model.ts)",
            "output": f"{OUTPUT}: float32 (N, K), each class's calibrated probability (temperature inside)",
            "exporter": f"torch.onnx.export (dynamo), torch {torch.__version__.split('+')[0]}, "
                        f"onnxscript {importlib.metadata.version('onnxscript')}",
            "export_seconds": round(time.perf_counter() - started, 2)}


def export_onnx(network: torch.nn.Module, prep: dict, decision: dict, out: Path, images: ImageSet,
                normalization: Normalization) -> dict:
    """Write model.onnx and check it on `images` (the validation split); a file that does not match is removed, so
    no folder ships an ONNX model that computes something else. The record for metrics.json (`ok` False: the export
    fails; no `ok`: skipped, the extra is not installed)."""
    record = write_onnx(network, prep, decision, out)
    if "files" not in record:
        return record
    record |= check_onnx(out, network, decision, prep["task"], images, normalization)
    if not record["ok"]:
        for written in out.glob(f"{ONNX_FILE}*"):
            written.unlink()
    return record


class OnnxModel:
    """model.onnx in onnxruntime on the CPU: normalised float32 (N, C, H, W) -> calibrated probabilities (N, K)."""

    def __init__(self, folder: str | Path):
        path = Path(folder) / ONNX_FILE
        if missing_packages():
            raise UserError(f"--runtime onnx needs {', '.join(missing_packages())}, not installed: {EXPORT_EXTRA}")
        if not path.exists():
            raise UserError(f"{path} does not exist (exported without the export extra?); {EXPORT_EXTRA} and export "
                            "the model again, or leave out --runtime onnx")
        import onnxruntime

        options = onnxruntime.SessionOptions()
        options.log_severity_level = 3  # errors only: its notes on graph optimisation are not the user's business
        try:
            self.session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        except Exception as error:  # onnxruntime raises its own untyped errors for a corrupt or foreign file  # noqa: BLE001
            raise UserError(f"Cannot load {path} in onnxruntime ({type(error).__name__}: "
                            f"{str(error).splitlines()[0][:160]}); export the model again") from error

    def __call__(self, inputs: np.ndarray) -> np.ndarray:
        return self.session.run([OUTPUT], {INPUT: np.ascontiguousarray(inputs, np.float32)})[0]


def check_onnx(out: Path, network: torch.nn.Module, decision: dict, task: str, images: ImageSet,
               normalization: Normalization) -> dict:
    """model.onnx in onnxruntime against the PyTorch `network` (as analysis.predict runs it) on `images` (the
    validation split): the largest |probability difference| and how many predicted labels differ (at the
    threshold for a binary task). Within TOLERANCE it matches; a label can then differ only where a probability sits
    within TOLERANCE of the threshold, so the count is reported, not required to be zero: Youden's J (or the target
    sensitivity) cuts at one of these very validation probabilities, so the image that set the threshold sits on it
    and float32 rounding may flip it (1 of 1,047 on the suite's PneumoniaMNIST search)."""
    onnx = OnnxModel(out)
    started = time.perf_counter()
    largest, flips, n = 0.0, 0, 0
    threshold = decision.get("threshold")
    for inputs, _ in eval_loader(images, CHECK_BATCH, torch.device("cpu"), normalization):
        with torch.inference_mode():
            expected = calibrated(network(inputs).float().numpy(), task, float(decision["temperature"]))
        got = onnx(inputs.numpy()).astype(np.float64)
        largest = max(largest, float(np.abs(got - expected).max()))
        rule = {"threshold": threshold} if task == "binary" and threshold is not None else {}
        flips += int((predictions(task, got, **rule) != predictions(task, expected, **rule)).sum())
        n += len(inputs)
    return {"checked_on": "the validation split", "images": n,
            "runtime": f"onnxruntime {importlib.metadata.version('onnxruntime')} (CPU) vs PyTorch (analysis.predict)",
            "max_abs_difference": largest, "tolerance": TOLERANCE, "label_flips": flips, "ok": largest <= TOLERANCE,
            "check_seconds": round(time.perf_counter() - started, 2)}


def onnx_text(record: dict) -> str:
    """One line on model.onnx for the printed summary and the card."""
    if "max_abs_difference" not in record:
        return f"not written ({record.get('skipped') or record.get('error')})"
    verdict = "matches" if record["ok"] else "DOES NOT MATCH (the file was removed)"
    return (f"{verdict} the PyTorch model on {record['checked_on']} ({record['images']} images): largest |probability "
            f"difference| {record['max_abs_difference']:.1e} (tolerance {record['tolerance']:.0e}), "
            f"{record['label_flips']} predicted label{' differs' if record['label_flips'] == 1 else 's differ'}")

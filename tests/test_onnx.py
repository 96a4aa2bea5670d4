"""model.onnx (analysis.onnx_model) on a hand-made export (no search): written by torch's dynamo exporter with the
temperature inside, checked with onnxruntime, run by `analysis.predict --runtime onnx`; a wrong file is removed, and
without the export extra both sides say how to install it. The first ONNX export of a process costs about 7 s
(onnxscript's import and the exporter's warm-up), later ones about 1 s for this network. The ensemble's ONNX (members,
weights, temperatures, TTA inside) is checked in tests/test_ensemble.py, on the real search's export in
tests/test_analysis.py."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import toy_dataset
from test_analysis import hand_export, run_main, write_pngs

import analysis.onnx_model
from analysis import predict
from analysis.calibration import calibrated
from analysis.onnx_model import EXPORT_EXTRA, ONNX_FILE, TOLERANCE, export_onnx, write_onnx
from analysis.preprocessing import exported_normalization

pytest.importorskip("onnxruntime", reason=f"the export extra: {EXPORT_EXTRA}")


def onnx_export(folder, images):
    """model.onnx of a hand export, checked on `images` as analysis.export checks on the validation split."""
    prep = json.loads((folder / "preprocessing.json").read_text())
    decision = json.loads((folder / "decision.json").read_text())
    return export_onnx(predict.load_model(folder), prep, decision, folder, images, exported_normalization(folder, prep))


def predicted(folder, *argv) -> tuple[np.ndarray, list[str]]:
    code, stdout, stderr = run_main(predict, "--model", folder, "--json", *argv)
    assert code == 0, stderr
    rows = [json.loads(line) for line in stdout.splitlines()]
    return np.array([list(row["probabilities"].values()) for row in rows]), [row["label"] for row in rows]


def test_onnx_computes_the_calibrated_probabilities_and_predict_runtime_onnx_agrees(tmp_path):
    folder = hand_export(tmp_path / "export")  # temperature 1.5
    data = toy_dataset("multiclass")
    record = onnx_export(folder, data.dev)
    assert record["ok"] and record["max_abs_difference"] <= TOLERANCE and record["images"] == len(data.dev.labels)
    assert record["files"] == [ONNX_FILE] and record["opset"] >= 18 and record["label_flips"] == 0
    import onnx

    metadata = {p.key: p.value for p in onnx.load(str(folder / ONNX_FILE)).metadata_props}
    assert json.loads(metadata["medtune.preprocessing"]) == json.loads((folder / "preprocessing.json").read_text())
    assert json.loads(metadata["medtune.decision"])["temperature"] == 1.5
    # predict: batches of 3, 3 and 1 through the one dynamic-batch graph, the labels and probabilities of PyTorch
    paths = write_pngs(data.test.images[:7], tmp_path / "png")
    torch_probs, torch_labels = predicted(folder, *paths)
    onnx_probs, onnx_labels = predicted(folder, "--runtime", "onnx", "--batch-size", 3, *paths)
    assert onnx_labels == torch_labels and np.abs(onnx_probs - torch_probs).max() <= TOLERANCE
    # the temperature is inside: at T = 1 the probabilities would be sharper than these
    inputs = torch.stack([predict.ExportedModel(folder).tensor(p) for p in paths])
    with torch.no_grad():
        logits = predict.load_model(folder)(inputs).numpy()
    assert np.abs(calibrated(logits, "multiclass", 1.0) - onnx_probs).max() > 100 * TOLERANCE


def test_an_onnx_file_that_computes_something_else_is_removed(tmp_path, monkeypatch):
    """The check can fail: an exporter that loses the temperature gives a file the check refuses and removes."""
    folder = hand_export(tmp_path / "export")
    monkeypatch.setattr(analysis.onnx_model.Calibrated, "forward",
                        lambda self, x: torch.softmax(self.network(x), dim=1))  # T = 1.5 forgotten
    record = onnx_export(folder, toy_dataset("multiclass").test)
    assert not record["ok"] and record["max_abs_difference"] > TOLERANCE and not (folder / ONNX_FILE).exists()
    assert "DOES NOT MATCH" in analysis.onnx_model.onnx_text(record)


def test_without_the_export_extra_onnx_is_skipped_and_runtime_onnx_says_how_to_install_it(tmp_path, without_the_export_extra):
    folder = hand_export(tmp_path / "export")
    (folder / ONNX_FILE).write_bytes(b"an earlier export's file")
    prep, decision = (json.loads((folder / f).read_text()) for f in ("preprocessing.json", "decision.json"))
    record = write_onnx(predict.load_model(folder), prep, decision, folder)
    assert record == {"skipped": f"onnxscript, onnxruntime not installed; {EXPORT_EXTRA} to write {ONNX_FILE}"}
    assert not (folder / ONNX_FILE).exists()  # a stale file never passes for this model
    paths = write_pngs(toy_dataset("multiclass").test.images[:2], tmp_path / "png")
    code, stdout, stderr = run_main(predict, "--model", folder, "--runtime", "onnx", *paths)
    assert code == 2 and stdout == "" and stderr.count("\n") == 1 and EXPORT_EXTRA in stderr
    assert run_main(predict, "--model", folder, *paths)[0] == 0  # the default runtime needs none of it


def test_runtime_onnx_on_an_export_without_model_onnx_is_one_line(tmp_path):
    folder = hand_export(tmp_path / "export")
    paths = write_pngs(toy_dataset("multiclass").test.images[:1], tmp_path / "png")
    code, stdout, stderr = run_main(predict, "--model", folder, "--runtime", "onnx", *paths)
    assert code == 2 and stdout == "" and stderr.count("\n") == 1
    assert f"{folder / ONNX_FILE} does not exist" in stderr and EXPORT_EXTRA in stderr

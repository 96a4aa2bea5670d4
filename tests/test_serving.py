"""The registered model served the way MLflow serves models: `analysis.export --register NAME` logs a pyfunc from
code under the alias `champion`, and `mlflow models serve -m models:/NAME@champion --env-manager local` answers a
real chest X-ray PNG, and a DICOM file of its pixels, sent over HTTP with what `analysis.predict` says of the PNG.

Reads the suite's shared search (tests/conftest.py). Cost: one export (about 15 s) and one model server (about
20 s to start: MLflow's server process, then torch and the model), both once for the module."""

from __future__ import annotations

import base64
import contextlib
import io
import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
from conftest import free_port, hide_the_export_extra, real_data
from PIL import Image
from test_image_files import dicom

from analysis import export
from analysis.predict import ExportedModel

pytestmark = [pytest.mark.integration, pytest.mark.filterwarnings("ignore::FutureWarning")]
NAME = "pneumonia-served"


@pytest.fixture(scope="module")
def registered(shared_search, tmp_path_factory):
    """The shared search's winner exported and registered as NAME (alias champion); MLflow's process-wide tracking
    URI is put back afterwards, so later child processes do not inherit it."""
    out = tmp_path_factory.mktemp("served") / "export"
    before = os.environ.get("MLFLOW_TRACKING_URI")
    stdout, stderr = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr), pytest.MonkeyPatch.context() as patch:
        hide_the_export_extra(patch)  # the served model reads model.json + safetensors: no ONNX needed here
        code = export.main(["--robustness-images", "32",
                            "--search", shared_search.parent.info.run_id, "--tracking-uri", shared_search.uri,
                            "--out", str(out), "--n-resamples", "20", "--ensemble", "1", "--register", NAME])
    mlflow.set_tracking_uri(before)
    assert code == 0, stdout.getvalue() + stderr.getvalue()
    assert f"models:/{NAME}@champion" in stdout.getvalue()
    return out, shared_search


@pytest.fixture(scope="module")
def chest_png():
    return sorted((real_data("nih_chestxray14_sample") / "images").glob("*.png"))[0]


@pytest.fixture
def chest_dicom(chest_png, tmp_path):
    """The same X-ray as a DICOM file (MONOCHROME2, 8 bits), as a PACS would send it."""
    return dicom(tmp_path / "chest.dcm", np.asarray(Image.open(chest_png).convert("L")))


def b64(path) -> str:
    return base64.b64encode(path.read_bytes()).decode()


def test_the_new_version_has_the_alias_and_its_search_s_tags(registered):
    out, search = registered
    version = search.client.get_model_version_by_alias(NAME, "champion")
    assert version.run_id == search.winner.info.run_id and version.tags["medtune.search"] == search.name


def test_the_registered_model_answers_base64_bytes_and_paths_as_predict_does(registered, chest_png):
    out, search = registered
    mlflow.set_tracking_uri(search.uri)
    try:
        served = mlflow.pyfunc.load_model(f"models:/{NAME}@champion")
    finally:
        mlflow.set_tracking_uri(os.environ.get("MLFLOW_TRACKING_URI"))
    answer = served.predict(pd.DataFrame({"image": [b64(chest_png), None], "path": [None, str(chest_png)]}))
    probs, labels = ExportedModel(out).predict([chest_png, chest_png])
    names = json.loads((out / "preprocessing.json").read_text())["class_names"]
    assert list(answer["label"]) == labels
    assert np.array_equal(answer[[f"probability_{n}" for n in names]].to_numpy(), probs)
    with pytest.raises(Exception, match="row 0 has no image"):
        served.predict(pd.DataFrame({"image": [""]}))


def test_mlflow_models_serve_classifies_a_png_and_a_dicom_file_over_http(registered, chest_png, chest_dicom):
    out, search = registered
    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "mlflow", "models", "serve", "-m", f"models:/{NAME}@champion",
                               "--env-manager", "local", "-p", str(port), "-h", "127.0.0.1"],
                              env={**os.environ, "MLFLOW_TRACKING_URI": search.uri,  # uvicorn as an active venv has it
                                   "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"},
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=2) as reply:
                    if reply.status == 200:
                        break
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            assert server.poll() is None and time.monotonic() < deadline, server.stderr.read().decode()[-2000:]
            time.sleep(0.5)
        request = urllib.request.Request(
            f"http://127.0.0.1:{port}/invocations", headers={"Content-Type": "application/json"},
            data=json.dumps({"dataframe_records": [{"image": b64(chest_png)}, {"image": b64(chest_dicom)}]}).encode())
        with urllib.request.urlopen(request, timeout=60) as reply:
            answers = json.loads(reply.read())["predictions"]
    finally:
        if server.poll() is None:  # one that failed to start has ended already
            os.killpg(server.pid, 15)
        server.wait(timeout=30)
    probs, labels = ExportedModel(out).predict([chest_png])
    names = json.loads((out / "preprocessing.json").read_text())["class_names"]
    # The server's torch runs with its own thread count, so float32 sums may round differently (seen: 6e-8);
    # 1e-6 is far below any change a wrong preprocessing, temperature or model would make.
    for answer in answers:  # the PNG, and the DICOM of its pixels: what analysis.predict says of the PNG
        assert answer["label"] == labels[0]
        assert np.allclose([answer[f"probability_{n}"] for n in names], probs[0], rtol=0, atol=1e-6)

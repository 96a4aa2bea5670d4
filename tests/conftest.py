"""Shared fixtures: tiny in-memory datasets, and the real data (a failure under CI when missing)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from trainables.data.datasets import Dataset, ImageSet

REPO = Path(__file__).resolve().parents[1]
TEST_DATA = Path(os.environ.get("MEDTUNE_TEST_DATA", REPO.parent / "shared" / "data"))


def real_data(relative: str) -> Path:
    """Path of a real dataset under the shared data folder; missing data fails under CI, skips elsewhere."""
    path = TEST_DATA / relative
    if relative.endswith(".npz") and os.environ.get("MEDTUNE_DATA_ROOT"):
        path = Path(os.environ["MEDTUNE_DATA_ROOT"]) / Path(relative).name
    if not path.exists():
        message = f"real data {path} is missing (set MEDTUNE_TEST_DATA / MEDTUNE_DATA_ROOT)"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
    return path


@pytest.fixture(scope="session")
def medmnist_root() -> Path:
    return real_data("medmnist/pneumoniamnist.npz").parent


def toy_images(labels: np.ndarray, size: int = 16, channels: int = 1, seed: int = 0) -> np.ndarray:
    """Noise images where every positive label lights up its own quadrant: learnable in a few steps."""
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 60, size=(len(labels), size, size, channels), dtype=np.uint8)
    half = size // 2
    corners = [(0, 0), (0, half), (half, 0), (half, half)]
    onehot = labels if labels.ndim == 2 else np.eye(labels.max() + 1, dtype=np.uint8)[labels]
    for row, positives in enumerate(onehot):
        for label in np.flatnonzero(positives):
            if label == 0 and labels.ndim == 1:
                continue
            y, x = corners[label % 4]
            images[row, y:y + half, x:x + half] = 200
    return images


def toy_dataset(task: str = "binary", n_dev: int = 160, n_test: int = 60, seed: int = 0, groups: bool = False) -> Dataset:
    rng = np.random.default_rng(seed)

    def labels(n):
        if task == "multilabel":
            return (rng.random((n, 3)) < 0.3).astype(np.uint8)
        return rng.integers(0, 2 if task == "binary" else 3, size=n).astype(np.int64)

    dev_labels, test_labels = labels(n_dev), labels(n_test)
    dev_groups = np.repeat(np.arange(n_dev // 4), 4) if groups else None
    names = {"binary": ("normal", "abnormal"), "multiclass": ("a", "b", "c"), "multilabel": ("x", "y", "z")}[task]
    official_val = np.zeros(n_dev, bool)
    official_val[-n_dev // 5:] = True
    return Dataset(f"toy_{task}", task, names, ImageSet(toy_images(dev_labels, seed=seed), dev_labels, dev_groups),
                   ImageSet(toy_images(test_labels, seed=seed + 1), test_labels), None if groups else official_val)


@pytest.fixture
def toy():
    return toy_dataset


# --- one real search, shared by every test that only reads its results ----------------------------------

# Minimises validation loss (a min-mode search end to end); one lr diverges (a trial that fails alone);
# ASHA stops some trials; asks for a GPU that this machine lacks (the fallback, and the state keeping the ask).
SHARED_SPACE = """\
description: the test suite's shared real search
dataset: pneumoniamnist
metric: val_loss
mode: min
num_samples: 6
max_concurrent: 2
max_failures: 0
scheduler: {max_t: 2, grace_period: 1, reduction_factor: 2}
resources: {cpu: 1, gpu: 0.25}
fixed: {model: simple_cnn, batch_size: 256, optimizer: sgd, schedule: constant}
params:
  lr: {choice: [1.0e+30, 0.3, 0.1, 0.03, 0.01]}
  split_ratio: {choice: [0.8, 0.9]}
# Tried in this order, so ASHA's decisions do not hang on which trial TPE draws first: rising learning rates
# beat the running median at the rung (epoch 1) and finish; the late slow one falls below it and is stopped; the last diverges.
points_to_evaluate:
  - {lr: 0.01, split_ratio: 0.8}
  - {lr: 0.03, split_ratio: 0.9}
  - {lr: 0.1, split_ratio: 0.8}
  - {lr: 0.3, split_ratio: 0.9}
  - {lr: 0.01, split_ratio: 0.9}
  - {lr: 1.0e+30, split_ratio: 0.8}
"""


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory):
    """A real MLflow tracking server over HTTP (artifacts proxied by the server), as teams run one."""
    import subprocess
    import sys
    import time
    import urllib.request

    folder = tmp_path_factory.mktemp("mlflow-server")
    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
         "--backend-store-uri", f"sqlite:///{folder / 'server.db'}", "--artifacts-destination",
         str(folder / "server-artifacts"), "--workers", "1"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 120
    while time.time() < deadline:
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2):
                break
        except OSError:
            time.sleep(0.5)
    else:
        server.kill()
        pytest.fail("mlflow server did not start")
    yield url
    server.terminate()
    server.wait(timeout=30)


@pytest.fixture(scope="session")
def shared_search(tmp_path_factory, medmnist_root, mlflow_server):
    """`python tune.py --ensemble 3 --tta` on SHARED_SPACE against the HTTP server named only by
    MLFLOW_TRACKING_URI (no flag)."""
    import subprocess
    import sys
    from types import SimpleNamespace

    import mlflow

    tmp = tmp_path_factory.mktemp("shared-search")
    (tmp / "shared.yaml").write_text(SHARED_SPACE)
    command = [sys.executable, str(REPO / "tune.py"), "--space", str(tmp / "shared.yaml"), "--name", "shared",
               "--seed", "1", "--storage", str(tmp / "results"), "--data-root", str(medmnist_root),
               "--ensemble", "3", "--tta"]
    result = subprocess.run(command, cwd=tmp, capture_output=True, text=True, timeout=900,
                            env={**os.environ, "MLFLOW_TRACKING_URI": mlflow_server})
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    client = mlflow.MlflowClient(mlflow_server)
    found = client.search_runs([client.get_experiment_by_name("medtune").experiment_id], max_results=1000)
    parent = next(r for r in found if r.data.tags.get("medtune.role") == "search"
                  and r.data.tags.get("medtune.search") == "shared")
    trials = [r for r in found if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    return SimpleNamespace(tmp=tmp, stdout=result.stdout, uri=mlflow_server, client=client, parent=parent,
                           trials=trials, storage=tmp / "results", data_root=medmnist_root, name="shared",
                           winner=client.get_run(parent.data.tags["medtune.best_run_id"]))

"""Shared fixtures: tiny in-memory datasets, the real data (a failure under CI when missing), and the slow work
(real searches, servers) that the suite starts together before its first test and reads at its end."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from trainables.data.datasets import Dataset, ImageSet

REPO = Path(__file__).resolve().parents[1]
TEST_DATA = Path(os.environ.get("MEDTUNE_TEST_DATA", REPO.parent / "shared" / "data"))


def data_path(relative: str) -> Path:
    """Where a real dataset under the shared data folder is (MedMNIST files: under MEDTUNE_DATA_ROOT when set)."""
    if relative.endswith(".npz") and os.environ.get("MEDTUNE_DATA_ROOT"):
        return Path(os.environ["MEDTUNE_DATA_ROOT"]) / Path(relative).name
    return TEST_DATA / relative


def real_data(relative: str) -> Path:
    """Path of a real dataset under the shared data folder; missing data fails under CI, skips elsewhere."""
    path = data_path(relative)
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


def hide_the_export_extra(monkeypatch) -> None:
    """Make the ONNX packages of the `export` extra (onnxscript, onnxruntime) look uninstalled, as after
    `pip install -e .`: the export then skips model.onnx (and its cost, 1-15 s) and says so."""
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *args: None if name in ("onnxscript", "onnxruntime")
                        else real(name, *args))


@pytest.fixture
def without_the_export_extra(monkeypatch):
    hide_the_export_extra(monkeypatch)


# --- slow work started together: the real searches and servers -------------------------------------------

BACKGROUND: dict[str, Callable] = {}  # fixture name -> its work, registered by `background_job`
RAY_SLOTS = 3  # background searches at once: each starts Ray, so more would only queue for the 2 cores


def background_job(needs_data: bool = True, ray: bool = True):
    """Turn `work(started: Background, folder: Path) -> value` into a session fixture of the same name whose
    value is computed in a thread started before the first test (see `started`). Work in a thread runs
    processes only (`started.run`/`started.popen`), never project code in-process: the tests in the main thread
    monkeypatch it. `needs_data`: the fixture skips (fails under CI) without the MedMNIST data, as
    `medmnist_root` does; `ray`: the work starts Ray, so it takes one of RAY_SLOTS."""
    def register(work: Callable) -> Callable:
        BACKGROUND[work.__name__] = work
        work.needs_data, work.ray = needs_data, ray

        @pytest.fixture(scope="session", name=work.__name__)
        def fixture(request, started):
            if needs_data:
                request.getfixturevalue("medmnist_root")
            return started.result(work.__name__)

        fixture.__doc__ = work.__doc__
        return fixture

    return register


class Background:
    """Threads running the registered work the selected tests need; `result(name)` waits for one."""

    def __init__(self, tmp_path_factory, data_root: Path):
        self.data_root, self.env = data_root, dict(os.environ)  # as the session started: tests change os.environ
        self._factory, self._lock, self._procs, self._futures = tmp_path_factory, threading.Lock(), [], {}
        self._pools = {True: ThreadPoolExecutor(RAY_SLOTS, "ray-job"), False: ThreadPoolExecutor(4, "job")}

    def start(self, name: str) -> None:
        if name != "mlflow_template":
            self.start("mlflow_template")  # first: others wait for it, and must not hold every thread meanwhile
        with self._lock:
            if name not in self._futures:
                work = BACKGROUND[name]
                self._futures[name] = self._pools[work.ray].submit(work, self, self._factory.mktemp(name))

    def result(self, name: str):
        self.start(name)
        return self._futures[name].result()

    def popen(self, command, **kwargs) -> subprocess.Popen:
        """A process in a session of its own, ended with everything it started if the suite ends first."""
        proc = subprocess.Popen(command, start_new_session=True, **{"env": self.env, **kwargs})
        self._procs.append(proc)
        return proc

    def run(self, command, timeout: float, **kwargs) -> subprocess.CompletedProcess:
        """`subprocess.run(command, capture_output=True, text=True)` through `popen`."""
        proc = self.popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kwargs)
        try:
            stdout, stderr = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            stdout, stderr = proc.communicate()
            stderr += f"\n(killed after {timeout} s)"
        return subprocess.CompletedProcess(command, proc.returncode, stdout, stderr)

    def stop(self) -> None:
        """Wait for the work under way (a failed run with -x ends it: its processes are killed first)."""
        for pool in self._pools.values():
            pool.shutdown(wait=False, cancel_futures=True)
        for proc in self._procs:
            if proc.poll() is None:
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        for pool in self._pools.values():
            pool.shutdown(wait=True)


@pytest.fixture(scope="session", autouse=True)
def started(request, tmp_path_factory):
    """Starts, before the first test, the background work (`background_job`) that the selected tests read:
    the real searches then run beside each other and beside the quick tests, which run first (see
    `pytest_collection_modifyitems`). `-m "not integration"` selects none of the searches, so none starts."""
    background = Background(tmp_path_factory, data_path("medmnist/pneumoniamnist.npz").parent)
    has_data = (background.data_root / "pneumoniamnist.npz").exists()
    wanted = {name for item in request.session.items for name in item.fixturenames if name in BACKGROUND}
    for name in sorted(wanted, key=list(BACKGROUND).index):  # in the order they were registered
        if has_data or not BACKGROUND[name].needs_data:
            background.start(name)
    yield background
    background.stop()


@pytest.hookimpl(trylast=True)  # after -m/-k have deselected
def pytest_collection_modifyitems(items):
    """The tests that wait for background work run last, so the quick ones run while it is under way."""
    items.sort(key=lambda item: any(name in BACKGROUND for name in item.fixturenames))


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


# Two tiny trials that both train to the end, 2 epochs each at once: the search the fault tests (an MLflow outage,
# a full disk, a preemption) interrupt and resume.
TWO_TINY_TRIALS = """\
description: two tiny trials that both train to the end
dataset: pneumoniamnist
num_samples: 2
max_concurrent: 2
max_failures: 0
scheduler: {kind: fifo, max_t: 2}
resources: {cpu: 1}
fixed: {model: simple_cnn, batch_size: 256, optimizer: sgd, schedule: constant}
params:
  lr: {choice: [0.03, 0.1]}
points_to_evaluate: [{lr: 0.03}, {lr: 0.1}]
"""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@background_job(needs_data=False, ray=False)
def mlflow_template(started: Background, folder: Path) -> Path:
    """An empty MLflow SQLite store with every table built: MLflow builds one with some 60 migrations, seconds of
    CPU each time, so stores are copies of this one (`new_mlflow_store`). Cost: one process, about 10 s."""
    db = folder / "mlflow.db"
    done = started.run([sys.executable, "-c", f"import mlflow; mlflow.MlflowClient({f'sqlite:///{db}'!r}).search_experiments()"],
                       timeout=300)
    if done.returncode != 0:
        raise RuntimeError(f"could not build an MLflow store: {done.stderr[-3000:]}")
    return db


def new_mlflow_store(started: Background, db: Path) -> str:
    """The URI of a fresh, empty SQLite MLflow store at `db` (a copy of `mlflow_template`)."""
    shutil.copyfile(started.result("mlflow_template"), db)
    return f"sqlite:///{db}"


@pytest.fixture(scope="session")
def mlflow_store(started, mlflow_template) -> Callable[[Path], str]:
    """`mlflow_store(folder)`: the URI of a fresh, empty SQLite MLflow store in `folder`, in milliseconds."""
    return lambda folder: new_mlflow_store(started, Path(folder) / "mlflow.db")


# MLflow 3's server-side job runner (8 more processes, each importing MLflow) serves features medtune never calls
NO_SERVER_JOBS = {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}


class MlflowServer:
    """A real MLflow tracking server over HTTP (a SQLite store, artifacts proxied by the server), as teams run one,
    on a port of its own; it lives until `stop` or the session's end. A test may stop it and start it again on the
    same store (a pod restarted), or pause and resume it (a hung server)."""

    def __init__(self, started: Background, folder: Path):
        self.started, self.folder, self.port = started, folder, free_port()
        self.url, self.process = f"http://127.0.0.1:{self.port}", None
        folder.mkdir(parents=True, exist_ok=True)
        new_mlflow_store(started, folder / "server.db")

    def start(self) -> MlflowServer:
        self.process = self.started.popen(
            [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(self.port),
             "--backend-store-uri", f"sqlite:///{self.folder / 'server.db'}", "--artifacts-destination",
             str(self.folder / "server-artifacts"), "--workers", "1"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env={**self.started.env, **NO_SERVER_JOBS})
        deadline = time.time() + 180
        while self.process.poll() is None and time.time() < deadline:
            try:
                with urllib.request.urlopen(f"{self.url}/health", timeout=2):
                    return self
            except OSError:
                time.sleep(0.5)
        raise RuntimeError(f"mlflow server did not start (exit code {self.process.poll()})")

    def pause(self) -> None:
        """Stop its processes where they are (SIGSTOP): connections are accepted and never answered, as a hung
        server or a stalled proxy does."""
        os.killpg(self.process.pid, signal.SIGSTOP)

    def resume(self) -> None:
        os.killpg(self.process.pid, signal.SIGCONT)

    def stop(self) -> None:
        """End the server and its workers (a session of their own: `Background.popen`)."""
        os.killpg(self.process.pid, signal.SIGCONT)  # a paused server ends too
        os.killpg(self.process.pid, signal.SIGTERM)
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()


def start_mlflow_server(started: Background, folder: Path) -> str:
    """A real MLflow tracking server that lives until the session ends. Returns its URL."""
    return MlflowServer(started, folder).start().url


@background_job()
def shared_search_run(started: Background, tmp: Path) -> SimpleNamespace:
    """`python tune.py --ensemble 3 --tta` on SHARED_SPACE against an MLflow server named only by
    MLFLOW_TRACKING_URI (no flag). Cost: the server and a 6-trial search, about 2 minutes on 2 quiet cores."""
    uri = start_mlflow_server(started, tmp)
    (tmp / "shared.yaml").write_text(SHARED_SPACE)
    command = [sys.executable, str(REPO / "tune.py"), "--space", str(tmp / "shared.yaml"), "--name", "shared",
               "--seed", "1", "--storage", str(tmp / "results"), "--data-root", str(started.data_root),
               "--ensemble", "3", "--tta"]
    result = started.run(command, cwd=tmp, timeout=900, env={**started.env, "MLFLOW_TRACKING_URI": uri})
    return SimpleNamespace(tmp=tmp, uri=uri, result=result)


@pytest.fixture(scope="session")
def shared_search(shared_search_run, medmnist_root):
    """The shared search's output, its MLflow runs (parent, trials, winner) and its folders."""
    import mlflow

    tmp, uri, result = shared_search_run.tmp, shared_search_run.uri, shared_search_run.result
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    client = mlflow.MlflowClient(uri)
    found = client.search_runs([client.get_experiment_by_name("medtune").experiment_id], max_results=1000)
    parent = next(r for r in found if r.data.tags.get("medtune.role") == "search"
                  and r.data.tags.get("medtune.search") == "shared")
    trials = [r for r in found if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    return SimpleNamespace(tmp=tmp, stdout=result.stdout, uri=uri, client=client, parent=parent,
                           trials=trials, storage=tmp / "results", data_root=medmnist_root, name="shared",
                           winner=client.get_run(parent.data.tags["medtune.best_run_id"]))

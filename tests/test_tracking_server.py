"""A search against a real MLflow tracking server over HTTP (artifacts proxied by the server)."""

import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import mlflow
import pytest

from test_search import TINY, tune_cmd

pytestmark = pytest.mark.integration
REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def mlflow_server(tmp_path):
    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
         "--backend-store-uri", f"sqlite:///{tmp_path / 'server.db'}", "--artifacts-destination",
         str(tmp_path / "server-artifacts"), "--workers", "1"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 90
    while time.time() < deadline:
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2):
                break
        except OSError:
            time.sleep(1)
    else:
        server.kill()
        pytest.fail("mlflow server did not start")
    yield url
    server.terminate()
    server.wait(timeout=30)


def test_search_logs_runs_metrics_and_artifacts_to_a_remote_server(tmp_path, mlflow_server, medmnist_root):
    space = tmp_path / "remote.yaml"
    space.write_text(TINY.format(num_samples=2, lr="{loguniform: [1.0e-2, 0.1]}").replace("max_t: 3", "max_t: 2"))
    command = tune_cmd(tmp_path, medmnist_root, "--space", str(space), "--name", "remote")
    command[command.index("--tracking-uri") + 1] = mlflow_server
    result = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    assert not (tmp_path / "mlflow.db").exists()  # nothing went to a local store

    client = mlflow.MlflowClient(mlflow_server)
    experiment = client.get_experiment_by_name("medtune")
    found = client.search_runs([experiment.experiment_id])
    parent = next(r for r in found if r.data.tags.get("medtune.role") == "search")
    children = [r for r in found if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert len(children) == 2 and parent.data.tags["medtune.best_run_id"] in {c.info.run_id for c in children}
    best = client.get_run(parent.data.tags["medtune.best_run_id"])
    assert [m.step for m in client.get_metric_history(best.info.run_id, "val_auc")] == [1, 2]
    assert "test_auc" in best.data.metrics
    artifacts = {a.path for a in client.list_artifacts(best.info.run_id)}
    assert {"confusion_matrix.png", "roc_curve.png"} <= artifacts
    local = client.download_artifacts(best.info.run_id, "roc_curve.png", str(tmp_path))
    assert Path(local).read_bytes()[:4] == b"\x89PNG"

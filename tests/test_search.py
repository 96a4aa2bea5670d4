"""End to end: real searches on PneumoniaMNIST through tune.py, Ray Tune and MLflow (sqlite)."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import pytest

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.integration

TINY = """\
description: tiny real search for the tests
dataset: pneumoniamnist
num_samples: {num_samples}
max_concurrent: 2
max_failures: 0
scheduler: {{max_t: 3, grace_period: 1, reduction_factor: 2}}
resources: {{cpu: 1}}
fixed: {{model: simple_cnn, batch_size: 256, optimizer: sgd, schedule: constant}}
params:
  lr: {lr}
"""


def tune_cmd(tmp: Path, data_root: Path, *args: str) -> list[str]:
    return [sys.executable, str(REPO / "tune.py"), "--storage", str(tmp / "results"), "--data-root", str(data_root),
            "--tracking-uri", f"sqlite:///{tmp / 'mlflow.db'}", *args]


def runs(tmp: Path):
    client = mlflow.MlflowClient(f"sqlite:///{tmp / 'mlflow.db'}")
    found = client.search_runs([e.experiment_id for e in client.search_experiments()], max_results=1000)
    parents = [r for r in found if r.data.tags.get("medtune.role") == "search"]
    children = [r for r in found if r.data.tags.get("medtune.role") == "trial"]
    return client, parents, children


@pytest.fixture(scope="module")
def finished_search(tmp_path_factory, medmnist_root):
    tmp = tmp_path_factory.mktemp("search")
    space = tmp / "tiny.yaml"
    space.write_text(TINY.format(num_samples=6, lr="{choice: [1.0e+30, 0.3, 0.1, 0.03, 0.01]}"))
    result = subprocess.run(tune_cmd(tmp, medmnist_root, "--space", str(space), "--name", "tiny", "--seed", "1"),
                            cwd=tmp, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return tmp, result.stdout


def test_search_prints_the_best_config_and_its_test_metrics(finished_search):
    _, stdout = finished_search
    assert "best config:" in stdout and '"test_auc"' in stdout.split("best test metrics:")[1]


def test_one_parent_and_one_nested_run_per_trial(finished_search):
    tmp, _ = finished_search
    client, parents, children = runs(tmp)
    assert len(parents) == 1 and len(children) == 6
    parent = parents[0]
    assert all(c.data.tags["mlflow.parentRunId"] == parent.info.run_id for c in children)
    assert {r.info.status for r in parents + children} <= {"FINISHED", "FAILED"}
    assert parent.data.tags["medtune.space"] == "tiny"
    assert {"search_space.yaml", "leak_report.json"} <= {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert parent.data.metrics["leak_dup_images"] == 27  # PneumoniaMNIST's known duplicates across its splits


def test_completed_trials_hold_curves_test_metrics_and_plots(finished_search):
    tmp, _ = finished_search
    client, parents, children = runs(tmp)
    completed = [c for c in children if c.data.tags.get("medtune.outcome") == "completed"]
    assert completed
    for run in completed:
        history = client.get_metric_history(run.info.run_id, "val_auc")
        assert [m.step for m in history] == [1, 2, 3]
        assert "test_auc" in run.data.metrics and "lr" in run.data.params
        artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
        assert {"confusion_matrix.png", "roc_curve.png", "learning_curves.png", "classification_report.json"} <= artifacts
        assert Path(run.data.tags["medtune.checkpoint"], "checkpoint.pt").exists()


def test_parent_names_the_best_trial_by_validation(finished_search):
    tmp, _ = finished_search
    client, parents, children = runs(tmp)
    best_id = parents[0].data.tags["medtune.best_run_id"]
    best = next(c for c in children if c.info.run_id == best_id)
    assert best.data.tags["medtune.best_trial"] == "true"
    completed = [c for c in children if c.data.tags.get("medtune.outcome") == "completed"]
    assert best.data.metrics["best_val_auc"] == max(c.data.metrics["best_val_auc"] for c in completed)
    assert parents[0].data.metrics["test_auc"] == best.data.metrics["test_auc"]


def test_nan_trial_fails_alone_asha_stops_some_and_trials_overlap(finished_search):
    tmp, stdout = finished_search
    _, _, children = runs(tmp)
    failed = [c for c in children if c.info.status == "FAILED"]
    assert failed and all(float(c.data.params["lr"]) == 1e30 for c in failed)
    assert "Non-finite loss" in failed[0].data.tags["medtune.error"]
    assert any(c.data.tags.get("medtune.outcome") == "stopped_early" for c in children)
    assert sum(c.data.tags.get("medtune.outcome") == "completed" for c in children) >= 1
    spans = sorted((c.info.start_time, c.info.end_time) for c in children)
    assert any(later[0] < earlier[1] for earlier, later in zip(spans, spans[1:])), "no two trials ran at once"


def test_sigkilled_search_resumes_without_repeating_a_config(tmp_path, medmnist_root):
    space = tmp_path / "resumable.yaml"
    space.write_text(TINY.format(num_samples=5, lr="{loguniform: [1.0e-3, 0.3]}"))
    driver = subprocess.Popen(tune_cmd(tmp_path, medmnist_root, "--space", str(space), "--name", "resumable"), cwd=tmp_path,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    deadline, seen = time.time() + 300, []
    for line in driver.stdout:
        seen.append(line)
        if "completed" in line or "stopped early" in line or time.time() > deadline:
            break
    time.sleep(2)  # let a second trial get going, then pull the plug on the driver and its Ray processes
    os.killpg(driver.pid, signal.SIGKILL)
    driver.wait()
    assert any("completed" in line or "stopped early" in line for line in seen), "".join(seen)[-3000:]

    resumed = subprocess.run(tune_cmd(tmp_path, medmnist_root, "--resume", "resumable"), cwd=tmp_path, capture_output=True,
                             text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert "5 trials:" in resumed.stdout
    _, parents, children = runs(tmp_path)
    trial_ids = [c.data.tags["medtune.trial_id"] for c in children]
    lrs = [c.data.params["lr"] for c in children if c.info.status != "KILLED"]
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    assert len(set(trial_ids)) == len(trial_ids), "a trial appears twice in MLflow"
    assert len(lrs) == 5 and len(set(lrs)) == 5, "a config was evaluated twice"
    assert all(c.info.status != "RUNNING" for c in children)


def test_resnetd_depth_space_runs_end_to_end(tmp_path, medmnist_root):
    """The shipped study space as shipped (GPU request falls back to CPU), on BreastMNIST to stay fast."""
    result = subprocess.run(tune_cmd(tmp_path, medmnist_root, "--space", "resnetd_depth", "--max-epochs", "1",
                                     "--num-samples", "2", "--dataset", "breastmnist", "--name", "depth"),
                            cwd=tmp_path, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "2 trials: 2 completed" in result.stdout and "no GPU in the Ray cluster" in result.stdout
    _, _, children = runs(tmp_path)
    assert len(children) == 2 and all(c.data.params["model"].startswith("resnet") for c in children)
    assert all(c.data.params["model"].endswith("d") and "test_auc" in c.data.metrics for c in children)

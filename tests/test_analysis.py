"""After the search: pick, report, export, register and use the winner of a real tiny search (PneumoniaMNIST)."""

import argparse
import contextlib
import dataclasses
import io
import json
import subprocess
import sys
from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch
from scipy import stats
from sklearn.metrics import roc_auc_score

import analysis.export
import analysis.replay
from analysis import best, export, predict, report
from analysis.bootstrap import bootstrap_ci, metrics_with_ci
from analysis.calibration import choose_threshold, expected_calibration_error, fit_temperature, nll
from conftest import real_data
from trainables.datasets import ImageSet, load_dataset
from trainables.metrics import classification_metrics, probabilities
from trainables.splits import train_val_indices
from trainables.train import eval_loader, predict_logits

REPO = Path(__file__).resolve().parents[1]
integration = pytest.mark.integration  # trains a real tiny search on PneumoniaMNIST (module fixture)
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated:FutureWarning")

# Every trial trains to the end (grace_period = max_t), so there are 3 completed trials to compare.
TINY = """\
description: tiny real search for the analysis tests
dataset: pneumoniamnist
num_samples: 3
max_concurrent: 2
max_failures: 0
scheduler: {max_t: 2, grace_period: 2, reduction_factor: 2}
resources: {cpu: 1}
fixed: {model: simple_cnn, batch_size: 256, optimizer: sgd, schedule: constant}
params:
  lr: {choice: [0.3, 0.1, 0.03]}
  split_ratio: {choice: [0.8, 0.9]}
"""


def run_main(module, *argv) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = module.main([str(a) for a in argv])
    return code, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def search(tmp_path_factory, medmnist_root):
    tmp = tmp_path_factory.mktemp("analysis")
    (tmp / "tiny.yaml").write_text(TINY)
    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    result = subprocess.run([sys.executable, str(REPO / "tune.py"), "--space", str(tmp / "tiny.yaml"), "--name", "tiny",
                             "--seed", "1", "--storage", str(tmp / "results"), "--data-root", str(medmnist_root),
                             "--tracking-uri", uri], cwd=tmp, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    client = mlflow.MlflowClient(uri)
    parent = client.search_runs([client.get_experiment_by_name("medtune").experiment_id],
                                "tags.`medtune.role` = 'search'")[0]
    return argparse.Namespace(tmp=tmp, uri=uri, client=client, parent=parent, data_root=medmnist_root,
                              winner=client.get_run(parent.data.tags["medtune.best_run_id"]))


@pytest.fixture(scope="module")
def exported(search):
    out = search.tmp / "export"
    code, stdout, stderr = run_main(export, "--search", "tiny", "--tracking-uri", search.uri, "--out", out,
                                    "--n-resamples", 200)
    assert code == 0, stdout + stderr
    return out, stdout


# --- export ----------------------------------------------------------------------------------------

@integration
def test_export_writes_weights_torchscript_preprocessing_decision_and_card(exported):
    out, stdout = exported
    assert all((out / name).exists() for name in export.FILES)
    prep = json.loads((out / "preprocessing.json").read_text())
    assert prep | {"task": "binary", "class_names": ["normal", "pneumonia"], "image_size": 28, "channels": 1,
                   "mean": [0.5], "std": [0.5]} == prep
    decision = json.loads((out / "decision.json").read_text())
    assert 0 < decision["threshold"] <= 1 and decision["temperature"] > 0 and "Youden" in decision["threshold_rule"]
    card = (out / "model_card.md").read_text()
    for section in ("## Data and splits", "## Test metrics", "## Decision threshold", "## Calibration",
                    "## Confusion matrices", "## Intended use and limits", "ECE before"):
        assert section in card
    assert "[" in card.split("## Test metrics")[1] and "(equal)" in card
    from safetensors.torch import load_file

    weights = load_file(out / "model.safetensors")
    assert weights and all(t.dtype == torch.float32 for t in weights.values())
    assert "reproduces the logged test metrics" in stdout and "MISMATCH" not in stdout


@integration
def test_torchscript_reproduces_the_logged_test_metrics(search, exported):
    out, _ = exported
    module = torch.jit.load(str(out / "model.ts"))
    test = load_dataset("pneumoniamnist", image_size=28, data_root=str(search.data_root)).test
    logits, labels = predict_logits(module, eval_loader(test, 512, torch.device("cpu")), torch.device("cpu"))
    metrics = classification_metrics("binary", labels, probabilities("binary", logits))
    assert metrics["acc"] == search.winner.data.metrics["test_acc"]
    assert abs(metrics["auc"] - search.winner.data.metrics["test_auc"]) <= 1e-6


@integration
def test_threshold_and_temperature_are_fitted_on_validation_only(search, exported, monkeypatch, tmp_path):
    """The fit receives exactly the winner's validation split; scrambling the test split changes nothing."""
    real = load_dataset("pneumoniamnist", image_size=28, data_root=str(search.data_root))
    rng = np.random.default_rng(0)
    scrambled = dataclasses.replace(real, test=ImageSet(real.test.images[::-1].copy(), rng.permutation(real.test.labels)))
    monkeypatch.setattr(analysis.replay, "load_dataset", lambda *a, **k: scrambled)
    seen = []

    def spy(val_logits, val_labels, *args, **kwargs):
        seen.append(val_labels.copy())
        return fit_decision(val_logits, val_labels, *args, **kwargs)

    fit_decision = analysis.export.fit_decision
    monkeypatch.setattr(analysis.export, "fit_decision", spy)
    code, stdout, stderr = run_main(export, "--search", "tiny", "--tracking-uri", search.uri, "--out", tmp_path,
                                    "--n-resamples", 50)
    assert code == 1 and "does not reproduce" in stderr  # the test labels were scrambled, so test scores moved...
    config = json.loads((exported[0] / "config.json").read_text())
    _, val_index = train_val_indices(real, config["split_ratio"], config["seed"])
    assert len(seen) == 1 and np.array_equal(seen[0], real.dev.labels[val_index])
    # ...but the threshold and the temperature did not move at all
    assert json.loads((tmp_path / "decision.json").read_text()) == json.loads((exported[0] / "decision.json").read_text())


@integration
def test_register_puts_a_model_version_in_the_registry(search, tmp_path):
    code, stdout, stderr = run_main(export, "--search", search.parent.info.run_id, "--tracking-uri", search.uri,
                                    "--out", tmp_path, "--n-resamples", 20, "--target-sensitivity", "0.95",
                                    "--register", "pneumonia-cnn")
    assert code == 0, stdout + stderr
    versions = search.client.search_model_versions("name='pneumonia-cnn'")
    assert len(versions) == 1 and versions[0].run_id == search.winner.info.run_id
    assert versions[0].tags["medtune.search"] == "tiny"
    mlflow.set_tracking_uri(search.uri)
    module = mlflow.pytorch.load_model("models:/pneumonia-cnn/1")
    assert module(torch.zeros(2, 1, 28, 28)).shape == (2, 2)
    decision = json.loads((tmp_path / "decision.json").read_text())
    assert "sensitivity >= 0.95" in decision["threshold_rule"]


# --- user errors: one line, exit 2 -------------------------------------------------------------------

@integration
def test_a_checkpoint_that_is_not_ours_is_refused_with_one_line(search, tmp_path):
    torch.save({"weights": torch.zeros(2), "args": argparse.Namespace(lr=1)}, tmp_path / "checkpoint.pt")
    code, stdout, stderr = run_main(export, "--search", "tiny", "--tracking-uri", search.uri, "--out", tmp_path / "x",
                                    "--checkpoint", tmp_path)
    assert code == 2 and stderr.count("\n") == 1 and stderr.startswith("error: ") and "not a medtune checkpoint" in stderr
    torch.save({"model": {}}, tmp_path / "checkpoint.pt")  # loadable, but no medtune format marker
    code, _, stderr = run_main(export, "--search", "tiny", "--tracking-uri", search.uri, "--out", tmp_path / "x",
                               "--checkpoint", tmp_path)
    assert code == 2 and "format medtune-checkpoint-v1 expected" in stderr and stderr.count("\n") == 1


@integration
def test_missing_checkpoint_and_unfinished_search_are_one_line_each(search, tmp_path):
    code, _, stderr = run_main(export, "--search", "tiny", "--tracking-uri", search.uri, "--out", tmp_path,
                               "--checkpoint", tmp_path / "gone")
    assert code == 2 and stderr.startswith("error: No checkpoint at") and stderr.count("\n") == 1
    experiment = search.parent.info.experiment_id
    search.client.create_run(experiment, run_name="unfinished", tags={"medtune.role": "search", "medtune.search": "unfinished"})
    for module in (export, best, report):
        code, _, stderr = run_main(module, "--search", "unfinished", "--tracking-uri", search.uri, "--out", tmp_path) \
            if module is not best else run_main(module, "--search", "unfinished", "--tracking-uri", search.uri)
        assert code == 2 and "'unfinished' has no" in stderr and "tune.py --resume unfinished" in stderr, stderr


@integration
@pytest.mark.parametrize("module", [export, best, report])
def test_unknown_search_is_one_line_naming_the_fix(search, tmp_path, module):
    extra = ["--out", tmp_path] if module is not best else []
    code, _, stderr = run_main(module, "--search", "no-such-search", "--tracking-uri", search.uri, *extra)
    assert code == 2 and stderr.count("\n") == 1 and "No search 'no-such-search'" in stderr and "--tracking-uri" in stderr


# --- predict ----------------------------------------------------------------------------------------

@integration
def test_predict_prints_label_and_probabilities_for_kermany_jpegs(exported, tmp_path):
    out, _ = exported
    images = sorted(real_data("chest_xray/test/NORMAL").glob("*.jpeg"))[:2] + \
        sorted(real_data("chest_xray/test/PNEUMONIA").glob("*.jpeg"))[:1]
    result = subprocess.run([sys.executable, "-m", "analysis.predict", "--model", str(out), *map(str, images)],
                            cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.strip().splitlines()
    assert len(lines) == 3
    for line, image in zip(lines, images):
        path, label, probs = line.split("\t")
        values = dict(item.split("=") for item in probs.split())
        assert path == str(image) and label in ("normal", "pneumonia") and set(values) == {"normal", "pneumonia"}
        assert abs(sum(map(float, values.values())) - 1) < 1e-3
    (tmp_path / "broken.jpeg").write_bytes(b"\xff\xd8 not really a jpeg")
    code, stdout, stderr = run_main(predict, "--model", out, str(images[0]), str(tmp_path / "broken.jpeg"))
    assert code == 2 and stdout == "" and stderr.count("\n") == 1 and "broken.jpeg" in stderr


# --- best and report ---------------------------------------------------------------------------------

@integration
def test_best_lists_top_trials_by_validation_with_test_cis(search):
    code, stdout, stderr = run_main(best, "--search", "tiny", "--tracking-uri", search.uri, "--n-resamples", 100)
    assert code == 0, stderr
    header, first, *rest = stdout.splitlines()[1:]
    assert "best_val_auc" in header and "test_auc" in header
    assert "*" in first and search.winner.data.tags["medtune.trial_id"] in first  # the winner ranks first
    assert first.count("[") >= 4 and f"{search.winner.data.metrics['test_acc']:.4f}" in first
    assert len(rest) == 2


@integration
def test_report_writes_tables_importance_and_plots_and_logs_them(search, tmp_path):
    code, stdout, stderr = run_main(report, "--search", "tiny", "--tracking-uri", search.uri, "--out", tmp_path)
    assert code == 0, stderr
    assert {"trials.csv", "tables.md", "importance.csv", "importance.png", "metric_vs_params.png"} <= \
        {p.name for p in tmp_path.iterdir()}
    tables = (tmp_path / "tables.md").read_text()
    assert "fANOVA" in tables and "test_acc by lr" in tables and "fANOVA importance for best_val_auc: lr" in stdout
    logged = {a.path for a in search.client.list_artifacts(search.parent.info.run_id, "report")}
    assert "report/tables.md" in logged and "report/metric_vs_params.png" in logged


# --- the statistics, on known cases ------------------------------------------------------------------

def test_bootstrap_ci_of_a_proportion_matches_the_normal_approximation():
    correct = np.r_[np.ones(800), np.zeros(200)]  # accuracy 0.8 on 1,000 cases
    low, high = bootstrap_ci(np.mean, correct, n_resamples=4000)
    half = stats.norm.ppf(0.975) * np.sqrt(0.8 * 0.2 / 1000)  # Wald interval: 0.8 +- 0.0248
    assert abs(low[0] - (0.8 - half)) < 0.004 and abs(high[0] - (0.8 + half)) < 0.004
    assert [float(v[0]) for v in bootstrap_ci(np.mean, np.ones(50), n_resamples=100)] == [1.0, 1.0]


def test_bootstrap_ci_of_auc_matches_hanley_mcneil_and_scipy():
    rng = np.random.default_rng(1)
    labels = rng.integers(0, 2, 600)
    score = np.clip(0.3 * labels + 0.7 * rng.random(600), 0, 1)
    probs = np.c_[1 - score, score]
    cis = metrics_with_ci("binary", labels, probs, n_resamples=1000)
    auc, n1, n0 = roc_auc_score(labels, score), labels.sum(), (1 - labels).sum()
    q1, q2 = auc / (2 - auc), 2 * auc ** 2 / (1 + auc)
    se = np.sqrt((auc * (1 - auc) + (n1 - 1) * (q1 - auc ** 2) + (n0 - 1) * (q2 - auc ** 2)) / (n1 * n0))
    assert cis["auc"]["value"] == auc and cis["acc"]["value"] == classification_metrics("binary", labels, probs)["acc"]
    assert abs(cis["auc"]["low"] - (auc - 1.96 * se)) < 0.01 and abs(cis["auc"]["high"] - (auc + 1.96 * se)) < 0.01
    direct = stats.bootstrap((np.arange(600),), lambda rows: roc_auc_score(labels[rows], score[rows]), paired=True,
                             vectorized=False, n_resamples=1000, method="percentile", rng=np.random.default_rng(0))
    assert np.isclose(cis["auc"]["low"], direct.confidence_interval.low)


def test_temperature_recovers_a_known_temperature_and_threshold_rules():
    rng = np.random.default_rng(0)
    true_logits = rng.normal(0, 2, (4000, 3))
    labels = np.array([rng.choice(3, p=p) for p in probabilities("multiclass", true_logits)])
    t = fit_temperature(true_logits * 2.5, labels, "multiclass")  # over-confident by 2.5x
    assert abs(t - 2.5) < 0.15 and nll(true_logits * 2.5, labels, "multiclass", t) < nll(true_logits * 2.5, labels, "multiclass")
    probs = probabilities("multiclass", true_logits)
    assert expected_calibration_error(labels, probs, "multiclass") < 0.03
    assert expected_calibration_error(labels, probabilities("multiclass", true_logits * 2.5), "multiclass") > 0.05
    y, p = np.array([0, 0, 0, 0, 1, 1, 1, 1]), np.array([0.1, 0.2, 0.6, 0.65, 0.4, 0.7, 0.8, 0.9])
    assert choose_threshold(y, p)[0] == 0.7  # Youden's J: sensitivity 3/4 + specificity 1 - 1 beats 1 + 1/2 - 1
    assert choose_threshold(y, p, target_sensitivity=1.0)[0] == 0.4

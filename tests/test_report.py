"""The search's page in MLflow (analysis.description) and the study report (analysis.report, analysis.views), on
searches logged by hand the way tune.py and its callback log them: per-epoch curves, outcomes, kept test predictions.
The shared real search's page and report are checked in tests/test_search.py."""

import argparse
import dataclasses
import json
import re
from types import SimpleNamespace

import matplotlib.pyplot as plt
import mlflow
import numpy as np
import pytest
from mlflow.utils.mlflow_tags import MLFLOW_RUN_NOTE
from mlflow.utils.validation import MAX_TAG_VAL_LENGTH
from ray.tune.schedulers import ASHAScheduler

from analysis import description, report, summary, views
from analysis.bootstrap import format_ci, metrics_with_ci
from trainables.tracking.mlflow_runs import flat_params, get_experiment_id, numeric_metrics
from trainables.tracking.names import PARENT, PREDICTIONS, TAG_BEST_RUN, TAG_ERROR, TAG_OUTCOME, TAG_ROLE, TAG_SEARCH, TAG_TRIAL
from trainables.tracking.resilient import ResilientClient
from trainables.training.figures import write_test_predictions

RESAMPLES = 200  # the page's default is 1000; the tests check the plumbing, not the interval's precision
SPACE = {"metric": "val_loss", "mode": "min", "scheduler": {"max_t": 3, "grace_period": 1, "reduction_factor": 2},
         "params": {"lr": {"loguniform": [1e-4, 0.3]}, "model": {"choice": ["cnn_a", "cnn_b"]}}}
LEAKS = {"leak_dup_images": 2, "leak_dup_copies": 4, "leak_dup_cross_split": 1, "leak_dup_train_val": 1,
         "leak_dup_train_test": 0, "leak_dup_val_test": 0, "leak_dup_label_conflicts": 0}


@pytest.fixture(scope="module")
def store(tmp_path_factory, mlflow_store) -> str:
    """One sqlite store for this module's searches."""
    return mlflow_store(tmp_path_factory.mktemp("report_store"))


def predictions_file(folder, seed: int, n: int = 120):
    """Binary test predictions that score an AUC well above chance."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, n)
    score = np.clip(0.35 * labels + 0.65 * rng.random(n), 0, 1).astype(np.float32)
    folder.mkdir()
    return write_test_predictions(folder, "binary", ["normal", "pneumonia"], labels, np.c_[1 - score, score])


def log_trial(client, experiment: str, parent: str, name: str, trial: dict) -> str:
    """A trial run as MLflowTrialCallback leaves it: params, one metric step per epoch, outcome, artefacts."""
    tags = {PARENT: parent, TAG_SEARCH: name, TAG_ROLE: "trial", TAG_TRIAL: trial["id"]}
    run = client.create_run(experiment, run_name=f"trial_{trial['id']}", tags=tags, start_time=trial.get("start")).info.run_id
    client.log_batch(run, params=flat_params(trial["params"]))
    losses = trial.get("losses", [])
    for epoch, loss in enumerate(losses, 1):
        metrics = {"epoch": epoch, "val_loss": loss, "best_val_loss": min(losses[:epoch]), "params_total": trial["cost"],
                   "flops_per_image": 40 * trial["cost"]}
        client.log_batch(run, metrics=numeric_metrics(metrics | (trial.get("test", {}) if epoch == 3 else {}), epoch))
    if trial.get("predictions"):
        client.log_artifact(run, str(trial["predictions"]))
    client.set_tag(run, TAG_OUTCOME, trial["outcome"])
    if trial["outcome"] == "failed":
        client.set_tag(run, TAG_ERROR, "FloatingPointError: Non-finite loss (nan) at step 1; lower lr or check the data")
    client.set_terminated(run, status="FAILED" if trial["outcome"] == "failed" else "FINISHED",
                          end_time=trial.get("start", 0) + 60_000 * max(len(losses), 1))
    return run


def log_search(uri: str, name: str, trials: list[dict], best: str | None, space: dict = SPACE) -> str:
    """A search's parent run with its space, leak report and trials; `best` names the winning trial id."""
    client = mlflow.MlflowClient(uri)
    experiment = get_experiment_id(client)
    parent = client.create_run(experiment, run_name=name, tags={TAG_SEARCH: name, TAG_ROLE: "search"}).info.run_id
    client.log_dict(parent, space, "search_space.yaml")
    client.log_dict(parent, {"sizes": {"train": 400, "val": 100, "test": 120}, "notes": [],
                             "duplicates": [["train:dev[1]", "val:dev[7]"]]}, "leak_report.json")
    client.log_batch(parent, metrics=numeric_metrics(LEAKS, 0), params=flat_params({"metric": "val_loss", "mode": "min"}))
    ids = {t["id"]: log_trial(client, experiment, parent, name, t) for t in trials}
    if best:
        client.set_tag(parent, TAG_BEST_RUN, ids[best])
    client.set_terminated(parent)
    return parent


@pytest.fixture(scope="module")
def search(store, tmp_path_factory):
    """Min mode on val_loss: two completed trials (b wins), one ASHA stopped at epoch 1 with a better loss than
    both (it cannot win: never tested), one failed."""
    tmp = tmp_path_factory.mktemp("hand")
    test = {"test_acc": 0.8, "test_auc": 0.85}
    trials = [
        {"id": "aaaa0001", "params": {"lr": 0.001, "model": "cnn_a"}, "losses": [0.6, 0.4, 0.3], "outcome": "completed",
         "cost": 20_000, "predictions": predictions_file(tmp / "a", 1), "test": test, "start": 1_000_000},
        {"id": "bbbb0002", "params": {"lr": 0.02, "model": "cnn_b"}, "losses": [0.5, 0.2, 0.25], "outcome": "completed",
         "cost": 2_000_000, "predictions": predictions_file(tmp / "b", 2), "test": test, "start": 1_060_000},
        {"id": "cccc0003", "params": {"lr": 0.2, "model": "cnn_a"}, "losses": [0.15], "outcome": "stopped_early",
         "cost": 20_000, "start": 1_120_000},
        {"id": "dddd0004", "params": {"lr": 0.3, "model": "cnn_b"}, "losses": [], "outcome": "failed", "cost": 20_000,
         "start": 1_180_000},
    ]
    parent = log_search(store, "hand", trials, best="bbbb0002")
    client = mlflow.MlflowClient(store)
    board = description.read_leaderboard(client, client.get_run(parent), n_resamples=RESAMPLES)
    description.write_description(client, parent, board)
    note = client.get_run(parent).data.tags[MLFLOW_RUN_NOTE]
    return argparse.Namespace(client=client, parent=parent, board=board, tmp=tmp, trials=trials, note=note,
                              text=note.replace(description.CELL_PAD, "").replace("**", ""))  # the tables' plain text


# --- ASHA's rungs and decisions, the Pareto front, readable axes: pure functions -------------------------

@pytest.mark.parametrize(("max_t", "grace", "factor"), [(3, 1, 2), (4, 1, 2), (8, 1, 2), (100, 1, 3), (20, 2, 4), (1, 1, 2)])
def test_asha_rungs_are_the_milestones_ray_compares_trials_at(max_t, grace, factor):
    scheduler = ASHAScheduler(time_attr="training_iteration", metric="m", mode="max", max_t=max_t,
                              grace_period=grace, reduction_factor=factor)
    ray_milestones = sorted(m for m, _ in scheduler._brackets[0]._rungs if m < max_t)
    assert views.asha_rungs(max_t, grace, factor) == ray_milestones


def test_rung_decisions_mark_where_a_trial_was_kept_and_where_asha_stopped_it():
    history = [(1, 0.5), (2, 0.4)]
    assert views.rung_decisions(history, "stopped_early", [1, 2]) == [(1, "kept"), (2, "stopped")]
    assert views.rung_decisions(history + [(3, 0.3)], "completed", [1, 2]) == [(1, "kept"), (2, "kept")]
    assert views.rung_decisions([], "failed", [1, 2]) == []
    assert views.decision_text([(1, "kept"), (2, "stopped")]) == "kept at epoch 1, stopped by ASHA at epoch 2"


def test_pareto_front_keeps_the_trials_nothing_beats_on_cost_and_score():
    costs, scores = [1.0, 2.0, 2.0, 3.0, 4.0], [0.70, 0.80, 0.75, 0.78, 0.90]
    assert views.pareto_front(costs, scores, "max") == [0, 1, 4]  # 2 is beaten by 1 at the same cost, 3 by 1
    assert views.pareto_front(costs, [1 - s for s in scores], "min") == [0, 1, 4]
    assert views.pareto_front([1.0, float("nan")], [0.5, 0.9], "max") == [0]


def test_best_so_far_follows_the_mode_and_skips_nan():
    assert views.best_so_far([0.3, float("nan"), 0.2, 0.4], "min") == [0.3, 0.3, 0.2, 0.2]
    assert views.best_so_far([0.3, 0.2, 0.4], "max") == [0.3, 0.3, 0.4]


@pytest.mark.parametrize("low_high", [(1e-4, 0.3), (0.011, 0.029), (2e4, 3e9)])
def test_log_axes_label_plain_numbers_without_overlap(low_high):
    fig, ax = plt.subplots(figsize=(2.4, 2))  # as narrow as a panel of metric_vs_params.png
    ax.scatter(np.geomspace(*low_high, 7), np.linspace(0, 1, 7))
    views.log_axis(ax, "x")
    views.declutter(fig)
    labels = [t.get_text() for t in ax.get_xticklabels() if t.get_visible() and t.get_text()]
    assert labels and views.overlapping_labels(fig) == []
    assert not any("$" in text or "times" in text for text in labels)  # 0.02, 2k, 1G: not 2x10^-2 mathtext
    plt.close(fig)


def test_overlapping_labels_finds_labels_that_collide():
    fig, ax = plt.subplots(figsize=(1.5, 1.5))
    ax.set_xticks(np.linspace(0, 1, 12), [f"label {i}" for i in range(12)])
    assert views.overlapping_labels(fig)
    views.declutter(fig)
    assert views.overlapping_labels(fig) == []
    plt.close(fig)


def test_compact_tick_labels():
    assert [views.compact(v) for v in (0, 0.0025, 0.25, 12, 3400, 1.2e6, 7.68e9, 1e30)] == \
        ["0", "0.0025", "0.25", "12", "3.4k", "1.2M", "7.68G", "1e+30"]


# --- the page ---------------------------------------------------------------------------------------

def test_the_page_names_the_winner_with_its_test_cis(search):
    note, tmp = search.text, search.tmp
    kept = np.load(tmp / "b" / PREDICTIONS)
    cis = metrics_with_ci("binary", kept["labels"], kept["probs"], n_resamples=RESAMPLES)
    assert note.startswith("## Search `hand`: winner `bbbb0002`")
    assert f"AUC {format_ci(cis['auc'])}" in note.splitlines()[2] and "never used to choose" in note
    assert f"| sensitivity | {format_ci(cis['sensitivity'])} |" in note  # the winner's every metric, with its CI
    assert "`lr` = 0.02, `model` = cnn_b" in note and "```yaml\nlr: 0.02\nmodel: cnn_b\n```" in note


def test_the_leaderboard_ranks_tested_trials_by_validation_then_the_stopped_ones(search):
    rows = [line for line in search.text.splitlines() if re.match(r"\| \d+ \|", line)]
    assert [row.split("|")[2].strip() for row in rows] == ["bbbb0002 (winner)", "aaaa0001", "cccc0003"]
    assert "| **bbbb0002 (winner)**&emsp; |" in search.note  # bold, and padded for MLflow's unpadded tables
    assert "| 0.2 | 3/3 |" in rows[0] and "| 0.3 | 3/3 |" in rows[1]
    assert rows[2].endswith("| 0.15 | 1/3 stopped by ASHA | - | - |")  # a better loss, but never tested: not eligible
    header = next(line for line in search.text.splitlines() if line.startswith("| # |"))
    assert "best_val_loss (validation)" in header and "test AUC (reported)" in header
    assert "(lower is better)" in search.note


def test_the_page_counts_outcomes_and_carries_the_leak_report_and_export_commands(search):
    note = search.note
    assert "4 trials: 2 completed, 1 stopped early, 1 failed" in note
    assert "- `dddd0004` failed: FloatingPointError: Non-finite loss" in note
    assert "**Leak check (train 400, val 100, test 120 images): LEAK**" in note
    assert "- duplicates shared across splits: train-val 1, train-test 0, val-test 0" in note
    assert f"export MLFLOW_TRACKING_URI={search.client.tracking_uri}" in note
    assert "python -m analysis.export --search hand --out exported/hand" in note


def test_cis_are_kept_on_the_trial_and_not_recomputed(search, monkeypatch):
    winner = search.client.get_run(search.board.winner.info.run_id)
    kept = json.loads(winner.data.tags[description.TAG_TEST_CI])
    assert kept["n_resamples"] == RESAMPLES and kept["n"] == 120 and set(kept["metrics"]) >= {"acc", "auc"}
    monkeypatch.setattr(description, "metrics_with_ci", lambda *a, **k: pytest.fail("bootstrapped again"))
    again = description.read_leaderboard(search.client, search.client.get_run(search.parent), n_resamples=RESAMPLES)
    assert again.cis == search.board.cis


def test_a_long_page_drops_the_config_before_it_outgrows_an_mlflow_tag(search):
    winner = search.board.winner
    params = dict(winner.data.params, **{f"key_{i:03d}": "x" * 60 for i in range(150)})
    long = SimpleNamespace(info=winner.info, data=SimpleNamespace(params=params, metrics=winner.data.metrics,
                                                                  tags=winner.data.tags))
    text = description.fitted_markdown(dataclasses.replace(search.board, winner=long))
    assert len(text) <= MAX_TAG_VAL_LENGTH and "key_149" not in text and "Parameters tab" in text
    assert "winner `bbbb0002`" in text and "### Leaderboard" in text


def test_a_search_without_a_finished_trial_says_so_on_its_page_and_in_its_report(store, tmp_path, capsys):
    trials = [{"id": "eeee0001", "params": {"lr": 0.01, "model": "cnn_a"}, "losses": [0.5], "outcome": "stopped_early",
               "cost": 10, "start": 1_000_000}]
    parent = log_search(store, "cut-short", trials, best=None)
    client = mlflow.MlflowClient(store)
    board = description.write_description(client, parent)
    note = client.get_run(parent).data.tags[MLFLOW_RUN_NOTE]
    assert "no winner yet" in note and "python tune.py --resume cut-short" in note and "Export" not in note
    page = report.report_after_search(client, parent, board, out=tmp_path / "cut-short")
    text = page.read_text()
    assert "No trial trained to the end" in text and "eeee0001" in text and "stopped by ASHA at epoch 1" in text
    assert "no trial trained to the end" in capsys.readouterr().out


def test_publish_never_fails_the_search(search, monkeypatch, capsys):
    def broken(*args, **kwargs):
        raise RuntimeError("artifact store down\nsecond line")

    monkeypatch.setattr(description, "write_description", broken)
    monkeypatch.setattr(report, "report_after_search", broken)
    assert not summary.publish(ResilientClient(search.client.tracking_uri, retry_s=60), search.parent, report=True)
    lines = capsys.readouterr().out.splitlines()  # at once: an error on this side is not retried for the window
    assert lines == ["description: not written (RuntimeError: artifact store down); the search's results are unaffected",
                     "report: not written (RuntimeError: artifact store down); the search's results are unaffected"]


def test_the_end_of_a_search_says_where_to_look():
    def printed(uri):
        import contextlib
        import io

        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            summary.print_where(uri, "7", "abc123")
        return out.getvalue()

    remote = printed("https://mlflow.example.org")
    assert remote.startswith("MLflow UI: open https://mlflow.example.org/#/experiments/7/runs/abc123") and "mlflow ui" not in remote
    local = printed("sqlite:////data/mlflow.db")
    assert local.startswith("MLflow UI: mlflow ui --backend-store-uri sqlite:////data/mlflow.db --host 127.0.0.1  then open "
                            "http://127.0.0.1:5000/#/experiments/7/runs/abc123")


# --- the report ---------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def page(search, tmp_path_factory):
    out = tmp_path_factory.mktemp("report") / "hand"
    return report.report_after_search(search.client, search.parent, search.board, out=out)


def test_the_report_is_one_file_with_every_view_and_every_trial(search, page):
    text = page.read_text()
    for title in ("Leaderboard", "The winner", "Optimisation history", "Learning curves and ASHA&#x27;s decisions",
                  "Parallel coordinates", "Hyperparameter importance", "Validation score against cost", "Every trial",
                  "Leak check", "Export the winner"):
        assert f"<h2>{title}</h2>" in text, title
    assert all(t["id"] in text for t in search.trials)
    assert text.count("data:image/png;base64,") >= 3  # history, cost, metric vs params: inlined
    assert text.count("plotly.js v") == 1 and not re.search(r"<script[^>]*\bsrc=", text)  # plotly.js inlined once
    assert "Only 2 completed trials (fewer than 10)" in text  # fANOVA's warning
    logged = {a.path for a in search.client.list_artifacts(search.parent, "report")}
    assert {"report/report.html", "report/history.png", "report/cost.png", "report/tables.md"} <= logged


def test_the_report_marks_the_trial_asha_stopped(page):
    text = page.read_text()
    assert "<td>cccc0003</td><td>stopped early</td><td>stopped by ASHA at epoch 1</td>" in text
    assert "<td>aaaa0001</td><td>completed</td><td>kept at epoch 1, kept at epoch 2</td>" in text
    assert "cccc0003: stopped by ASHA at epoch 1" in text  # the cross on its curve (plotly hover text)


def test_no_report_is_a_flag_a_resume_accepts():
    import tune

    args = tune.get_args_parser().parse_args(["--resume", "smoke-1", "--no-report"])
    tune.check_resume_flags(args)  # not a flag that shapes the search: no refusal
    assert args.no_report and not tune.get_args_parser().parse_args(["--space", "smoke"]).no_report

"""End to end: real searches on PneumoniaMNIST through tune.py, Ray Tune and an MLflow server over HTTP.

Cost: the suite's shared search (tests/conftest.py), started with the session beside the other slow work; one trial
trained in-process. A SIGKILLed search's resume is tests/test_old_layout.py's (its fixture was killed so)."""

import re
from pathlib import Path

import pytest
import torch

from search_spaces import load_space
from trainables.tracking.names import ARTIFACTS as TRIAL_ARTIFACTS
from trainables.tracking.names import GAN_ARTIFACTS
from trainables.tracking.state import read_state
from trainables.training.epochs import train

pytestmark = pytest.mark.integration


def completed(search):
    return [t for t in search.trials if t.data.tags.get("medtune.outcome") == "completed"]


def test_search_prints_the_best_config_and_its_test_metrics(shared_search):
    assert "best config:" in shared_search.stdout
    assert '"test_auc"' in shared_search.stdout.split("best test metrics:")[1]


def test_ensemble_flag_prints_the_validation_choice_and_names_the_trials_that_cannot_join(shared_search):
    """tune.py --ensemble 3 --tta ends with the hand-over analysis.export would make: ensemble selection over the
    trials' kept validation predictions. The shared space mixes two split ratios, so only the winner's split-mates
    may join, every candidate on the other split (completed, cut or stopped early) is named, and the description
    of the search shows what was handed over."""
    assert "ensemble choice: not written" not in shared_search.stdout
    section = shared_search.stdout.split("ensemble choice (as `python -m analysis.export --ensemble 3 --tta` makes it):")[1]
    winner_split = float(shared_search.winner.data.params["split_ratio"])
    other_split = 0.9 if winner_split == 0.8 else 0.8
    candidates = [t for t in shared_search.trials
                  if t.data.tags.get("medtune.outcome") in ("completed", "cut_by_budget", "stopped_early")]
    others = [t for t in candidates if float(t.data.params["split_ratio"]) == other_split]
    assert section.count(f"split_ratio {other_split!r}, not {winner_split!r}") == len(others)
    members = section.split("ensemble members (selected on validation; weight, temperature): ")[1].splitlines()[0]
    labels = [part.split(" (")[0].strip(", ") for part in members.split("), ") if part]
    mates = {t.data.tags["medtune.trial_id"] for t in candidates if float(t.data.params["split_ratio"]) == winner_split}
    assert set(labels) <= mates and 1 <= members.count("T ") <= 4  # the winner, and at most 3 selected
    assert re.search(r"^chosen: (single|ensemble)(\+tta)? -- ", section, re.MULTILINE)
    note = shared_search.client.get_run(shared_search.parent.info.run_id).data.tags["mlflow.note.content"]
    assert "### Hand-over (the model that ships)" in note


def test_mlflow_tracking_uri_from_the_environment_is_honoured(shared_search):
    assert not (shared_search.tmp / "mlflow.db").exists()  # nothing went to a local store
    assert f"MLflow:   {shared_search.uri}" in shared_search.stdout


def test_one_parent_and_one_nested_run_per_trial(shared_search):
    client, parent, trials = shared_search.client, shared_search.parent, shared_search.trials
    assert len(trials) == 6 and all(t.data.tags["medtune.role"] == "trial" for t in trials)
    assert {r.info.status for r in [parent, *trials]} <= {"FINISHED", "FAILED"}
    assert parent.data.tags["medtune.space"] == "shared" and parent.data.params["mode"] == "min"
    assert {"search_space.yaml", "leak_report.json"} <= {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert parent.data.metrics["leak_dup_images"] == 27  # PneumoniaMNIST's known duplicates across its splits


def test_completed_trials_hold_curves_test_metrics_and_plots_on_the_server(shared_search):
    client = shared_search.client
    assert completed(shared_search)
    for run in completed(shared_search):
        assert [m.step for m in client.get_metric_history(run.info.run_id, "val_loss")] == [1, 2]
        assert "test_auc" in run.data.metrics and "lr" in run.data.params
        artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
        # incl. misclassified test images, augmented training images; the GAN's files come with synthetic_pct only
        assert set(TRIAL_ARTIFACTS) - set(GAN_ARTIFACTS) <= artifacts
        # simple_cnn at 28 px, 2 classes: conv 1->32, conv 32->64 (pooled to 4x4), linear 1024->2
        assert run.data.metrics["params_total"] == run.data.metrics["params_trainable"] == 10 * 32 + 289 * 64 + 1025 * 2
        assert run.data.metrics["flops_per_image"] == 2 * (28 * 28 * 32 * 9 + 14 * 14 * 64 * 32 * 9 + 1024 * 2)
        assert "train_auc" in run.data.metrics
        assert run.data.params["stem"] == "auto" and run.data.params["stem_resolved"] == "fixed"  # simple_cnn: no choice
    local = client.download_artifacts(shared_search.winner.info.run_id, "roc_curve.png", str(shared_search.tmp))
    assert Path(local).read_bytes()[:4] == b"\x89PNG"  # proxied through the server


def test_min_mode_search_names_the_lowest_validation_loss_as_winner(shared_search):
    winner, done = shared_search.winner, completed(shared_search)
    assert winner.data.tags["medtune.best_trial"] == "true"
    assert winner.data.metrics["best_val_loss"] == min(c.data.metrics["best_val_loss"] for c in done)
    assert len({c.data.metrics["best_val_loss"] for c in done}) > 1  # a real choice was made
    assert shared_search.parent.data.metrics["test_auc"] == winner.data.metrics["test_auc"]


def test_nan_trial_fails_alone_asha_stops_some_and_trials_overlap(shared_search):
    trials = shared_search.trials
    failed = [c for c in trials if c.info.status == "FAILED"]
    assert failed and all(float(c.data.params["lr"]) == 1e30 for c in failed)
    assert "Non-finite loss" in failed[0].data.tags["medtune.error"]
    assert any(c.data.tags.get("medtune.outcome") == "stopped_early" for c in trials)
    spans = sorted((c.info.start_time, c.info.end_time) for c in trials)
    assert any(later[0] < earlier[1] for earlier, later in zip(spans, spans[1:])), "no two trials ran at once"


def test_gpu_request_falls_back_to_cpu_but_the_state_keeps_the_request(shared_search):
    assert "no GPU in the Ray cluster; trials run on CPU (asked for 0.25 GPU per trial)" in shared_search.stdout
    state = read_state(str(shared_search.storage), "shared")
    assert state["space"]["resources"]["gpu"] == 0.25 and state["tracking_uri"] == shared_search.uri


def test_a_finished_trial_keeps_one_checkpoint_with_its_best_weights_only(shared_search):
    for run in completed(shared_search):
        folder = Path(run.data.tags["medtune.checkpoint"])
        assert len(list(folder.parent.glob("checkpoint_*"))) == 1
        state = torch.load(folder / "checkpoint.pt", map_location="cpu", weights_only=True)
        assert state["final"] and "optimizer" not in state and "best_model" not in state
        assert state["best_epoch"] <= 2 and state["precision"] == "fp32"


def test_resnetd_depth_space_trains_a_trial_as_shipped(medmnist_root):
    """The shipped study space's own trial config (fixed keys + the first value of each searched key), trained
    for one epoch on BreastMNIST: the space is runnable, not only valid (the search machinery is the shared one)."""
    space = load_space("resnetd_depth")
    config = {**space.base_config(), "dataset": "breastmnist", "epochs": 1, "data_root": str(medmnist_root),
              **{key: domain.get("choice", [None])[0] if "choice" in domain else next(iter(domain.values()))[0]
                 for key, domain in space.params.items()},
              "stem": "imagenet"}  # ~10x cheaper than auto's small stem at 28 px; the stem is tests/test_stem.py's
    final = train(config, report=lambda metrics: None)
    assert config["model"] == "resnet18d" and final["epoch"] == 1 and "test_auc" in final


# --- the search's page in MLflow and its study report (issue 16), read from the shared search -------------

def test_the_search_page_in_mlflow_names_the_winner_and_its_test_ci(shared_search):
    import re

    note = shared_search.parent.data.tags["mlflow.note.content"]  # read back from the server
    note = note.replace("&emsp;", "").replace("**", "")  # the tables' plain text
    winner = shared_search.winner
    assert note.startswith(f"## Search `shared`: winner `{winner.data.tags['medtune.trial_id']}`")
    line = note.splitlines()[2]  # under the title: the winner's test AUC and accuracy with their 95 % CIs
    auc = re.search(r"AUC (\d\.\d{3}) \[(\d\.\d{3}), (\d\.\d{3})\]", line)
    assert auc and float(auc[2]) <= float(auc[1]) == round(winner.data.metrics["test_auc"], 3) <= float(auc[3])
    assert line.startswith("Test (reported, never used to choose)") and line.endswith("(95 % CI).")
    ended = [t.data.tags.get("medtune.outcome") for t in shared_search.trials]
    assert (f"6 trials: {ended.count('completed')} completed, {ended.count('stopped_early')} stopped early, "
            f"{ended.count('failed')} failed") in note
    ranked = sorted(completed(shared_search), key=lambda t: (t.data.metrics["best_val_loss"], t.data.tags["medtune.trial_id"]))
    rows = [line.split("|")[2].strip() for line in note.splitlines() if re.match(r"\| \d+ \|", line)]
    assert rows[:len(ranked)] == [f"{t.data.tags['medtune.trial_id']}" + (" (winner)" if t is ranked[0] else "") for t in ranked]
    assert "Leak check (train " in note and "python -m analysis.export --search shared" in note


def test_finished_trials_keep_their_test_predictions(shared_search):
    from trainables.tracking.names import PREDICTIONS
    from trainables.training.figures import read_test_predictions
    from trainables.training.metrics import classification_metrics

    run = shared_search.winner
    local = shared_search.client.download_artifacts(run.info.run_id, PREDICTIONS, str(shared_search.tmp))
    kept = read_test_predictions(local)
    assert kept["task"] == "binary" and kept["class_names"] == ["normal", "pneumonia"] and len(kept["labels"]) == 624
    assert classification_metrics("binary", kept["labels"], kept["probs"])["acc"] == run.data.metrics["test_acc"]
    assert (Path(run.data.tags["medtune.checkpoint"]) / PREDICTIONS).exists()  # beside its checkpoint too


def test_the_study_report_is_logged_and_marks_every_trial_and_asha_s_decisions(shared_search):
    page = shared_search.tmp / "reports" / "shared" / "report.html"
    text = page.read_text()
    assert "report:   reports/shared/report.html" in shared_search.stdout
    logged = {a.path for a in shared_search.client.list_artifacts(shared_search.parent.info.run_id, "report")}
    assert {"report/report.html", "report/history.png", "report/cost.png", "report/tables.md"} <= logged
    assert all(t.data.tags["medtune.trial_id"] in text for t in shared_search.trials)
    stopped = [t for t in shared_search.trials if t.data.tags.get("medtune.outcome") == "stopped_early"]
    for run in stopped:  # max_t 3, grace 1, factor 2: rungs at epochs 1 and 2
        epoch = int(run.data.metrics["epoch"])
        decisions = "".join(f"kept at epoch {e}, " for e in range(1, epoch)) + f"stopped by ASHA at epoch {epoch}"
        assert f"<td>{run.data.tags['medtune.trial_id']}</td><td>stopped early</td><td>{decisions}</td>" in text
        assert f"{run.data.tags['medtune.trial_id']}: stopped by ASHA at epoch {epoch}" in text  # the cross on its curve


def test_the_end_of_a_search_prints_the_url_to_open_on_a_server(shared_search):
    parent = shared_search.parent
    assert (f"MLflow UI: open {shared_search.uri}/#/experiments/{parent.info.experiment_id}/runs/{parent.info.run_id}"
            in shared_search.stdout)
    assert "mlflow ui --backend-store-uri http" not in shared_search.stdout

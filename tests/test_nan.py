"""A NaN never wins and a trial that diverges is not retried. In-process, no Ray cluster: about two seconds."""

import math
from types import SimpleNamespace

from test_budget import RecordingClient

import trainables.ray_trainable as ray_trainable
from analysis.summary import print_summary, rank_results, result_outcome
from trainables.tracking.mlflow_runs import MLflowTrialCallback
from trainables.tracking.names import TAG_ERROR, TAG_OUTCOME
from trainables.tracking.ranking import FAILED, reported_failure

NAN = float("nan")


def result(trial_id, best, epochs=3):
    return SimpleNamespace(metrics={"trial_id": trial_id, "training_iteration": epochs, "best_val_auc": best,
                                    "done": True}, error=None, config={"lr": 0.1})


def test_every_score_nan_gives_no_winner_and_the_summary_says_why(capsys):
    results = [result("a", NAN), result("b", NAN)]
    ranked = rank_results(results, "val_auc", "max", 3)
    assert ranked == []
    print_summary(ranked, results, ["lr"], "val_auc", 3)
    out = capsys.readouterr().out
    assert "2 trials: 2 completed" in out
    assert "no winner: every trial that trained to the end or was cut by the budget has a NaN best_val_auc" in out
    assert "best config" not in out


def test_a_nan_score_is_left_out_of_the_ranking_in_either_direction():
    results = [result("a", NAN), result("b", 0.7), result("c", 0.9)]
    assert [r.metrics["trial_id"] for r in rank_results(results, "val_auc", "max", 3)] == ["c", "b"]
    assert [r.metrics["trial_id"] for r in rank_results(results, "val_auc", "min", 3)] == ["b", "c"]


def test_a_diverging_trial_ends_itself_failed_instead_of_raising_into_a_retry(monkeypatch, toy):
    """Real training on the toy data with lr 1e30: the trainable returns (Ray retries only what raises) after a last
    result that says it failed; the MLflow callback, the progress lines and the summary all read it as failed."""
    reports = []
    monkeypatch.setattr(ray_trainable, "tune", SimpleNamespace(get_checkpoint=lambda: None,
                                                               report=lambda metrics, **kw: reports.append(metrics)))
    config = {"dataset": "pneumoniamnist", "model": "simple_cnn", "image_size": 16, "epochs": 2, "batch_size": 32,
              "lr": 1e30, "optimizer": "sgd", "metric": "val_loss"}
    in_memory = SimpleNamespace(open=toy)  # a DatasetRef's one method: the trial opens its dataset itself
    ray_trainable.tune_trainable(config, datasets={("pneumoniamnist", 16): in_memory})
    (last,) = reports  # it diverged in its first epoch
    assert last["done"] and math.isnan(last["val_loss"]) and last["best_val_loss"] is None
    assert reported_failure(last).startswith("NonFiniteLoss: Non-finite loss")

    trial = SimpleNamespace(trial_id="t", status="TERMINATED", checkpoint=None,
                            last_result={**last, "training_iteration": 1})
    callback = MLflowTrialCallback("sqlite:///unused.db", "parent", "s", max_t=2)
    callback.client, callback._runs = RecordingClient(), {"t": "run-t"}
    callback.on_trial_result(0, [trial], trial, trial.last_result)  # not an epoch: nothing logged
    callback.on_trial_complete(0, [trial], trial)
    assert callback.client.tags == {"run-t": {TAG_OUTCOME: FAILED, TAG_ERROR: reported_failure(last)}}
    assert callback.client.ended == {"run-t": "FAILED"}
    assert result_outcome(SimpleNamespace(metrics=trial.last_result, error=None), 2) == FAILED

"""A NaN never wins and a trial that diverges is not retried. In-process, no Ray cluster: about a second."""

from types import SimpleNamespace

from analysis.summary import print_summary, rank_results

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

"""The table tune.py prints when a search ends: how trials ended, the best ones, the winner's config."""

from __future__ import annotations

import json

from analysis.ranking import COMPLETED, FAILED, STOPPED_EARLY, outcome, rank, selection_key


def result_outcome(result, max_t: int) -> str:
    """How a Ray Tune result ended, by the shared rule."""
    return outcome(int((result.metrics or {}).get("training_iteration", 0)), max_t, failed=result.error is not None)


def rank_results(results, metric: str, mode: str, max_t: int) -> list:
    """Completed trials (they have test metrics), best validation score first: the rule analysis/ uses."""
    key = selection_key(metric)
    done = [r for r in results if result_outcome(r, max_t) == COMPLETED]
    return rank(done, lambda r: r.metrics.get(key, float("nan")), mode, tie=lambda r: str(r.metrics.get("trial_id")))


def print_summary(ranked: list, results, searched: list[str], metric: str, max_t: int, top: int = 5) -> None:
    from search_spaces.tuner import fmt

    ended = [result_outcome(r, max_t) for r in results]
    print(f"\n{len(results)} trials: {ended.count(COMPLETED)} completed, {ended.count(STOPPED_EARLY)} stopped early "
          f"by ASHA, {ended.count(FAILED)} failed")
    key = selection_key(metric)
    header = ["trial", *searched, "epochs", key, "test_auc", "test_acc"]
    rows = [[r.metrics.get("trial_id", "?"), *[fmt(r.config.get(p)) for p in searched],
             str(r.metrics.get("training_iteration")), fmt(r.metrics.get(key)), fmt(r.metrics.get("test_auc")),
             fmt(r.metrics.get("test_acc"))] for r in ranked[:top]]
    widths = [max(len(str(c)) for c in column) for column in zip(header, *rows)]
    for row in [header, *rows]:
        print("  ".join(str(c).ljust(w) for c, w in zip(row, widths)))
    if not ranked:
        print("\nno trial trained to the end: nothing to pick (resume the search or give trials more epochs)")
        return
    best = ranked[0]
    print("\nbest config:", json.dumps({p: best.config.get(p) for p in searched}, default=str))
    tests = {k: round(v, 4) for k, v in best.metrics.items() if k.startswith("test_") and isinstance(v, float)}
    print("best test metrics:", json.dumps(tests))

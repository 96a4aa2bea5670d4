"""The table tune.py prints when a search ends: how trials ended, the best ones, the winner's config."""

from __future__ import annotations

import json
import math
import os

from trainables.tracking.mlflow_runs import run_page_url, runs_table_url
from trainables.tracking.ranking import (
    COMPLETED,
    CUT_BY_BUDGET,
    FAILED,
    RANKED,
    STOPPED_EARLY,
    outcome,
    rank,
    reported_failure,
    selection_key,
)
from trainables.tracking.text import fmt


def result_outcome(result, max_t: int, budget_spent: bool = False) -> str:
    """How a Ray Tune result ended, by the shared rule (`done` is the mark ASHA and a finished trial leave)."""
    metrics = result.metrics or {}
    return outcome(int(metrics.get("training_iteration", 0)), max_t,
                   failed=result.error is not None or reported_failure(metrics) is not None,
                   marked_done=bool(metrics.get("done")), budget_spent=budget_spent)


def rank_results(results, metric: str, mode: str, max_t: int, budget_spent: bool = False) -> list:
    """Completed trials and those the time budget cut after an epoch or more, best validation score first: the
    rule analysis/ uses (a trial cut before its first epoch has no score, and a NaN score is none: it cannot win)."""
    return rank([r for r in _rankable(results, metric, max_t, budget_spent) if not math.isnan(_score(r, metric))],
                lambda r: _score(r, metric), mode, tie=lambda r: str(r.metrics.get("trial_id")))


def _rankable(results, metric: str, max_t: int, budget_spent: bool) -> list:
    """Trials whose outcome may win and that reported the score (NaN or not)."""
    return [r for r in results if result_outcome(r, max_t, budget_spent) in RANKED
            and selection_key(metric) in (r.metrics or {})]


def _score(result, metric: str) -> float:
    value = (result.metrics or {}).get(selection_key(metric), math.nan)
    return float(value) if isinstance(value, (int, float)) else math.nan


def print_summary(ranked: list, results, searched: list[str], metric: str, max_t: int, top: int = 5,
                  budget: str | None = None, budget_spent: bool = False) -> None:
    """The outcomes line, the top trials, the winner; `budget` is the `time budget: ...` line of a budgeted search."""
    ended = [result_outcome(r, max_t, budget_spent) for r in results]
    cut = f", {ended.count(CUT_BY_BUDGET)} cut by budget" if budget else ""
    print(f"\n{len(results)} trials: {ended.count(COMPLETED)} completed, {ended.count(STOPPED_EARLY)} stopped early "
          f"by ASHA{cut}, {ended.count(FAILED)} failed")
    if budget:
        print(budget)
    key = selection_key(metric)

    def epochs(result) -> str:  # `2 cut`: the epochs a trial the budget cut had finished
        cut = result_outcome(result, max_t, budget_spent) == CUT_BY_BUDGET
        return f"{result.metrics.get('training_iteration')}{' cut' if cut else ''}"

    header = ["trial", *searched, "epochs", key, "test_auc", "test_acc"]
    rows = [[r.metrics.get("trial_id", "?"), *[fmt((r.config or {}).get(p)) for p in searched], epochs(r),
             fmt(r.metrics.get(key)), fmt(r.metrics.get("test_auc")),
             fmt(r.metrics.get("test_acc"))] for r in ranked[:top]]
    widths = [max(len(str(c)) for c in column) for column in zip(header, *rows)]
    for row in [header, *rows]:
        print("  ".join(str(c).ljust(w) for c, w in zip(row, widths)))
    if not ranked:
        if _rankable(results, metric, max_t, budget_spent):  # they trained, but none has a score to compare
            print(f"\nno winner: every trial that trained to the end or was cut by the budget has a NaN {key} "
                  "(e.g. an AUC on a validation split with one class); choose another --metric")
        else:
            print("\nno trial trained to the end or was cut by the budget: nothing to pick (resume the search or "
                  "give trials more epochs)")
        return
    best = ranked[0]
    print("\nbest config:", json.dumps({p: best.config.get(p) for p in searched}, default=str))
    tests = {k: round(v, 4) for k, v in best.metrics.items() if k.startswith("test_") and isinstance(v, float)}
    if result_outcome(best, max_t, budget_spent) == CUT_BY_BUDGET:  # tested only at its last epoch, which it never had
        print(f"best test metrics: none yet (cut by the budget after {best.metrics.get('training_iteration')} epochs); "
              "`python -m analysis.best` scores its best checkpoint on test")
        return
    print("best test metrics:", json.dumps(tests))


# --- after the table: the search's page in MLflow, the study report, where to look -------------------

def publish(mlflow, parent_id: str, report: bool) -> bool:
    """Write the parent run's description and (unless `report` is False) the study report, each retried for the
    search's MLflow retry window (`mlflow`: its ResilientClient). Neither may fail the search: trained trials are
    worth more than a page, so a problem is one line and the search's exit code stands. Whether the description
    was written (`analysis.sync` writes one that is missing)."""
    from analysis.description import write_description

    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # no progress bars between our lines
    board = _never_fails("description", lambda: mlflow.attempt(write_description, parent_id))
    if report:
        from analysis.report import report_after_search

        _never_fails("report", lambda: mlflow.attempt(report_after_search, parent_id, board))
    return board is not None


def print_ensemble(client, parent_id: str, k: int, tta: bool, data_root: str | None, rule: str = "select") -> None:
    """tune.py --ensemble K [--tta]: the model `analysis.export` would ship and why, chosen on validation, then the
    test figures; kept on the parent run for its description. Like the pages, it never fails the search."""
    from analysis.handover import summarise_search

    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # no progress bars between our lines
    lines = _never_fails("ensemble choice", lambda: summarise_search(client, parent_id, k, tta, data_root, rule))
    if lines:
        flags = f"--ensemble {k}{' --tta' if tta else ''}{' --ensemble-rule topk' if rule == 'topk' else ''}"
        print(f"\nensemble choice (as `python -m analysis.export {flags}` makes it):")
        print("\n".join(lines))


def _never_fails(what: str, body):
    try:
        return body()
    except Exception as error:  # noqa: BLE001 (any: the trials are done and logged whatever a page does)
        first = str(error).splitlines()[0][:200] if str(error) else ""
        print(f"{what}: not written ({type(error).__name__}: {first}); the search's results are unaffected")
        return None


def print_where(tracking_uri: str, experiment_id: str, parent_id: str) -> None:
    """How to open the results: a server is opened in a browser; a local store needs `mlflow ui` first."""
    page, table = run_page_url(tracking_uri, experiment_id, parent_id), runs_table_url(tracking_uri, experiment_id)
    if tracking_uri.startswith(("http://", "https://")):
        print(f"MLflow UI: open {page}  (the search's page; every run: {table})")
    else:
        print(f"MLflow UI: mlflow ui --backend-store-uri {tracking_uri} --host 127.0.0.1  then open {page}  "
              f"(every run: {table})")

"""The two rules every part of medtune shares: how a trial ended, and which trial is best.

tune.py (on Ray's results), the MLflow callback (the `medtune.outcome` tag) and analysis/ (on MLflow runs)
all call these, so a search ranks its trials the same way wherever it is read. Also the direction a metric is
selected in, and the result a trial ends with when it fails deterministically.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import TypeVar

COMPLETED, STOPPED_EARLY, FAILED = "completed", "stopped_early", "failed"
CUT_BY_BUDGET = "cut_by_budget"  # running when the search's time budget was spent: Ray stopped it mid-epoch
INTERRUPTED = "interrupted"  # running when the search was stopped (a signal, its storage failing): --resume goes on
OUTCOMES = (COMPLETED, STOPPED_EARLY, CUT_BY_BUDGET, INTERRUPTED, FAILED)
RANKED = (COMPLETED, CUT_BY_BUDGET)  # can win: the budget, not their score, ended the cut ones (finished epochs count)
T = TypeVar("T")
LOWER_IS_BETTER = ("loss", "hamming_loss")  # every other metric a trial logs: higher is better


def metric_direction(name: str) -> str:
    """"min" or "max": the selection mode that favours better values of metric `name` (with or without val_ or
    best_val_). The one rule for direction: space files, --metric, TrialConfig and the ranking all use it."""
    return "min" if name.removeprefix("best_").removeprefix("val_") in LOWER_IS_BETTER else "max"


def selection_mode(metric: str, mode: str | None = None, flag: str = "mode") -> str:
    """The direction to select `metric` in: `mode` when it agrees with `metric_direction`, that direction when
    `mode` is None; ValueError naming `flag` when it contradicts (maximising a loss is never what was meant)."""
    direction = metric_direction(metric)
    if mode is not None and mode != direction:
        better = "lower" if direction == "min" else "higher"
        raise ValueError(f"{flag} {mode} contradicts metric {metric}, where {better} is better; use {flag} "
                         f"{direction} or leave {flag} out")
    return direction


FAILURE = "failure"  # a result key: the error a trial ended on by itself (a deterministic one, never retried)


def failure_result(metric: str, error: Exception) -> dict:
    """The last result of a trial that failed in a way a retry would repeat (a non-finite loss): reported with
    `done`, so Ray ends the trial instead of retrying it. The metric is NaN (ASHA skips NaN); the selection score is
    None, so Optuna records the trial as pruned. `reported_failure` reads it back."""
    return {metric: float("nan"), selection_key(metric): None, FAILURE: f"{type(error).__name__}: {error}",
            "done": True}


def reported_failure(result: dict | None) -> str | None:
    """The error a trial reported ending on (see `failure_result`), or None."""
    return (result or {}).get(FAILURE) or None


def outcome(epochs_done: int, max_t: int, failed: bool = False, marked_done: bool = True,
            budget_spent: bool = False) -> str:
    """A trial is completed when it trained all `max_t` epochs (it then has test metrics). One that stopped before
    without an error was stopped early by ASHA, which marks its last result done. Ray stops running trials where they
    are, without that mark, at the end of a search: when its time budget was spent they were cut by the budget,
    otherwise the search was interrupted (a signal, its storage failing) and `--resume` trains them on."""
    if failed:
        return FAILED
    if epochs_done >= max_t:
        return COMPLETED
    if not marked_done:
        return CUT_BY_BUDGET if budget_spent else INTERRUPTED
    return STOPPED_EARLY


def selection_key(metric: str) -> str:
    """The score trials are ranked by: the best validation value a trial reached (`best_val_auc`, ...)."""
    return metric if metric.startswith("best_") else f"best_{metric}"


def rank(items: Iterable[T], score: Callable[[T], float], mode: str, tie: Callable[[T], str] = str) -> list[T]:
    """`items` best first by `score` (validation only) in `mode` ("max" or "min"); NaN ranks last; equal
    scores are ordered by `tie` (the trial id), so every caller breaks ties the same way."""
    if mode not in ("max", "min"):
        raise ValueError(f"mode must be max or min, not {mode!r}")
    sign = -1.0 if mode == "max" else 1.0

    def key(item):
        value = float(score(item))
        return (math.isnan(value), sign * value if not math.isnan(value) else 0.0, tie(item))

    return sorted(items, key=key)


def leaderboard(items: Iterable[T], outcome_of: Callable[[T], str], score: Callable[[T], float], mode: str,
                tie: Callable[[T], str] = str, others: bool = False) -> list[T]:
    """The order every leaderboard shows: the trials that can win (RANKED) by `rank`, then those ASHA stopped early
    by `rank`, then (`others`) the rest (failed, unfinished) by trial id."""
    items = list(items)
    groups = [[i for i in items if outcome_of(i) in RANKED], [i for i in items if outcome_of(i) == STOPPED_EARLY]]
    ordered = [item for group in groups for item in rank(group, score, mode, tie)]
    rest = [i for i in items if outcome_of(i) not in (*RANKED, STOPPED_EARLY)]
    return ordered + (rank(rest, lambda i: math.nan, mode, tie) if others else [])

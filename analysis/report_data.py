"""The study report's data: the trials of a search as one table, the study tables, the Optuna study rebuilt from
them and its fANOVA importance, and each trial's metric history.

`trials_frame` is the table every view draws from (one row per trial, in the leaderboard's order); `domain` reads a
searched key's domain from the logged search_space.yaml. Nothing here draws or writes HTML.
"""

from __future__ import annotations

import itertools
import math
from pathlib import Path

import optuna
import pandas as pd
from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution
from optuna.trial import TrialState, create_trial

from analysis import runs, views
from trainables.tracking.ranking import COMPLETED, CUT_BY_BUDGET, FAILED, STOPPED_EARLY, leaderboard
from trainables.tracking.searched import VARIANT

STATES = {COMPLETED: TrialState.COMPLETE, STOPPED_EARLY: TrialState.PRUNED, CUT_BY_BUDGET: TrialState.PRUNED,
          FAILED: TrialState.FAIL}


def trials_frame(client, parent, space: dict, keys: list[str], objective: str, metric: str) -> pd.DataFrame:
    rows = []
    for run in runs.trials(client, parent):
        m = run.data.metrics
        rows.append({"trial": runs.trial_label(run), "run_id": run.info.run_id,
                     "outcome": run.data.tags.get(runs.TAG_OUTCOME, "unknown"),
                     **{k: _parse(run.data.params.get(k), space, k) for k in keys},
                     "epochs": m.get("epoch"), objective: m.get(objective), metric: m.get(metric),
                     **({"test_auc": m.get("test_auc")} if metric != "test_auc" else {}),
                     **{cost: m.get(cost) for cost in views.COSTS},
                     "start": run.info.start_time, "end": run.info.end_time})
    frame = pd.DataFrame(rows)
    return in_leaderboard_order(frame, objective, space.get("mode", "max")) if rows else frame


def in_leaderboard_order(frame: pd.DataFrame, objective: str, mode: str) -> pd.DataFrame:
    """Completed trials and those cut by the time budget by validation score, then the ASHA-stopped ones, then the
    rest: trainables.tracking.ranking.rank, the rule the winner was chosen by (ties by trial id), as on the run's description."""
    def score(index) -> float:
        value = frame.at[index, objective]
        return math.nan if value is None else float(value)

    order = leaderboard(frame.index, lambda index: frame.at[index, "outcome"], score, mode,
                        tie=lambda index: frame.at[index, "trial"], others=True)
    return frame.loc[order].reset_index(drop=True)


def _parse(text: str | None, space: dict, key: str):
    """A logged param (a string) back to its value: the matching choice, or a number."""
    if text is None:
        return None
    choices = domain(space, key).get("choice")
    if choices is not None:
        return next((c for c in choices if str(c) == text), text)
    try:
        return float(text)
    except ValueError:
        return text


def domain(space: dict, key: str) -> dict:
    """The domain of searched `key` in the logged space ({"choice": [...]}, {"loguniform": [...]}, ...)."""
    if key == VARIANT:
        return {"choice": list(space.get("variants") or {})}
    return (space.get("params") or {}).get(key) or {}


def categorical_keys(frame: pd.DataFrame, space: dict, keys: list[str]) -> list[str]:
    """Searched keys with a finite set of values that actually varied."""
    return [k for k in keys if "choice" in domain(space, k) and frame[k].nunique(dropna=True) > 1]


def study_tables(frame: pd.DataFrame, categorical: list[str], values: list[str]) -> list[tuple[str, pd.DataFrame]]:
    """Mean of each of `values` over completed trials: one table per categorical key and per pair of keys."""
    done = frame[frame["outcome"] == COMPLETED]
    tables = []
    for value in values:
        if done[value].isna().all():
            continue
        for key in categorical:
            grouped = done.groupby(key, dropna=False)[value].agg(["mean", "max", "count"])
            tables.append((f"{value} by {key} (completed trials)", grouped))
        for row_key, col_key in itertools.combinations(categorical, 2):
            pivot = done.pivot_table(index=row_key, columns=col_key, values=value, aggfunc="mean")
            tables.append((f"{row_key} x {col_key} -> mean {value} (completed trials)", pivot))
    return tables


def distributions(space: dict, keys: list[str]) -> dict:
    """Optuna distributions for the searched keys, from the logged search_space.yaml."""
    out = {}
    for key in keys:
        (kind, args), = (domain(space, key) or {"choice": []}).items()
        if kind == "choice" and args:
            out[key] = CategoricalDistribution([c if isinstance(c, (bool, int, float, str)) or c is None else str(c)
                                                for c in args])
        elif kind == "int":
            out[key] = IntDistribution(int(args[0]), int(args[1]))
        elif kind in ("uniform", "loguniform", "quniform"):
            out[key] = FloatDistribution(float(args[0]), float(args[1]), log=kind == "loguniform")
    return out


def rebuild_study(frame: pd.DataFrame, space: dict, keys: list[str], objective: str) -> optuna.Study:
    """An in-memory Optuna study with one trial per run: completed = COMPLETE, ASHA-stopped = PRUNED."""
    dists = distributions(space, keys)
    study = optuna.create_study(direction="maximize" if space.get("mode", "max") == "max" else "minimize")
    for row in frame.to_dict("records"):
        state = STATES.get(row["outcome"])
        params = {k: _clip(row[k], d) for k, d in dists.items() if row.get(k) is not None}
        if state is None or set(params) != set(dists) or any(v is None for v in params.values()):
            continue
        value = row[objective] if state == TrialState.COMPLETE else None
        if state == TrialState.COMPLETE and (value is None or math.isnan(value)):
            continue
        study.add_trial(create_trial(state=state, value=value, params=params, distributions=dists))
    return study


def _clip(value, distribution):
    if isinstance(distribution, CategoricalDistribution):
        return value if value in distribution.choices else None
    if isinstance(distribution, IntDistribution):
        return int(min(max(round(value), distribution.low), distribution.high))
    return float(min(max(value, distribution.low), distribution.high))


def importances(study: optuna.Study) -> tuple[pd.Series, str | None]:
    """fANOVA importance per param (sums to 1), or an empty series and the reason."""
    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    if len(complete) < 2 or not study.trials[0].distributions:
        return pd.Series(dtype=float), f"fANOVA needs 2+ completed trials and a searched param ({len(complete)} completed)"
    evaluator = optuna.importance.FanovaImportanceEvaluator(seed=0)
    try:
        result = optuna.importance.get_param_importances(study, evaluator=evaluator)
    except RuntimeError as error:  # "zero total variance": the completed trials share their searched values
        return pd.Series(dtype=float), f"fANOVA found nothing to explain ({error}); the completed trials differ too little"
    return pd.Series(result, dtype=float, name="importance"), None


def importance_text(importance: pd.Series, note: str | None, completed: int) -> str:
    if note:
        return note
    warning = views.importance_warning(completed)
    return ", ".join(f"{k} {v:.3f}" for k, v in importance.items()) + f" (from {completed} completed trials)" + \
        (f". {warning}" if warning else "")


def write_tables(path: Path, name: str, frame: pd.DataFrame, tables, importance: pd.Series, note: str | None,
                 objective: str) -> None:
    counts = frame["outcome"].value_counts().to_dict() if not frame.empty else {}
    parts = [f"# Search {name}", "", f"{len(frame)} trials: " + ", ".join(f"{v} {k}" for k, v in counts.items()),
             f"Selection: `{objective}` (validation). Test columns are reported, never used to choose.", ""]
    for title, table in tables:
        parts += [f"## {title}", "", "```", table.round(4).to_string(), "```", ""]
    completed = int((frame["outcome"] == COMPLETED).sum())
    parts += ["## Hyperparameter importance (fANOVA, Optuna)", "",
              f"For `{objective}`; ASHA-stopped trials enter as pruned (not fitted), as in Optuna. "
              + importance_text(importance, note, completed), "",
              *(["```", importance.round(4).to_string(), "```", ""] if note is None else [])]
    parts += ["## Trials (best validation first)", "", "```", frame.drop(columns=["run_id"]).round(4).to_string(index=False),
              "```", ""]
    path.write_text("\n".join(parts))


def metric_histories(client, frame: pd.DataFrame, metric: str) -> dict:
    """run id -> [(epoch, value)] of the metric ASHA decided on, one value per epoch (the last one logged: a resumed
    trial may log an epoch twice)."""
    histories = {}
    for run_id in frame["run_id"]:
        per_epoch = {int(m.step): m.value for m in sorted(client.get_metric_history(run_id, metric), key=lambda m: m.timestamp)}
        histories[run_id] = sorted(per_epoch.items())
    return histories

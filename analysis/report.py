"""Study-style report of a search: pivot tables, hyperparameter importance (fANOVA), metric-vs-param plots.

    python -m analysis.report --search resnetd-20261121-101500            # -> reports/<search>/
    python -m analysis.report --search NAME --out my_report --metric test_auc

Written to a folder and logged to the search's parent run under `report/`:
  trials.csv             every trial: outcome, searched params, validation score, test metrics
  tables.md              e.g. model x split_ratio -> mean test accuracy (the ResNet-D study's table),
                         one table per pair of categorical params, one per categorical param, importances
  importance.png/.csv    fANOVA importance of each searched param for the validation score (Optuna)
  metric_vs_params.png   validation score and test metric against every searched param
Test numbers are for reading only: the search selected on validation, and so does every table's order.
"""

from __future__ import annotations

import argparse
import itertools
import math
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import optuna  # noqa: E402
import pandas as pd  # noqa: E402
from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution  # noqa: E402
from optuna.trial import TrialState, create_trial  # noqa: E402

from analysis import runs  # noqa: E402
from analysis.ranking import COMPLETED, FAILED, STOPPED_EARLY  # noqa: E402
from trainables.errors import UserError  # noqa: E402

STATES = {COMPLETED: TrialState.COMPLETE, STOPPED_EARLY: TrialState.PRUNED, FAILED: TrialState.FAIL}


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Tables, fANOVA importance and plots for a finished search.")
    runs.add_common_args(parser)
    parser.add_argument("--out", help="folder to write (default reports/<search>)")
    parser.add_argument("--metric", default="test_acc", help="test metric of the study tables (default test_acc)")
    parser.add_argument("--no-log", action="store_true", help="do not log the folder to the parent MLflow run")
    return parser


# --- the trials as a table ---------------------------------------------------------------------------

def trials_frame(client, parent, space: dict, keys: list[str], objective: str, metric: str) -> pd.DataFrame:
    rows = []
    for run in runs.trials(client, parent):
        m = run.data.metrics
        rows.append({"trial": runs.trial_label(run), "run_id": run.info.run_id,
                     "outcome": run.data.tags.get(runs.TAG_OUTCOME, "unknown"),
                     **{k: _parse(run.data.params.get(k), space, k) for k in keys},
                     "epochs": m.get("epoch"), objective: m.get(objective), metric: m.get(metric),
                     **({"test_auc": m.get("test_auc")} if metric != "test_auc" else {})})
    frame = pd.DataFrame(rows)
    return frame.sort_values(objective, ascending=space.get("mode", "max") == "min", na_position="last") if rows else frame


def _parse(text: str | None, space: dict, key: str):
    """A logged param (a string) back to its value: the matching choice, or a number."""
    if text is None:
        return None
    choices = _domain(space, key).get("choice")
    if choices is not None:
        return next((c for c in choices if str(c) == text), text)
    try:
        return float(text)
    except ValueError:
        return text


def _domain(space: dict, key: str) -> dict:
    if key == "variant":
        return {"choice": list(space.get("variants") or {})}
    return (space.get("params") or {}).get(key) or {}


def categorical_keys(frame: pd.DataFrame, space: dict, keys: list[str]) -> list[str]:
    """Searched keys with a finite set of values that actually varied."""
    return [k for k in keys if "choice" in _domain(space, k) and frame[k].nunique(dropna=True) > 1]


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


# --- hyperparameter importance -----------------------------------------------------------------------

def distributions(space: dict, keys: list[str]) -> dict:
    """Optuna distributions for the searched keys, from the logged search_space.yaml."""
    out = {}
    for key in keys:
        (kind, args), = (_domain(space, key) or {"choice": []}).items()
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
    result = optuna.importance.get_param_importances(study, evaluator=evaluator)
    return pd.Series(result, dtype=float, name="importance"), None


def importance_text(importance: pd.Series, note: str | None, completed: int) -> str:
    if note:
        return note
    caveat = f" (from {completed} completed trials{': rough' if completed < 10 else ''})"
    return ", ".join(f"{k} {v:.3f}" for k, v in importance.items()) + caveat


# --- plots -------------------------------------------------------------------------------------------

def plot_metric_vs_params(frame: pd.DataFrame, space: dict, keys: list[str], objective: str, metric: str, path: Path):
    """One column per searched param: validation score (top) and test metric (bottom) of every trial."""
    keys = keys or ["trial"]
    fig, axes = plt.subplots(2, len(keys), figsize=(3.6 * len(keys), 6.4), squeeze=False)
    ok = frame[frame["outcome"].isin([COMPLETED, STOPPED_EARLY])]
    for col, key in enumerate(keys):
        categories = sorted(ok[key].dropna().unique(), key=_sort_key) if key in ok else []
        categorical = "choice" in _domain(space, key) or key == "trial"
        for row, value in enumerate((objective, metric)):
            ax = axes[row][col]
            for outcome, marker in ((COMPLETED, "o"), (STOPPED_EARLY, "x")):
                part = ok[(ok["outcome"] == outcome) & ok[value].notna()]
                if part.empty:
                    continue
                x = part[key].map({c: i for i, c in enumerate(categories)}) if categorical else part[key]
                ax.scatter(x, part[value], marker=marker, label=outcome.replace("_", " "), alpha=0.8)
            if categorical:
                ax.set_xticks(range(len(categories)), [str(c) for c in categories], rotation=30, ha="right")
            elif _domain(space, key).get("loguniform"):
                ax.set_xscale("log")
            ax.set_xlabel(key)
            ax.set_ylabel(value)
            ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.suptitle("Trials: validation score (selection) and test metric (reporting)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_importance(importance: pd.Series, objective: str, path: Path) -> None:
    fig, ax = plt.subplots(figsize=(5, 0.5 + 0.4 * max(len(importance), 1)))
    importance.sort_values().plot.barh(ax=ax)
    ax.set_xlabel(f"fANOVA importance for {objective}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _sort_key(value):
    return (0, float(value), "") if isinstance(value, (int, float)) and not isinstance(value, bool) else (1, 0.0, str(value))


# --- the command -------------------------------------------------------------------------------------

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


def report(args) -> int:
    client = runs.connect(args.tracking_uri)
    parent = runs.get_search(client, args.search)
    name = parent.data.tags.get("medtune.search", parent.info.run_id)
    space = runs.search_space(client, parent)
    keys = runs.searched_keys(space)
    objective, _ = runs.selection(parent, space)
    frame = trials_frame(client, parent, space, keys, objective, args.metric)
    if frame.empty or not (frame["outcome"] == COMPLETED).any():
        raise UserError(f"Search {name!r} has no trial that trained to the end; resume it (python tune.py --resume {name}) "
                        "or run a longer search")
    out = Path(args.out or Path("reports") / name)
    out.mkdir(parents=True, exist_ok=True)

    frame.to_csv(out / "trials.csv", index=False)
    tables = study_tables(frame, categorical_keys(frame, space, keys), [args.metric, objective])
    importance, note = importances(rebuild_study(frame, space, keys, objective))
    importance.to_csv(out / "importance.csv", header=True)
    if not importance.empty:
        plot_importance(importance, objective, out / "importance.png")
    plot_metric_vs_params(frame, space, keys, objective, args.metric, out / "metric_vs_params.png")
    write_tables(out / "tables.md", name, frame, tables, importance, note, objective)

    for title, table in tables[:1] + [t for t in tables if " x " in t[0]][:1]:
        print(f"{title}:\n{table.round(4).to_string()}\n")
    completed = int((frame["outcome"] == COMPLETED).sum())
    print(f"fANOVA importance for {objective}: {importance_text(importance, note, completed)}")
    if not args.no_log:
        client.log_artifacts(parent.info.run_id, str(out), artifact_path="report")
    print(f"wrote {out}/ ({', '.join(sorted(p.name for p in out.iterdir()))})"
          + ("" if args.no_log else f"; logged to run {parent.info.run_id} under report/"))
    return 0


def main(argv=None) -> int:
    args = get_args_parser().parse_args(argv)
    return runs.run_cli(lambda: report(args), args.debug)


if __name__ == "__main__":
    sys.exit(main())

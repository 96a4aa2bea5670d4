"""The study report of a search: one HTML page to pick (and doubt) the winner, plus pivot tables.

    python -m analysis.report --search resnetd-20261121-101500            # -> reports/<search>/
    python -m analysis.report --search NAME --out my_report --metric test_auc

tune.py writes it at the end of every search (unless --no-report). Written to a folder and logged to the
search's parent run under `report/`:
  report.html            self-contained (images inlined, plotly's JavaScript inlined, works offline): the
                         leaderboard with test CIs, optimisation history, learning curves with ASHA's rung
                         decisions, parallel coordinates, fANOVA importance, validation score against cost with
                         the Pareto front, every trial, the study tables, the leak report, the export commands
  history.png, cost.png  the static views the page shows (matplotlib)
  trials.csv             every trial: outcome, searched params, validation score, test metrics, costs
  tables.md              e.g. model x split_ratio -> mean test accuracy (the ResNet-D study's table),
                         one table per pair of categorical params, one per categorical param, importances
  importance.png/.csv    fANOVA importance of each searched param for the validation score (Optuna)
  metric_vs_params.png   validation score and test metric against every searched param
Test numbers are for reading only: the search selected on validation, and so does every table's order.
"""

from __future__ import annotations

import argparse
import base64
import html
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

from analysis import runs, views  # noqa: E402
from analysis.description import (  # noqa: E402
    Leaderboard,
    export_commands,
    export_section,
    leaderboard_cells,
    leaderboard_intro,
    read_leaderboard,
    short,
    winner_tests,
)
from trainables.errors import UserError  # noqa: E402
from trainables.tracking.mlflow_runs import TAG_SEARCH  # noqa: E402
from trainables.tracking.ranking import COMPLETED, CUT_BY_BUDGET, FAILED, RANKED, STOPPED_EARLY, rank  # noqa: E402
from trainables.tracking.searched import searched_keys  # noqa: E402

PAGE = "report.html"

STATES = {COMPLETED: TrialState.COMPLETE, STOPPED_EARLY: TrialState.PRUNED, CUT_BY_BUDGET: TrialState.PRUNED,
          FAILED: TrialState.FAIL}


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

    order = []
    for group in (frame["outcome"].isin(RANKED), frame["outcome"] == STOPPED_EARLY,
                  ~frame["outcome"].isin([*RANKED, STOPPED_EARLY])):
        order += rank(list(frame.index[group]), score, mode, tie=lambda index: frame.at[index, "trial"])
    return frame.loc[order].reset_index(drop=True)


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
                views.log_axis(ax, "x")
            ax.set_xlabel(key)
            ax.set_ylabel(value)
            ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.suptitle("Trials: validation score (selection) and test metric (reporting)")
    fig.tight_layout()
    views.save(fig, path)


def plot_importance(importance: pd.Series, objective: str, path: Path) -> None:
    fig, ax = plt.subplots(figsize=(5, 0.5 + 0.4 * max(len(importance), 1)))
    importance.sort_values().plot.barh(ax=ax)
    ax.set_xlabel(f"fANOVA importance for {objective}")
    fig.tight_layout()
    views.save(fig, path)


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


# --- the page ---------------------------------------------------------------------------------------

def metric_histories(client, frame: pd.DataFrame, metric: str) -> dict:
    """run id -> [(epoch, value)] of the metric ASHA decided on, one value per epoch (the last one logged: a resumed
    trial may log an epoch twice)."""
    histories = {}
    for run_id in frame["run_id"]:
        per_epoch = {int(m.step): m.value for m in sorted(client.get_metric_history(run_id, metric), key=lambda m: m.timestamp)}
        histories[run_id] = sorted(per_epoch.items())
    return histories


def png(path: Path) -> str:
    """An <img> with the PNG inlined, so the page stays one file wherever it is opened (MLflow's viewer included)."""
    data = base64.b64encode(path.read_bytes()).decode()
    return f'<img alt="{html.escape(path.stem)}" src="data:image/png;base64,{data}">'


class Plotly:
    """Plotly figures as <div>s; the first carries plotly.js inlined (no CDN: the page works offline)."""

    def __init__(self):
        self.first = True

    def __call__(self, fig) -> str:
        div = fig.to_html(full_html=False, include_plotlyjs=self.first, config={"displaylogo": False})
        self.first = False
        return div


def table(header: list[str], rows: list[list], highlight: str | None = None) -> str:
    """An HTML table of text cells (escaped); rows whose second cell contains `highlight` are marked."""
    head = "".join(f"<th>{html.escape(str(h))}</th>" for h in header)
    body = "".join(("<tr class='winner'>" if highlight and highlight in str(row[1]) else "<tr>")
                   + "".join(f"<td>{html.escape(str(c))}</td>" for c in row) + "</tr>" for row in rows)
    return f"<div class='wide'><table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table></div>"


def section(title: str, *parts: str) -> str:
    return f"<section id='{_anchor(title)}'><h2>{html.escape(title)}</h2>{''.join(parts)}</section>"


def _anchor(title: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in title.lower()).strip("-")


def contents(titles: list[str]) -> str:
    links = " · ".join(f"<a href='#{_anchor(t)}'>{html.escape(t)}</a>" for t in titles)
    return f"<nav>{links}</nav>"


def para(text: str, kind: str = "") -> str:
    return f"<p class='{kind}'>{html.escape(text)}</p>" if kind else f"<p>{html.escape(text)}</p>"


def summary_section(board: Leaderboard, frame: pd.DataFrame, space: dict) -> str:
    counts = frame["outcome"].value_counts().to_dict()
    ended = ", ".join(f"{counts.get(o, 0)} {o.replace('_', ' ')}" for o in (COMPLETED, STOPPED_EARLY, CUT_BY_BUDGET, FAILED)
                      if counts.get(o) or o != CUT_BY_BUDGET)
    parts = [para(f"Dataset {space.get('dataset', '?')}; {len(frame)} trials: {ended}. Selection: {board.objective} on "
                  f"validation ({'higher' if board.mode == 'max' else 'lower'} is better). Test metrics are reported, never "
                  "used to choose.")]
    if board.winner is None:
        parts.append(para("No trial trained to the end: nothing was tested and there is no winner. The views below "
                          f"show how far the trials got; resume with python tune.py --resume {board.name}.", "warning"))
    header, rows = leaderboard_cells(board, len(board.rows))
    parts += [para(leaderboard_intro(board).replace("`", "")), table(header, rows, "(winner)")]
    return section("Leaderboard", *parts)


def winner_section(board: Leaderboard, keys: list[str]) -> str:
    """The winner's searched values, whole logged config and every test metric with its CI."""
    if board.winner is None:
        return ""
    run = board.winner
    searched = ", ".join(f"{k} = {short(run.data.params.get(k))}" for k in keys) or "nothing searched"
    tested = winner_tests(board)
    config = "\n".join(f"{k}: {v}" for k, v in sorted(run.data.params.items()))
    return section("The winner", para(f"Trial {runs.trial_label(run)} (MLflow run {run.info.run_id}): {searched}. "
                                      f"{board.objective} = {short(run.data.metrics.get(board.objective))} on validation."),
                   table(["test metric (reported, never used to choose)", "value [95 % CI]"], [list(t) for t in tested])
                   if tested else para("No test predictions kept: python -m analysis.best re-scores the checkpoint."),
                   f"<details><summary>Config</summary><pre>{html.escape(config)}</pre></details>")


def trials_section(frame: pd.DataFrame, keys: list[str], objective: str, histories: dict, rungs: list[int]) -> str:
    """Every trial, with what ASHA decided about it at each rung."""
    header = ["trial", "outcome", "ASHA decisions", *keys, objective, "epochs", "test_acc", "test_auc",
              *views.COSTS, "MLflow run"]
    rows = []
    for row in frame.to_dict("records"):
        decisions = views.rung_decisions(histories.get(row["run_id"], []), row["outcome"], rungs)
        rows.append([row["trial"], row["outcome"].replace("_", " "), views.decision_text(decisions),
                     *[_cell(row.get(k)) for k in keys], _cell(row.get(objective)), _cell(row.get("epochs")),
                     _cell(row.get("test_acc")), _cell(row.get("test_auc")),
                     *[_cell(row.get(c), views.compact) for c in views.COSTS], row["run_id"]])
    return section("Every trial", para(f"ASHA's rungs (epochs where it compares trials): {rungs or 'none'}."),
                   table(header, rows))


def _cell(value, number=short) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return number(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else str(value)


def _title(section_html: str) -> str:
    start = section_html.find("<h2>")
    return html.unescape(section_html[start + 4:section_html.find("</h2>")]) if start >= 0 else ""


def html_page(title: str, sections: list[str]) -> str:
    style = ("body{font-family:system-ui,sans-serif;margin:1.5em auto;max-width:1200px;color:#222;padding:0 1em}"
             "table{border-collapse:collapse;font-size:13px;margin:.5em 0}th,td{border:1px solid #ccc;padding:3px 7px;"
             "text-align:left}th{background:#f3f3f3}tr.winner{background:#fff4c2;font-weight:600}"
             "img{max-width:100%}pre{background:#f6f6f6;padding:.6em;overflow-x:auto}.warning{background:#fff0e0;"
             "border-left:4px solid #e67e22;padding:.4em .7em}section{margin-bottom:2.2em}h2{border-bottom:1px solid #ddd}"
             ".wide{overflow-x:auto}td{white-space:nowrap}nav{font-size:14px;line-height:1.8}")
    return (f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            f"<style>{style}</style></head><body><h1>{html.escape(title)}</h1>{''.join(sections)}</body></html>")


def history_section(frame: pd.DataFrame, board: Leaderboard, out: Path) -> str:
    views.plot_history(frame, board.objective, board.mode, _winner(board), out / "history.png")
    return section("Optimisation history", png(out / "history.png"))


def curves_section(frame: pd.DataFrame, board: Leaderboard, metric: str, histories: dict, rungs: list[int],
                   plotly: Plotly) -> str:
    fig = views.learning_curves_figure(frame, histories, rungs, metric, board.keys, _winner(board))
    return section("Learning curves and ASHA's decisions",
                   para(f"{metric} per epoch for every trial. ASHA compares trials at its rungs (epochs {rungs}); a green "
                        "circle marks a trial it kept there, a red cross one it stopped. Hover a curve for the trial."),
                   plotly(fig))


def parallel_section(frame: pd.DataFrame, board: Leaderboard, space: dict, plotly: Plotly) -> str:
    log_keys = {k for k in board.keys if "loguniform" in _domain(space, k)}
    fig = views.parallel_coordinates_figure(frame, board.keys, log_keys, board.objective, board.mode)
    if fig is None:
        return section("Parallel coordinates", para("No trial has a validation score yet."))
    return section("Parallel coordinates", para("Drag along an axis to keep a range of it; the outcome axis separates "
                                                "completed trials from those ASHA stopped."), plotly(fig))


def importance_section(study: optuna.Study, importance: pd.Series, note: str | None, objective: str,
                       plotly: Plotly) -> str:
    completed = len(study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,)))
    if note:
        return section("Hyperparameter importance", para(f"Not computed: {note}."))
    warning = views.importance_warning(completed)
    return section("Hyperparameter importance",
                   para(f"fANOVA (Optuna) on {completed} completed trials; ASHA-stopped trials are left out, as Optuna "
                        "leaves out pruned ones."), *([para(warning, "warning")] if warning else []),
                   plotly(views.importance_figure(study, objective)))


def cost_section(frame: pd.DataFrame, board: Leaderboard, out: Path) -> str:
    if not views.plot_cost(frame, board.objective, board.mode, _winner(board), out / "cost.png"):
        return section("Validation score against cost", para("No trial logged params_total or flops_per_image."))
    return section("Validation score against cost", para(
        "Cost as each trial logged it (parameters; FLOPs of one forward pass). The Pareto front joins the completed "
        "trials no other completed trial beats on both cost and score."), png(out / "cost.png"))


def _winner(board: Leaderboard) -> str | None:
    return runs.trial_label(board.winner) if board.winner is not None else None


def build_report(client, parent, out: Path, metric: str = "test_acc", board: Leaderboard | None = None) -> dict:
    """Write the report folder; returns what the CLI prints (tables, importance). A search without any trial is
    a UserError; one without a finished trial gets its report, which says so."""
    name = parent.data.tags.get(TAG_SEARCH, parent.info.run_id)
    space = runs.search_space(client, parent)
    keys = searched_keys(space)
    objective, mode = runs.selection(parent, space)
    frame = trials_frame(client, parent, space, keys, objective, metric)
    if frame.empty:
        raise UserError(f"Search {name!r} has no trial logged yet; resume it (python tune.py --resume {name}) or run a "
                        "new search")
    board = board or read_leaderboard(client, parent)
    out.mkdir(parents=True, exist_ok=True)

    frame.to_csv(out / "trials.csv", index=False)
    tables = study_tables(frame, categorical_keys(frame, space, keys), [metric, objective])
    study = rebuild_study(frame, space, keys, objective)
    importance, note = importances(study)
    importance.to_csv(out / "importance.csv", header=True)
    if not importance.empty:
        plot_importance(importance, objective, out / "importance.png")
    plot_metric_vs_params(frame, space, keys, objective, metric, out / "metric_vs_params.png")
    write_tables(out / "tables.md", name, frame, tables, importance, note, objective)

    scheduler = space.get("scheduler") or {}
    rungs = views.asha_rungs(scheduler["max_t"], scheduler["grace_period"], scheduler["reduction_factor"]) \
        if {"max_t", "grace_period", "reduction_factor"} <= set(scheduler) else []
    histories = metric_histories(client, frame, space.get("metric") or objective)
    plotly = Plotly()
    sections = [summary_section(board, frame, space), winner_section(board, keys), history_section(frame, board, out),
                curves_section(frame, board, space.get("metric") or objective, histories, rungs, plotly),
                parallel_section(frame, board, space, plotly),
                importance_section(study, importance, note, objective, plotly), cost_section(frame, board, out),
                section(f"{objective} and {metric} against every searched value", png(out / "metric_vs_params.png")),
                trials_section(frame, keys, objective, histories, rungs),
                section("Study tables (completed trials)", *[f"<h3>{html.escape(t)}</h3>{df.round(4).to_html()}"
                                                             for t, df in tables] or [para("No categorical value varied.")]),
                section("Leak check", *([para("Leaked: the same image (or patient) sits in two splits; see the counts.",
                                              "warning")] if "LEAK" in board.leak.splitlines()[0] else []),
                        f"<pre>{html.escape(board.leak)}</pre>"),
                section("Export the winner", para(export_section(board)[1].replace("`", "")),
                        f"<pre>{html.escape(chr(10).join(export_commands(board)))}</pre>") if board.winner is not None else ""]
    titles = [t for t in (_title(part) for part in sections) if t]
    (out / PAGE).write_text(html_page(f"medtune search {name}", [contents(titles), *sections]), encoding="utf-8")
    return {"name": name, "tables": tables, "importance": importance, "note": note, "objective": objective,
            "completed": int((frame["outcome"] == COMPLETED).sum())}


def log_report(client, parent_id: str, out: Path) -> None:
    client.log_artifacts(parent_id, str(out), artifact_path="report")


def report_after_search(client, parent_id: str, board: Leaderboard | None = None, out: Path | None = None) -> Path:
    """tune.py's end of search: write reports/<search>/ and log it to the parent run; one line printed."""
    parent = client.get_run(parent_id)
    out = out or Path("reports") / parent.data.tags.get(TAG_SEARCH, parent_id)
    made = build_report(client, parent, out, board=board)
    log_report(client, parent_id, out)
    unfinished = "" if made["completed"] else " (no trial trained to the end: it says so)"
    print(f"report:   {out / PAGE}{unfinished}; logged to the parent run under report/")
    return out / PAGE


def report(args) -> int:
    client = runs.connect(args.tracking_uri)
    parent = runs.get_search(client, args.search)
    name = parent.data.tags.get(TAG_SEARCH, parent.info.run_id)
    out = Path(args.out or Path("reports") / name)
    made = build_report(client, parent, out, args.metric)
    tables = made["tables"]
    for title, table_ in tables[:1] + [t for t in tables if " x " in t[0]][:1]:
        print(f"{title}:\n{table_.round(4).to_string()}\n")
    print(f"fANOVA importance for {made['objective']}: {importance_text(made['importance'], made['note'], made['completed'])}")
    if not made["completed"]:
        print(f"no trial of search {name!r} trained to the end: the report shows how far they got, and no winner")
    if not args.no_log:
        log_report(client, parent.info.run_id, out)
    print(f"wrote {out / PAGE} and {len(list(out.iterdir())) - 1} more files"
          + ("" if args.no_log else f"; logged to run {parent.info.run_id} under report/"))
    return 0


def main(argv=None) -> int:
    args = get_args_parser().parse_args(argv)
    return runs.run_cli(lambda: report(args), args.debug)


if __name__ == "__main__":
    sys.exit(main())

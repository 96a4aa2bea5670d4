"""The study report's page: HTML pieces (tables, sections, contents, the page itself) and one section per view.

Every section takes the trials table (analysis.report_data.trials_frame) and the leaderboard
(analysis.description) and returns escaped HTML; images are inlined and plotly.js is inlined once, so the page
is one file that works offline and in MLflow's artifact viewer.
"""

from __future__ import annotations

import base64
import html
import math
from pathlib import Path

import optuna
import pandas as pd

from analysis import runs, views
from analysis.description import Leaderboard, leaderboard_cells, leaderboard_intro, winner_tests
from analysis.report_data import domain
from trainables.tracking.ranking import COMPLETED, CUT_BY_BUDGET, FAILED, STOPPED_EARLY
from trainables.tracking.text import fmt


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
    searched = ", ".join(f"{k} = {fmt(run.data.params.get(k))}" for k in keys) or "nothing searched"
    tested = winner_tests(board)
    config = "\n".join(f"{k}: {v}" for k, v in sorted(run.data.params.items()))
    return section("The winner", para(f"Trial {runs.trial_label(run)} (MLflow run {run.info.run_id}): {searched}. "
                                      f"{board.objective} = {fmt(run.data.metrics.get(board.objective))} on validation."),
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


def _cell(value, number=fmt) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return number(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else str(value)


def title_of(section_html: str) -> str:
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
    log_keys = {k for k in board.keys if "loguniform" in domain(space, k)}
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

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

This module is the command and the build; the trials table, study tables and importance: analysis.report_data;
the page's HTML: analysis.report_html; the plots: analysis.views.
"""

from __future__ import annotations

import argparse
import html
import sys
from pathlib import Path

from analysis import runs, views
from analysis.description import Leaderboard, export_commands, export_section, read_leaderboard
from analysis.report_data import (
    categorical_keys,
    domain,
    importance_text,
    importances,
    metric_histories,
    rebuild_study,
    study_tables,
    trials_frame,
    write_tables,
)
from analysis.report_html import (
    Plotly,
    contents,
    cost_section,
    curves_section,
    history_section,
    html_page,
    importance_section,
    para,
    parallel_section,
    png,
    section,
    summary_section,
    title_of,
    trials_section,
    winner_section,
)
from trainables.errors import UserError
from trainables.tracking.mlflow_runs import TAG_SEARCH
from trainables.tracking.ranking import COMPLETED
from trainables.tracking.searched import searched_keys

PAGE = "report.html"


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Tables, fANOVA importance and plots for a finished search.")
    runs.add_common_args(parser)
    parser.add_argument("--out", help="folder to write (default reports/<search>)")
    parser.add_argument("--metric", default="test_acc", help="test metric of the study tables (default test_acc)")
    parser.add_argument("--no-log", action="store_true", help="do not log the folder to the parent MLflow run")
    return parser


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
        views.plot_importance(importance, objective, out / "importance.png")
    views.plot_metric_vs_params(frame, keys, {k for k in keys if "choice" in domain(space, k)},
                                {k for k in keys if "loguniform" in domain(space, k)}, objective, metric,
                                out / "metric_vs_params.png")
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
    titles = [t for t in (title_of(part) for part in sections) if t]
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

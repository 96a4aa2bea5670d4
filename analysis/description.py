"""The search's own page in MLflow: a Markdown description on its parent run (`mlflow.note.content`).

    python -m analysis.description --search smoke-20261121-101500     # rewrite it (tune.py does, at every end)

The UI shows it under the run's name: the leaderboard by validation (test metrics with 95 % CIs beside it,
reported, never used to choose), the winner's weakest subgroup (analysis.subgroups), the winner's config, how the
trials ended, the leak report and the commands that export the winner. The CIs are bootstraps over the test
predictions each finished trial keeps (trainables.training.figures.PREDICTIONS: with the test images' attributes,
sex / age / view, where the dataset has them), so writing the page needs neither the checkpoints nor the data.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
from dataclasses import dataclass, field

from mlflow.utils.mlflow_tags import MLFLOW_RUN_NOTE
from mlflow.utils.validation import MAX_TAG_VAL_LENGTH

from analysis import runs
from analysis.bootstrap import format_ci, interval_metric_names, metrics_with_ci
from analysis.subgroups import weakest_group, weakest_text
from trainables.data.leaks import format_leak_report
from trainables.tracking.names import (
    PREDICTIONS,
    TAG_BEST_RUN,
    TAG_CHECKPOINT,
    TAG_ERROR,
    TAG_HANDOVER,
    TAG_OUTCOME,
    TAG_SEARCH,
)
from trainables.tracking.ranking import COMPLETED, CUT_BY_BUDGET, FAILED, OUTCOMES, STOPPED_EARLY, leaderboard
from trainables.tracking.searched import searched_keys
from trainables.tracking.text import CELL_PAD, fmt, markdown_table
from trainables.training.figures import read_test_predictions

UNFINISHED = "unfinished"  # no outcome tag: killed mid-trial and not resumed
TAG_TEST_CI = "medtune.test_ci95"  # on a finished trial's run: its bootstrap CIs (JSON), computed once
TAG_WEAKEST = "medtune.weakest_subgroup"  # on the winner's run: its weakest subgroup's row (JSON), computed once
TOP = 10  # leaderboard rows
CI_TRIALS = 3  # finished trials that get bootstrap CIs (the others show logged values): ~4 s each on 624 images
CI_RESAMPLES = 1000
CONFIG_INTRO = "Config (every key the search set; the others are medtune's defaults, logged in the trial's checkpoint):"
LEADERBOARD_TESTS = ("acc", "auc")  # test columns of the leaderboard; the winner's section lists every metric
LEAK_FILE = "leak_report.json"  # logged on the parent run by tune.py
LABELS = {"acc": "accuracy", "balanced_acc": "balanced accuracy", "auc": "AUC", "sensitivity": "sensitivity",
          "specificity": "specificity", "exact_match": "exact match"}


@dataclass
class Leaderboard:
    """What the page (and the study report) say about a search, read once from MLflow."""
    name: str
    parent_id: str
    tracking_uri: str
    objective: str  # best_<metric>: the validation score trials are ranked by
    mode: str
    keys: list[str]  # the searched config keys
    max_t: int | None  # epochs a trial trains when ASHA lets it
    trials: list  # every trial run
    rows: list  # the trials in leaderboard order: completed or cut by budget, then stopped early
    winner: object | None  # the run tune.py named best, or None
    cis: dict = field(default_factory=dict)  # run id -> {metric: {"value", "low", "high"}}
    n_test: int | None = None  # test images the CIs rest on
    n_resamples: int = CI_RESAMPLES
    leak: str = ""  # the leak report, as the terminal showed it
    handover: dict | None = None  # what tune.py --ensemble / analysis.export last handed over (TAG_HANDOVER)
    weakest: dict | None = None  # the winner's weakest test subgroup (analysis.subgroups.weakest_group), if any


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Write a search's description (leaderboard, winner) on its MLflow run.")
    runs.add_common_args(parser)
    parser.add_argument("--print", action="store_true", help="also print the Markdown")
    return parser


# --- reading the search ------------------------------------------------------------------------------

def outcome_of(run) -> str:
    return run.data.tags.get(TAG_OUTCOME) or UNFINISHED


def leaderboard_order(trials: list, objective: str, mode: str) -> list:
    """Completed trials and those the time budget cut first (they can win), then those ASHA stopped; each group by
    the validation score with trainables.tracking.ranking.rank, the rule tune.py chose the winner by. Failed trials have no score."""
    return leaderboard(trials, outcome_of, lambda r: r.data.metrics.get(objective, math.nan), mode, tie=runs.trial_label)


def kept_predictions(client, run) -> dict | None:
    """The test predictions a finished trial kept; None for a trial logged before trials kept them."""
    return runs.kept_file(client, run, PREDICTIONS, read_test_predictions)


def trial_cis(client, run, n_resamples: int = CI_RESAMPLES) -> tuple[dict | None, int | None]:
    """({metric: ci}, test images) for a finished trial, from its kept predictions. Seeded, so the result is kept
    on the run (TAG_TEST_CI) and a rewrite (a resume, `analysis.report`) does not bootstrap the same trial again."""
    cis, n_test = cached_cis(run, n_resamples)
    if cis is not None:
        return cis, n_test
    kept = kept_predictions(client, run)
    if kept is None:
        return None, None
    cis, n_test = metrics_with_ci(kept["task"], kept["labels"], kept["probs"], n_resamples=n_resamples), len(kept["labels"])
    client.set_tag(run.info.run_id, TAG_TEST_CI, json.dumps({"n_resamples": n_resamples, "n": n_test, "metrics": cis}))
    return cis, n_test


def cached_cis(run, n_resamples: int) -> tuple[dict | None, int | None]:
    """The CIs an earlier page computed for this trial with the same number of resamples, else (None, None)."""
    try:
        kept = json.loads(run.data.tags.get(TAG_TEST_CI) or "{}")
    except ValueError:  # a damaged tag: compute again
        return None, None
    if kept.get("n_resamples") != n_resamples or not isinstance(kept.get("metrics"), dict):
        return None, None
    return kept["metrics"], kept.get("n")


def leak_text(client, parent) -> str:
    """The leak report as tune.py printed it, rebuilt from the parent's leak_* metrics and leak_report.json."""
    counts = {k: int(v) for k, v in parent.data.metrics.items() if k.startswith("leak_")}
    if "leak_dup_cross_split" not in counts:
        return "No leak report was logged with this search."
    detail = {"sizes": {}, "duplicates": [], "notes": []}
    if LEAK_FILE in {a.path for a in client.list_artifacts(parent.info.run_id)}:
        with tempfile.TemporaryDirectory() as directory:
            with open(client.download_artifacts(parent.info.run_id, LEAK_FILE, directory)) as handle:
                detail |= json.load(handle)
    try:
        return format_leak_report({**counts, "leak_detail": detail})
    except KeyError as error:  # a search logged by an older medtune, with fewer counts
        return f"Leak check: counts incomplete ({error} missing); see this run's leak_* metrics and {LEAK_FILE}."


def read_leaderboard(client, parent, ci_trials: int = CI_TRIALS, n_resamples: int = CI_RESAMPLES) -> Leaderboard:
    """The search as the page shows it; CIs for the `ci_trials` best finished trials that kept predictions."""
    space = runs.search_space(client, parent)
    objective, mode = runs.selection(parent, space)
    trials = runs.trials(client, parent)
    best_id = parent.data.tags.get(TAG_BEST_RUN)
    board = Leaderboard(name=parent.data.tags.get(TAG_SEARCH, parent.info.run_id), parent_id=parent.info.run_id,
                        tracking_uri=client.tracking_uri, objective=objective, mode=mode, keys=searched_keys(space),
                        max_t=(space.get("scheduler") or {}).get("max_t"),
                        trials=trials, rows=leaderboard_order(trials, objective, mode),
                        winner=next((t for t in trials if t.info.run_id == best_id), None), leak=leak_text(client, parent),
                        n_resamples=n_resamples, handover=handover_of(parent))
    for run in [r for r in board.rows if outcome_of(r) == COMPLETED][:ci_trials]:
        cis, n_test = trial_cis(client, run, n_resamples)
        if cis is not None:
            board.cis[run.info.run_id], board.n_test = cis, n_test
    if board.winner is not None and outcome_of(board.winner) == COMPLETED:
        board.weakest = winner_weakest(client, board.winner, n_resamples)
    return board


def winner_weakest(client, run, n_resamples: int = CI_RESAMPLES) -> dict | None:
    """The winner's weakest test subgroup from its kept predictions and the test images' attributes (None for a
    dataset without attributes, or a trial from before trials kept them); kept on the run (TAG_WEAKEST)."""
    try:
        cached = json.loads(run.data.tags.get(TAG_WEAKEST) or "{}")
    except ValueError:  # a damaged tag: compute again
        cached = {}
    if cached.get("n_resamples") == n_resamples:
        return cached.get("row")
    kept = kept_predictions(client, run)
    if kept is None:
        return None
    row = weakest_group(kept["task"], kept["class_names"], kept["labels"], kept["probs"], kept["attributes"],
                        n_resamples)
    client.set_tag(run.info.run_id, TAG_WEAKEST, json.dumps({"n_resamples": n_resamples, "row": row}))
    return row


def handover_of(parent) -> dict | None:
    """The hand-over kept on the parent run (analysis.handover.record_on_search), None without one."""
    try:
        record = json.loads(parent.data.tags.get(TAG_HANDOVER) or "null")
    except ValueError:  # a damaged tag: say nothing rather than something wrong
        return None
    return record if isinstance(record, dict) and record.get("members") else None


# --- the Markdown ------------------------------------------------------------------------------------

def task_of(board: Leaderboard) -> str | None:
    """The task, known from the CI metric names (binary has sensitivity; multi-label exact match)."""
    names = set(next(iter(board.cis.values()), {}))
    return None if not names else "binary" if "sensitivity" in names else "multilabel" if "exact_match" in names \
        else "multiclass"


def tested_cell(board: Leaderboard, run, name: str) -> str:
    """`0.846 [0.818, 0.873]` with a CI, the logged value without one, `-` for a trial that was never tested."""
    cis = board.cis.get(run.info.run_id)
    if cis and name in cis:
        return format_ci(cis[name])
    value = run.data.metrics.get(f"test_{name}")
    return "-" if value is None else f"{value:.3f}"


def epochs_cell(run, max_t: int | None) -> str:
    """`3/3`, `1/3 stopped by ASHA` or `2/3 cut by budget`: how far the trial trained and why it ended there."""
    epochs = run.data.metrics.get("epoch")
    done = "?" if epochs is None else str(int(epochs))
    of = f"{done}/{max_t}" if max_t else done
    return {COMPLETED: of, STOPPED_EARLY: f"{of} stopped by ASHA", CUT_BY_BUDGET: f"{of} cut by budget",
            FAILED: f"{of} failed"}.get(outcome_of(run), f"{of} unfinished")


def direction(mode: str) -> str:
    return "higher is better" if mode == "max" else "lower is better"


def headline(board: Leaderboard) -> list[str]:
    if board.winner is None:
        return [f"## Search `{board.name}`: no winner yet",
                "No trial trained to the end, so nothing was tested and nothing can be picked. "
                f"Resume the search (`python tune.py --resume {board.name}`) or give trials more epochs."]
    label = runs.trial_label(board.winner)
    line = [f"## Search `{board.name}`: winner `{label}`",
            f"Chosen on validation: `{board.objective}` = {fmt(board.winner.data.metrics.get(board.objective))} "
            f"({direction(board.mode)})."]
    cis = board.cis.get(board.winner.info.run_id)
    if cis:
        shown = [n for n in ("auc", "acc") if n in cis]
        line.append("Test (reported, never used to choose): " +
                    ", ".join(f"{LABELS[n]} {format_ci(cis[n])}" for n in shown) + " (95 % CI).")
    if board.weakest is not None:
        line.append(f"Weakest test subgroup (reported, never used to choose; groups under 30 images are not scored): "
                    f"{weakest_text(board.weakest)}.")
    return line


def leaderboard_cells(board: Leaderboard, top: int = TOP) -> tuple[list[str], list[list[str]]]:
    """(header, rows) of the leaderboard as plain text: the page and the study report show the same table."""
    header = ["#", "trial", *board.keys, f"{board.objective} (validation)", "epochs",
              *[f"test {LABELS[n]} (reported)" for n in LEADERBOARD_TESTS]]
    rows = []
    for place, run in enumerate(board.rows[:top], 1):
        trial = runs.trial_label(run) + (" (winner)" if _same(run, board.winner) else "")
        rows.append([str(place), trial, *[fmt(run.data.params.get(k)) for k in board.keys],
                     fmt(run.data.metrics.get(board.objective)), epochs_cell(run, board.max_t),
                     *[tested_cell(board, run, n) for n in LEADERBOARD_TESTS]])
    return header, rows


def leaderboard_intro(board: Leaderboard) -> str:
    return (f"Ordered by `{board.objective}` on validation ({direction(board.mode)}): trials that trained to the end "
            "or were cut by the time budget first (only they can win; a cut trial was not tested), then those ASHA "
            f"stopped. Test columns are reported, never used to choose: value [95 % CI]{ci_note(board)}.")


def leaderboard_table(board: Leaderboard, top: int = TOP) -> list[str]:
    header, rows = leaderboard_cells(board, top)
    lines = ["### Leaderboard", leaderboard_intro(board), "", *markdown_table(header, rows, cell_end=CELL_PAD, bold=_winner_row)]
    if len(board.rows) > top:
        lines.append(f"\n{len(board.rows) - top} more trials: `python -m analysis.best --search {board.name} --top "
                     f"{len(board.rows)}`, or the study report.")
    return lines


def ci_note(board: Leaderboard) -> str:
    if not board.cis:
        return " (no CI: the trials kept no test predictions; `python -m analysis.best` replays them)"
    return (f", percentile bootstrap over the {board.n_test} test images, {board.n_resamples} resamples, for the "
            f"{len(board.cis)} best finished trial(s); others show the logged value")


def _same(run, other) -> bool:
    return other is not None and run.info.run_id == other.info.run_id


def winner_section(board: Leaderboard) -> list[str]:
    if board.winner is None:
        return []
    run, metrics = board.winner, board.winner.data.metrics
    searched = ", ".join(f"`{k}` = {fmt(run.data.params.get(k))}" for k in board.keys) or "(nothing searched)"
    lines = ["### The winner's config",
             f"Trial `{runs.trial_label(run)}`, MLflow run `{run.info.run_id}`: {searched}; best validation at epoch "
             f"{fmt(metrics.get('best_epoch'))} of {fmt(metrics.get('epoch'))}."]
    tested = winner_tests(board)
    if tested:
        lines += ["", *markdown_table(["test metric (reported)", "value [95 % CI]"], [list(t) for t in tested],
                                         cell_end=CELL_PAD)]
    config = "\n".join(f"{k}: {v}" for k, v in sorted(run.data.params.items()))
    lines += ["", CONFIG_INTRO, "```yaml", config, "```"]
    if run.data.tags.get(TAG_CHECKPOINT):
        lines.append(f"Checkpoint: `{run.data.tags[TAG_CHECKPOINT]}`")
    return lines


def winner_tests(board: Leaderboard) -> list[tuple[str, str]]:
    """[(metric, `value [low, high]`)] of the winner on test, every metric of its task; [] without CIs."""
    cis = board.cis.get(board.winner.info.run_id) if board.winner is not None else None
    if not cis:
        return []
    return [(LABELS.get(n, n), format_ci(cis[n])) for n in interval_metric_names(task_of(board)) if n in cis]


def handover_section(board: Leaderboard) -> list[str]:
    """The model handed over (tune.py --ensemble or analysis.export, the latest): members, weights and why."""
    record = board.handover
    if record is None:
        return []
    members = ", ".join(f"`{m['label']}` (weight {m['weight']:.2f})" for m in record["members"])
    return ["### Hand-over (the model that ships)",
            f"**{record['variant']}**: {members}.", f"Why: {record['reason']}.", f"Rule: {record['rule']}."]


def outcomes_section(board: Leaderboard) -> list[str]:
    ended = [outcome_of(t) for t in board.trials]
    parts = [f"{ended.count(o)} {o.replace('_', ' ')}" for o in (*OUTCOMES, UNFINISHED)
             if ended.count(o) or o in (COMPLETED, STOPPED_EARLY, FAILED)]
    cut = "; cut by budget = running when the search's time budget was spent, its finished epochs count" \
        if CUT_BY_BUDGET in ended else ""
    lines = ["### How the trials ended",
             f"{len(ended)} trials: {', '.join(parts)} (stopped early = by ASHA, on validation{cut})."]
    for run in (t for t in board.trials if outcome_of(t) == FAILED):
        error = (run.data.tags.get(TAG_ERROR) or "no error recorded").replace("|", "\\|")[:200]
        lines.append(f"- `{runs.trial_label(run)}` failed: {error}")
    return lines


def leak_section(board: Leaderboard) -> list[str]:
    first, *rest = board.leak.splitlines() or [""]
    return ["### Leak check (train / validation / test)", f"**{first}**", *[f"- {line.strip()}" for line in rest]]


def export_commands(board: Leaderboard) -> list[str]:
    """The shell lines that read this search back and export its winner (MLflow's own variable names the store)."""
    return [f"export MLFLOW_TRACKING_URI={board.tracking_uri}",
            f"python -m analysis.best --search {board.name}",
            f"python -m analysis.export --search {board.name} --out exported/{board.name}",
            f"python -m analysis.report --search {board.name}"]


def export_section(board: Leaderboard) -> list[str]:
    if board.winner is None:
        return []
    return ["### Export the winner",
            "`analysis.best` re-scores the top trials from their checkpoints; `analysis.export` writes the winner's "
            "weights, preprocessing, decision threshold and model card; `analysis.report` rewrites the study report "
            "(artifact `report/report.html` of this run).",
            "```", *export_commands(board), "```"]


def markdown(board: Leaderboard, top: int = TOP, config: bool = True) -> str:
    """The page; `config=False` leaves out the winner's whole config (to fit MLflow's tag size)."""
    winner = winner_section(board)
    if not config and winner:
        winner = winner[:winner.index(CONFIG_INTRO)] + \
            ["Whole config: this run's trial, Parameters tab."]
    sections = [headline(board), handover_section(board), leaderboard_table(board, top), winner, outcomes_section(board),
                leak_section(board),
                export_section(board)]
    return "\n\n".join("\n".join(s) for s in sections if s) + "\n"


def fitted_markdown(board: Leaderboard) -> str:
    """The longest page that fits in an MLflow tag: drop the whole config first, then leaderboard rows."""
    text = markdown(board)
    top = TOP
    while len(text) > MAX_TAG_VAL_LENGTH and top > 1:
        text = markdown(board, top, config=False)
        top -= 1
    return text[:MAX_TAG_VAL_LENGTH]


def write_description(client, parent_id: str, board: Leaderboard | None = None) -> Leaderboard:
    """Set the parent run's description; returns what it says (the report reuses it, CIs included)."""
    board = board or read_leaderboard(client, client.get_run(parent_id))
    client.set_tag(parent_id, MLFLOW_RUN_NOTE, fitted_markdown(board))
    return board


def describe(args) -> int:
    client = runs.connect(args.tracking_uri)
    parent = runs.get_search(client, args.search)
    board = write_description(client, parent.info.run_id, read_leaderboard(client, parent))
    if args.print:
        print(fitted_markdown(board))
    print(f"wrote the description of search {board.name!r} (run {board.parent_id})")
    return 0


def main(argv=None) -> int:
    args = get_args_parser().parse_args(argv)
    return runs.run_cli(lambda: describe(args), args.debug)


if __name__ == "__main__":
    sys.exit(main())


def _winner_row(row: list) -> bool:
    return any(str(cell).endswith("(winner)") for cell in row)

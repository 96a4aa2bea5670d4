"""The top trials of a search: validation score, test metrics with 95 % bootstrap CIs, the params that differ.

    python -m analysis.best --search smoke-20261121-101500 --top 5

Trials are ranked by the validation score tune.py optimised (never by test): `best_<metric>`, highest
first for mode max, lowest first for mode min. Test intervals need the per-image predictions: finished trials
keep them beside their checkpoint (logged to MLflow); for a trial from before that, its best checkpoint is scored
on the test split again, on the trial's own device and precision where this machine has them (analysis.replay;
the `logged` column lets you check).
"""

from __future__ import annotations

import argparse
import sys

import pandas as pd

from analysis import runs
from analysis.bootstrap import format_ci, metrics_with_ci
from analysis.description import kept_predictions
from analysis.replay import replay
from trainables.errors import UserError
from trainables.tracking.names import TAG_SEARCH
from trainables.tracking.ranking import RANKED
from trainables.tracking.searched import searched_keys
from trainables.tracking.text import fmt
from trainables.training.metrics import probabilities

SHOWN = {"binary": ("acc", "auc", "sensitivity", "specificity"), "multiclass": ("acc", "balanced_acc", "auc"),
         "multilabel": ("acc", "exact_match", "auc")}


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Top trials of a search with test metrics and bootstrap CIs.")
    runs.add_common_args(parser)
    parser.add_argument("--top", type=int, default=5, help="how many trials to list")
    parser.add_argument("--n-resamples", type=int, default=1000, help="bootstrap resamples per trial")
    parser.add_argument("--seed", type=int, default=0, help="bootstrap seed")
    parser.add_argument("--no-ci", action="store_true", help="logged metrics only (no checkpoint or data needed)")
    parser.add_argument("--data-root", help="where the dataset lives now (default: each trial's data_root)")
    parser.add_argument("--csv", help="also write the table to this CSV file")
    return parser


def differing(rows: list, keys: list[str]) -> list[str]:
    """Of `keys`, those whose logged value is not the same in every run of `rows`."""
    return [k for k in keys if len({r.data.params.get(k) for r in rows}) > 1] if len(rows) > 1 else keys


def test_cis(client, run, data_root: str | None, n_resamples: int, seed: int) -> dict | None:
    """{metric: ci} on the test split: from the predictions the finished trial kept, else (a trial logged before
    trials kept them) by replaying its best checkpoint; None when neither is there."""
    kept = kept_predictions(client, run)
    if kept is not None:
        return metrics_with_ci(kept["task"], kept["labels"], kept["probs"], 0.5, n_resamples, seed=seed)
    try:
        state = runs.checkpoint_state(run)
    except UserError:
        return None
    rep = replay(state, data_root)
    logits, labels = rep.trial_logits(rep.test)
    return metrics_with_ci(rep.dataset.task, labels, probabilities(rep.dataset.task, logits), 0.5, n_resamples, seed=seed)


def best_table(client, parent, args) -> pd.DataFrame:
    space = runs.search_space(client, parent)
    ranked = runs.ranked_trials(client, parent, space)
    if not ranked:
        name = parent.data.tags.get(TAG_SEARCH)
        raise UserError(f"Search {name!r} has no trial that trained to the end or was cut by its time budget; resume "
                        f"it (python tune.py --resume {name}) or run a longer search")
    key, _ = runs.selection(parent, space)
    shown = ranked[:args.top]
    keys = searched_keys(space) or sorted({k for r in shown for k in r.data.params})
    columns = differing(shown, keys)
    best_id = parent.data.tags.get(runs.TAG_BEST_RUN)
    rows = []
    for rank, run in enumerate(shown, 1):
        m = run.data.metrics
        row = {"rank": rank, "trial": runs.trial_label(run) + (" *" if run.info.run_id == best_id else ""),
               **{k: fmt(run.data.params.get(k)) for k in columns}, key: f"{m[key]:.4f}"}
        cis = None if args.no_ci else test_cis(client, run, args.data_root, args.n_resamples, args.seed)
        if cis is None:  # --no-ci, or the checkpoint is gone: the logged point values
            row |= {f"test_{name}": f"{m[f'test_{name}']:.3f}" for name in ("acc", "auc") if f"test_{name}" in m}
        else:
            row |= {f"test_{name}": format_ci(cis[name]) for name in SHOWN[_task(cis)]}
        row["logged_test_acc"] = f"{m.get('test_acc', float('nan')):.4f}"
        rows.append(row)
    return pd.DataFrame(rows)


def _task(cis: dict) -> str:
    return "binary" if "sensitivity" in cis else "multilabel" if "exact_match" in cis else "multiclass"


def best(args) -> int:
    client = runs.connect(args.tracking_uri)
    parent = runs.get_search(client, args.search)
    table = best_table(client, parent, args)
    everything = runs.trials(client, parent)
    unfinished = sum(r.data.tags.get(runs.TAG_OUTCOME) not in RANKED for r in everything)
    test = "logged values" if args.no_ci else f"value [95% CI], percentile bootstrap, {args.n_resamples} resamples"
    print(f"search {parent.data.tags.get('medtune.search')} (run {parent.info.run_id}): top {len(table)} trials by "
          f"validation ({unfinished} of {len(everything)} stopped early or failed: not listed); * = the winner. "
          f"Test: {test}.")
    print(table.to_string(index=False))
    if args.csv:
        table.to_csv(args.csv, index=False)
        print(f"wrote {args.csv}")
    return 0


def main(argv=None) -> int:
    args = get_args_parser().parse_args(argv)
    return runs.run_cli(lambda: best(args), args.debug)


if __name__ == "__main__":
    sys.exit(main())

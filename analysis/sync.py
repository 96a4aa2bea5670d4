"""Log to MLflow what a search left in Ray storage but MLflow never got: Ray storage is the record.

    python -m analysis.sync --search smoke-20261121-101500 --storage medtune_results [--tracking-uri URI]

tune.py prints this command when its tracking server did not come back before the search ended. In order: the calls
the search queued while MLflow was away (to the server the search logged to only: they name its run ids); then, from
Ray storage, every trial MLflow lacks or left unfinished: its run (found by its `medtune.trial_id` tag, never made
twice), params (the trial's config), per-epoch metrics (its result.json), report files (its last checkpoint) and
how it ended; then the winner and the parent's metrics; then the description (and the study report) when anything
changed or it is missing. Running it again adds nothing. Pointed at another server with --tracking-uri, it rebuilds
the search there from Ray storage alone (all but the leak report, which needs the data).
"""

from __future__ import annotations

import argparse
import json
import sys
from types import SimpleNamespace

from mlflow.entities import RunTag
from mlflow.utils.mlflow_tags import MLFLOW_RUN_NOTE

from analysis import runs
from analysis.summary import publish, rank_results, result_outcome
from trainables.errors import UserError
from trainables.tracking.mlflow_runs import (
    OPERATIONS,
    RESULT_PARAMS,
    checkpoint_location,
    close_search,
    create_trial_run,
    find_search_run,
    find_trial_run,
    flat_params,
    get_experiment_id,
    log_checkpoint_files,
    numeric_metrics,
    search_client,
    search_params,
    search_tags,
    start_search_run,
    tracking_uri_from,
    winner_metrics,
    without_credentials,
)
from trainables.tracking.names import TAG_BEST_RUN, TAG_CHECKPOINT, TAG_ERROR, TAG_OUTCOME
from trainables.tracking.ranking import FAILED, reported_failure
from trainables.tracking.resilient import ResilientClient
from trainables.tracking.state import budget_spent, read_state, storage_root

ENDED = ("TERMINATED", "ERROR")  # Ray's statuses of a trial that will not train again


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Log to MLflow what a search left in Ray storage but MLflow never got.")
    parser.add_argument("--search", required=True, help="the search's name (as tune.py printed it)")
    parser.add_argument("--storage", default="medtune_results", help="the search's --storage (default ./medtune_results)")
    parser.add_argument("--tracking-uri", default=None,
                        help="MLflow tracking URI (default: the one the search logged to, from its state file)")
    parser.add_argument("--no-report", action="store_true", help="write the description but not the study report")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    return parser


def ray_trials(storage: str, name: str) -> list[SimpleNamespace]:
    """Every trial Ray saved of search `name`, as a Result-like record (metrics = its last result, config, error,
    checkpoint) with its Ray status and its per-epoch results; read without starting Ray."""
    from ray.tune import ExperimentAnalysis

    try:
        analysis = ExperimentAnalysis(f"{storage.rstrip('/')}/{name}")
    except (ValueError, OSError) as error:  # no experiment state saved yet
        raise UserError(f"Ray saved no results for search {name!r} in {storage} ({error}); nothing to sync") from error
    return [SimpleNamespace(trial_id=trial.trial_id, name=str(trial), status=trial.status, config=trial.config,
                            metrics=dict(trial.last_result or {}), checkpoint=trial.checkpoint,
                            error=_error(trial) if trial.status == "ERROR" else None,
                            epochs=epochs(trial.storage.storage_filesystem, trial.path))
            for trial in analysis.trials]


def _error(trial) -> str:
    """The last line of the error a trial ended on (as the search's callback tags it)."""
    error = trial.get_pickled_error()
    lines = str(error).strip().splitlines() if error is not None else []
    return lines[-1] if lines else "trial failed"


def epochs(filesystem, trial_path: str) -> dict[int, dict]:
    """The trial's per-epoch results from its result.json (the last one of a repeated epoch wins)."""
    try:
        with filesystem.open_input_stream(f"{trial_path}/result.json") as handle:
            lines = handle.read().decode().splitlines()
    except OSError:  # never reported: no file
        return {}
    rows = {}
    for line in lines:
        try:
            row = json.loads(line)
        except json.JSONDecodeError:  # a line cut short by a kill
            continue
        if "training_iteration" in row and not reported_failure(row):
            rows[int(row["training_iteration"])] = row
    return rows


def sync_trial(client, parent_id: str, search: str, trial, max_t: int, spent: bool) -> list[str]:
    """Bring the trial's run up to what Ray storage holds; what was done, in words (nothing: [])."""
    if not trial.epochs and trial.status not in ENDED:
        return []  # never started: no run to make
    done, run = [], find_trial_run(client, parent_id, trial.trial_id)
    if run is None:
        run_id = create_trial_run(client, parent_id, search, trial.trial_id, trial.name, flat_params(trial.config or {}))
        logged, params, done = set(), set(), ["created"]
    else:
        run_id, params = run.info.run_id, set(run.data.params)
        logged = {m.step for m in client.get_metric_history(run_id, "training_iteration")}
    missing = [step for step in sorted(trial.epochs) if step not in logged]
    for step in missing:
        row = trial.epochs[step]
        found = {key: row[key] for key in RESULT_PARAMS if key in row and key not in params}
        params |= set(found)
        client.log_batch(run_id, metrics=numeric_metrics(row, step, int(row.get("timestamp", 0) * 1000) or None),
                         params=flat_params(found))
    if missing:
        done.append(f"{len(missing)} epoch{'s' if len(missing) != 1 else ''}")
    closed = run is not None and run.info.status != "RUNNING" and TAG_OUTCOME in run.data.tags
    if trial.status in ENDED and not closed:
        done.append(close_trial(client, run_id, trial, max_t, spent))
    return done


def close_trial(client, run_id: str, trial, max_t: int, spent: bool) -> str:
    """How the trial ended, as the search's callback records it: outcome, report files and checkpoint, status."""
    ended = result_outcome(trial, max_t, spent)
    if ended == FAILED:
        error = reported_failure(trial.metrics) or trial.error or "trial failed"
        client.log_batch(run_id, tags=[RunTag(TAG_OUTCOME, FAILED), RunTag(TAG_ERROR, error[:5000])])
        client.set_terminated(run_id, status="FAILED")
        return "ended failed"
    tags = [RunTag(TAG_OUTCOME, ended)]
    uri = checkpoint_location(trial.checkpoint, trial.metrics)
    if uri is not None:
        tags.append(RunTag(TAG_CHECKPOINT, uri))
        log_checkpoint_files(client, run_id, uri)
    client.log_batch(run_id, tags=tags)
    client.set_terminated(run_id, status="FINISHED")
    return f"ended {ended.replace('_', ' ')}"


def parent_run(client, name: str, state: dict) -> tuple[str, bool]:
    """(the parent run's id, whether it was made now): a server that never saw the search gets one from the state."""
    found = find_search_run(client, name)
    if found is not None:
        return found.info.run_id, False
    space = state["space"]
    parent_id = start_search_run(client, get_experiment_id(client), name,
                                 search_tags(state["space_name"], space["dataset"], state["seed"]))
    client.log_dict(parent_id, space, "search_space.yaml")
    client.log_batch(parent_id, params=search_params({**space, "name": state["space_name"]}, state["seed"]))
    return parent_id, True


def sync(args) -> int:
    storage = storage_root(args.storage)
    state = read_state(args.storage, args.search)
    if state is None:
        raise UserError(f"No search named {args.search!r} in {storage}; check --search NAME and --storage")
    client = runs.connect(tracking_uri_from(args.tracking_uri or state["tracking_uri"]))
    own_server = client.tracking_uri == without_credentials(state["tracking_uri"])
    mlflow = search_client(client.tracking_uri, storage, args.search) if own_server else \
        ResilientClient(client.tracking_uri, operations=OPERATIONS)  # its queue names the search's own server's runs
    queued = len(mlflow.queue)
    if not mlflow.flush(wait=True):
        raise UserError(f"MLflow at {client.tracking_uri} still fails: {len(mlflow.queue)} queued calls are left in "
                        f"{mlflow.queue_file()}; run this again once it answers")
    space = state["space"]
    max_t = space["scheduler"]["max_t"]
    spent = budget_spent(state, space.get("time_budget"), 0.0)[1]
    parent_id, made = mlflow.attempt(parent_run, args.search, state)
    trials = ray_trials(storage, args.search)
    changes = [f"{queued} queued calls"] if queued else []
    changes += ["the parent run"] if made else []
    for trial in trials:
        done = mlflow.attempt(sync_trial, parent_id, args.search, trial, max_t, spent)
        if done:
            changes.append(f"{trial.trial_id}: {', '.join(done)}")
    ranked = rank_results(trials, space["metric"], space["mode"], max_t, spent)
    before = mlflow.attempt(lambda c: c.get_run(parent_id))
    best = ranked[0].metrics if ranked else {}
    ended = sorted(trial.trial_id for trial in trials if trial.status in ENDED)
    mlflow.attempt(close_search, parent_id, best.get("trial_id"), winner_metrics(best), ended)
    after = mlflow.attempt(lambda c: c.get_run(parent_id))
    if after.data.tags.get(TAG_BEST_RUN) != before.data.tags.get(TAG_BEST_RUN) or after.info.status != before.info.status:
        changes.append(f"winner {best.get('trial_id')}" if best else "the parent run ended")
    if changes or MLFLOW_RUN_NOTE not in after.data.tags:
        if not publish(mlflow, parent_id, report=not args.no_report):
            raise UserError(f"MLflow at {client.tracking_uri} did not take the search's description; run this again")
        changes.append("the description")
    if changes:
        print(f"synced search {args.search!r} to {client.tracking_uri}: " + "; ".join(changes))
    else:
        print(f"nothing to sync: MLflow at {client.tracking_uri} holds everything search {args.search!r} left in {storage}")
    return 0


def main(argv=None) -> int:
    args = get_args_parser().parse_args(argv)
    return runs.run_cli(lambda: sync(args), args.debug)


if __name__ == "__main__":
    sys.exit(main())

"""Read a finished search back from MLflow: its parent run, its trials, its winner, their checkpoints.

Every `analysis` CLI starts here; what cannot be found is a UserError that names the fix. The tags
are the contract written by `trainables.tracking.mlflow_runs` (not repeated here).
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import yaml

from trainables.errors import UserError
from trainables.tracking.mlflow_runs import check_tracking_uri, default_tracking_uri, find_search_run, trial_runs
from trainables.tracking.names import PARENT, TAG_BEST_RUN, TAG_CHECKPOINT, TAG_OUTCOME, TAG_ROLE, TAG_SEARCH, TAG_TRIAL
from trainables.tracking.ranking import RANKED, rank, selection_key
from trainables.training.checkpoint import FILENAME, load_checkpoint


def add_common_args(parser: argparse.ArgumentParser, search: bool = True) -> argparse.ArgumentParser:
    """--search, --tracking-uri and --debug, the same for every analysis CLI."""
    if search:
        parser.add_argument("--search", required=True, help="search name or the id of its parent MLflow run")
    parser.add_argument("--tracking-uri", default=None,
                        help="MLflow tracking URI (default sqlite:///mlflow.db in the current folder)")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    return parser


def run_cli(body: Callable[[], int], debug: bool) -> int:
    """Run a CLI body: a UserError becomes one `error: ...` line on stderr and exit code 2."""
    for library in ("mlflow", "optuna", "alembic"):
        logging.getLogger(library).setLevel(logging.DEBUG if debug else logging.WARNING)
    try:
        return body()
    except UserError as error:
        if debug:
            raise
        print(f"error: {error}", file=sys.stderr)
        return 2


def connect(tracking_uri: str | None):
    """A client for `tracking_uri` (default: ./mlflow.db) that has answered once."""
    uri = tracking_uri or default_tracking_uri()
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # no progress bars in CLI output
    try:
        return check_tracking_uri(uri)
    except ConnectionError as error:
        raise UserError(f"MLflow tracking server {uri} is unreachable ({error}); start it or pass a reachable "
                        "--tracking-uri") from error


def get_search(client, search: str):
    """The parent run of `search` (name or run id)."""
    parent = find_search_run(client, search)
    if parent is None:
        raise UserError(f"No search {search!r} in MLflow at {client.tracking_uri}; pass a search name or parent run id "
                        "printed by tune.py, and the --tracking-uri it used")
    return parent


SPACE_FILE = "search_space.yaml"  # logged on the parent run by tune.py


def search_space(client, parent) -> dict:
    """The search_space.yaml logged with the search.

    A search whose parent run has no such artifact (logged before tune.py wrote one) falls back to the
    parent's params `metric` and `mode`; anything else that stops the file from being read is a UserError:
    ranking with a guessed mode would put a min-mode search backwards."""
    name = parent.data.tags.get(TAG_SEARCH, parent.info.run_id)
    with tempfile.TemporaryDirectory() as directory:
        try:
            path = client.download_artifacts(parent.info.run_id, SPACE_FILE, directory)
            text = Path(path).read_text()
        except Exception as error:  # MlflowException, OSError, an artifact store's own errors
            if _artifact_missing(error):
                return _space_from_params(parent, name)
            raise UserError(f"Cannot read {SPACE_FILE} of search {name!r} ({type(error).__name__}: "
                            f"{str(error).splitlines()[0][:160] if str(error) else ''}); check the artifact store "
                            "(credentials, --tracking-uri) and retry") from error
    try:
        space = yaml.safe_load(text)
    except yaml.YAMLError as error:
        raise UserError(f"{SPACE_FILE} of search {name!r} is not valid YAML ({str(error).splitlines()[0]}); "
                        "the artifact is damaged: re-run the search") from error
    if not isinstance(space, dict):
        raise UserError(f"{SPACE_FILE} of search {name!r} is not a search space (a YAML mapping); re-run the search")
    return space


def _artifact_missing(error: Exception) -> bool:
    """True only for MLflow's own 'this artifact does not exist' answer."""
    return getattr(error, "error_code", None) == "RESOURCE_DOES_NOT_EXIST"


def _space_from_params(parent, name: str) -> dict:
    params = parent.data.params
    if params.get("mode") not in ("max", "min") or not params.get("metric"):
        raise UserError(f"Search {name!r} logged no {SPACE_FILE} and no metric/mode params, so the direction trials "
                        "rank in is unknown; re-run the search with this medtune")
    return {"metric": params["metric"], "mode": params["mode"]}


def selection(parent, space: dict) -> tuple[str, str]:
    """(`best_<metric>`, mode): the validation score tune.py ranked trials by, and its direction."""
    metric = space.get("metric") or parent.data.params.get("metric")
    mode = space.get("mode") or parent.data.params.get("mode")
    if not metric or mode not in ("max", "min"):
        name = parent.data.tags.get(TAG_SEARCH, parent.info.run_id)
        raise UserError(f"Search {name!r} does not say which metric it ranked by and in which direction "
                        f"(metric {metric!r}, mode {mode!r}); re-run the search with this medtune")
    return selection_key(metric), mode


def trials(client, parent, outcome: str | None = None) -> list:
    """The search's trial runs, optionally only those with `medtune.outcome == outcome`."""
    runs = [r for r in trial_runs(client, parent) if r.data.tags.get(TAG_ROLE) == "trial"]
    return [r for r in runs if outcome is None or r.data.tags.get(TAG_OUTCOME) == outcome]


def ranked_trials(client, parent, space: dict) -> list:
    """Trials that trained to the end (they have test metrics) or were cut by the time budget, best validation score
    first: `best_<metric>` descending for mode max, ascending for mode min; ties by trial id (trainables.tracking.ranking,
    tune.py's own rule)."""
    key, mode = selection(parent, space)
    done = [r for r in trials(client, parent) if r.data.tags.get(TAG_OUTCOME) in RANKED
            and not math.isnan(r.data.metrics.get(key, math.nan))]
    return rank(done, lambda r: r.data.metrics[key], mode, tie=trial_label)


def winner(client, parent):
    """The trial tune.py chose on validation (the parent's `medtune.best_run_id`)."""
    run_id = parent.data.tags.get(TAG_BEST_RUN)
    name = parent.data.tags.get(TAG_SEARCH, parent.info.run_id)
    if not run_id:
        raise UserError(f"Search {name!r} has no finished trial (its parent run names no best trial); "
                        f"finish it with `python tune.py --resume {name}` or run a new search")
    run = client.get_run(run_id)
    if run.data.tags.get(PARENT) != parent.info.run_id:
        raise UserError(f"Run {run_id} named as best by search {name!r} is not one of its trials; re-run the search")
    return run


def trial_label(run) -> str:
    return run.data.tags.get(TAG_TRIAL) or run.info.run_id[:8]


def checkpoint_state(run, override: str | None = None) -> dict:
    """The trial's checkpoint (`--checkpoint` when given), read with weights_only=True."""
    location = override or run.data.tags.get(TAG_CHECKPOINT)
    if not location:
        raise UserError(f"Trial {trial_label(run)} has no checkpoint tag ({TAG_CHECKPOINT}); it never reported an "
                        "epoch. Pass --checkpoint DIR or pick another trial")
    if "://" not in location and not override and not (Path(location) / FILENAME).exists() and not Path(location).is_file():
        raise UserError(f"The checkpoint of trial {trial_label(run)} is missing at {location} (results folder moved "
                        "or deleted?); pass --checkpoint DIR pointing at its copy")
    if "://" in location:
        with tempfile.TemporaryDirectory() as directory:
            return load_checkpoint(_download(location, directory))
    return load_checkpoint(location)


def _download(uri: str, directory: str) -> str:
    """Copy a checkpoint directory from s3://, gs://, ... to `directory` (pyarrow, as Ray stores it)."""
    import pyarrow
    import pyarrow.fs

    try:
        pyarrow.fs.copy_files(uri, directory)
    except (OSError, pyarrow.ArrowException) as error:  # no credentials, no such key, unknown scheme...
        raise UserError(f"Cannot download checkpoint {uri} ({type(error).__name__}: {str(error)[:120]}); check "
                        "credentials or pass --checkpoint DIR with a local copy") from error
    return directory


def kept_file(client, run, name: str, read: Callable[[str], dict]) -> dict | None:
    """`read(path)` of the file `name` a trial logged to its run (its test or validation predictions); None when the
    run has no such artifact (a trial logged before trials kept it)."""
    if name not in {a.path for a in client.list_artifacts(run.info.run_id)}:
        return None
    with tempfile.TemporaryDirectory() as directory:
        return read(client.download_artifacts(run.info.run_id, name, directory))

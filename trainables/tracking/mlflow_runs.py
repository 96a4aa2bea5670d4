"""How a search is laid out in MLflow, and the Ray Tune callback that writes it.

One experiment ("medtune"), one parent run per search, one nested run per trial. The callback runs on
the driver: trials on other machines never talk to the tracking server. Tags below are the contract
that `tune.py`, the callback and `analysis/` share. Everything a search writes goes through one
`ResilientClient` per search (`search_client`), so a tracking server that goes away never stops the trials;
the operations it may queue (`OPERATIONS`: make a trial's run, log a checkpoint's files, close the search) are
here, and `analysis.sync` replays the same ones from Ray storage.
"""

from __future__ import annotations

import importlib.metadata
import math
import os
import re
import subprocess
import time
from pathlib import Path
from urllib.parse import unquote, urlsplit, urlunsplit

from mlflow.entities import Metric, Param, RunTag
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from ray.tune import Callback, Checkpoint

from trainables.tracking.names import ARTIFACTS as TRIAL_ARTIFACTS
from trainables.tracking.names import (
    EXPERIMENT,
    OOF_PREDICTIONS,
    PARENT,
    REPLAYED,
    TAG_BEST_RUN,
    TAG_CHECKPOINT,
    TAG_DATASET,
    TAG_ERROR,
    TAG_IS_BEST,
    TAG_OUTCOME,
    TAG_ROLE,
    TAG_SEARCH,
    TAG_SEED,
    TAG_SPACE,
    TAG_TRIAL,
    TAG_VERSION,
    VAL_PREDICTIONS,
)
from trainables.tracking.ranking import CUT_BY_BUDGET, FAILED, INTERRUPTED, outcome, reported_failure
from trainables.tracking.resilient import ResilientClient, scoped_env
from trainables.tracking.state import BudgetClock, record_budget, storage_lost

TRAIN_CHECKPOINT_KEY = "checkpoint_path"  # ray.tune.integration.ray_train's result key for a Ray Train checkpoint
RESULT_PARAMS = ("stem_resolved",)  # what a trial resolves itself (stem auto -> small/imagenet): a param, not a metric
_RAY_BOOKKEEPING = {"timestamp", "pid", "done", "time_since_restore", "iterations_since_restore",
                    "timesteps_total", "episodes_total", "timesteps_since_restore", "time_this_iter_s"}


def default_tracking_uri() -> str:
    """MLflow's convention: $MLFLOW_TRACKING_URI when set, else the local sqlite store (MLflow 3's default),
    pinned to an absolute path so every process agrees on it."""
    return normalise_tracking_uri(os.environ.get("MLFLOW_TRACKING_URI") or "sqlite:///mlflow.db")


def tracking_uri_from(flag: str | None) -> str:
    """The tracking URI a command uses: --tracking-uri, else $MLFLOW_TRACKING_URI, else ./mlflow.db."""
    return normalise_tracking_uri(flag or default_tracking_uri())


def normalise_tracking_uri(uri: str) -> str:
    """A relative sqlite path made absolute, so a search and its resume agree from any folder."""
    prefix = "sqlite:///"
    if uri.startswith(prefix) and not uri[len(prefix):].startswith("/"):
        return f"{prefix}{Path(uri[len(prefix):]).resolve()}"
    return uri


def without_credentials(uri: str) -> str:
    """`uri` with any user:password removed, for state files, tags and printed lines."""
    parts = urlsplit(uri)
    if not parts.username and not parts.password:
        return uri
    host = parts.hostname or ""
    netloc = f"{host}:{parts.port}" if parts.port else host
    return urlunsplit(parts._replace(netloc=netloc))


def adopt_credentials(uri: str) -> str:
    """Move user:password from `uri` into MLflow's own variables and return the URI without them, so the
    secret lives in this process's environment only (never in Ray's pickled state, MLflow tags or output)."""
    parts = urlsplit(uri)
    if parts.username:
        os.environ.setdefault("MLFLOW_TRACKING_USERNAME", unquote(parts.username))
    if parts.password:
        os.environ.setdefault("MLFLOW_TRACKING_PASSWORD", unquote(parts.password))
    return without_credentials(uri)


def check_tracking_uri(uri: str) -> MlflowClient:
    """A client (for `uri` without credentials) that has answered once; ConnectionError with the reason otherwise.
    The probe fails fast (no retries, 10 s) and leaves MLflow's own settings to every later call."""
    uri = adopt_credentials(uri)
    client = MlflowClient(uri)
    try:
        with scoped_env(MLFLOW_HTTP_REQUEST_MAX_RETRIES="0", MLFLOW_HTTP_REQUEST_TIMEOUT="10"):
            client.search_experiments(max_results=1)
    except Exception as error:  # MlflowException, requests errors, sqlalchemy errors
        raise ConnectionError(f"{type(error).__name__}: {str(error).splitlines()[0][:160]}") from error
    return client


def search_tags(space_name: str, dataset: str, seed: int) -> dict:
    """The parent run's tags: space, dataset, seed, medtune version and the git commit when there is one."""
    tags = {TAG_SPACE: space_name, TAG_DATASET: dataset, TAG_SEED: str(seed),
            TAG_VERSION: importlib.metadata.version("medtune")}
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True,
                                cwd=Path(__file__).resolve().parents[1]).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        commit = ""  # not a git checkout (an installed copy): no commit to record
    if commit:
        tags["mlflow.source.git.commit"] = commit
    return tags


def get_experiment_id(client: MlflowClient, name: str = EXPERIMENT) -> str:
    """The experiment, created on first use and tagged so the UI opens on its runs table."""
    experiment = client.get_experiment_by_name(name)
    experiment_id = experiment.experiment_id if experiment else client.create_experiment(name)
    client.set_experiment_tag(experiment_id, "mlflow.experimentKind", "custom_model_development")
    return experiment_id


def ui_base(tracking_uri: str) -> str:
    """Where the MLflow UI of `tracking_uri` answers: the server itself, or a local `mlflow ui` on its default port."""
    return (tracking_uri if tracking_uri.startswith(("http://", "https://")) else "http://127.0.0.1:5000").rstrip("/")


def runs_table_url(tracking_uri: str, experiment_id: str) -> str:
    return f"{ui_base(tracking_uri)}/#/experiments/{experiment_id}/runs?workflowType=machine_learning"


def run_page_url(tracking_uri: str, experiment_id: str, run_id: str) -> str:
    """A run's page (a search's description is its leaderboard)."""
    return f"{ui_base(tracking_uri)}/#/experiments/{experiment_id}/runs/{run_id}"


def find_search_run(client: MlflowClient, search: str, experiment_id: str | None = None):
    """The parent run of a search, by search name or run id; None when there is none."""
    if re.fullmatch(r"[0-9a-f]{32}", search):  # a run id
        try:
            run = client.get_run(search)
        except MlflowException as error:
            if error.error_code != "RESOURCE_DOES_NOT_EXIST":
                raise
        else:
            if run.data.tags.get(TAG_ROLE) == "search":
                return run
    experiments = [experiment_id] if experiment_id else [e.experiment_id for e in client.search_experiments()]
    runs = client.search_runs(experiments, f"tags.`{TAG_SEARCH}` = '{search}' and tags.`{TAG_ROLE}` = 'search'",
                              order_by=["attributes.start_time DESC"], max_results=1)
    return runs[0] if runs else None


def trial_runs(client: MlflowClient, parent) -> list:
    """Every trial run nested under `parent`."""
    return client.search_runs([parent.info.experiment_id], f"tags.`{PARENT}` = '{parent.info.run_id}'",
                              max_results=10000)


def start_search_run(client: MlflowClient, experiment_id: str, search: str, tags: dict) -> str:
    """The parent run for `search`: reopened when the search resumes, created otherwise."""
    existing = find_search_run(client, search, experiment_id)
    if existing is not None:
        client.update_run(existing.info.run_id, status="RUNNING")
        if TAG_OUTCOME in existing.data.tags:  # `interrupted`, from the run that was stopped: it goes on now
            client.delete_tag(existing.info.run_id, TAG_OUTCOME)
        return existing.info.run_id
    run = client.create_run(experiment_id, run_name=search, tags={TAG_SEARCH: search, TAG_ROLE: "search", **tags})
    return run.info.run_id


def search_params(space: dict, seed: int) -> list[Param]:
    """The parent run's params, from the space as `SearchSpace.as_dict` states it (and the state file keeps it)."""
    return flat_params({"space": space.get("name", ""), "dataset": space["dataset"],
                        "num_samples": space.get("num_samples") or "until the budget",
                        "time_budget_s": space.get("time_budget"), "max_t": space["scheduler"]["max_t"],
                        "cv_folds": space.get("cv_folds", 1), "metric": space["metric"], "mode": space["mode"],
                        "seed": seed})


def flat_params(config: dict) -> list[Param]:
    return [Param(key, str(value)[:6000]) for key, value in sorted(config.items())]


def numeric_metrics(result: dict, step: int, timestamp_ms: int | None = None) -> list[Metric]:
    now = int(time.time() * 1000) if timestamp_ms is None else timestamp_ms
    return [Metric(key, float(value), now, step) for key, value in result.items()
            if isinstance(value, (int, float)) and not isinstance(value, bool) and key not in _RAY_BOOKKEEPING
            and not (isinstance(value, float) and math.isinf(value))]


def checkpoint_uri(checkpoint) -> str:
    kind = getattr(checkpoint.filesystem, "type_name", "local")
    return checkpoint.path if kind == "local" else f"{kind}://{checkpoint.path}"


def checkpoint_location(checkpoint, last_result: dict | None) -> str | None:
    """Where a trial's latest checkpoint is: its Tune checkpoint, or for a data-parallel trial (Ray Train keeps
    it: trainables/distributed.py) the URI its last result names. None: it never saved one."""
    if checkpoint is not None:
        return checkpoint_uri(checkpoint)
    return (last_result or {}).get(TRAIN_CHECKPOINT_KEY) or None


# --- what the search's ResilientClient may queue: named operations that find before they create ---------------

def find_trial_run(client: MlflowClient, parent_id: str, trial_id: str, experiment_id: str | None = None):
    """The run of Ray trial `trial_id` under the parent run; None when there is none."""
    experiment_id = experiment_id or client.get_run(parent_id).info.experiment_id
    runs = client.search_runs([experiment_id], f"tags.`{PARENT}` = '{parent_id}' and tags.`{TAG_TRIAL}` = '{trial_id}'",
                              order_by=["attributes.start_time ASC"], max_results=1)
    return runs[0] if runs else None


def create_trial_run(client: MlflowClient, parent_id: str, search: str, trial_id: str, run_name: str,
                     params: list[Param]) -> str:
    """The trial's run id: found by its trial id (a resumed or replayed trial), else created with its params."""
    experiment_id = client.get_run(parent_id).info.experiment_id
    existing = find_trial_run(client, parent_id, trial_id, experiment_id)
    if existing is not None:
        return existing.info.run_id
    run = client.create_run(experiment_id, run_name=run_name, tags={
        PARENT: parent_id, TAG_SEARCH: search, TAG_ROLE: "trial", TAG_TRIAL: trial_id})
    client.log_batch(run.info.run_id, params=params)
    return run.info.run_id


def log_checkpoint_files(client: MlflowClient, run_id: str, uri: str) -> int:
    """Log the report files a trial's checkpoint folder holds (`uri`: local or s3://, gs://); how many there were."""
    logged = 0
    with Checkpoint(uri).as_directory() as directory:
        # written by trainables.training.figures (OOF: CV trials; validation: single-split, stopped ones too)
        for name in (*TRIAL_ARTIFACTS, OOF_PREDICTIONS, VAL_PREDICTIONS):
            if (Path(directory) / name).exists():
                client.log_artifact(run_id, str(Path(directory) / name))
                logged += 1
    return logged


class MLflowTrialCallback(Callback):
    """Mirror every trial into a run nested under the search's parent run.

    Params at start, one metric step per epoch, and at the end the trial's report files (read from its
    final checkpoint on shared storage), the checkpoint URI and how the trial ended. Ray calls no trial hook for
    the trials it stops when the time budget is spent or the search is interrupted (search_spaces/stopping.py), so the
    experiment's end closes those: cut by budget (FINISHED), or interrupted (KILLED, for --resume to go on). It keeps
    the budget's clock (saved with Ray's state) and records its decision in the search's state file for tune.py.
    """

    def __init__(self, tracking_uri: str, parent_run_id: str, search: str, max_t: int,
                 time_budget_s: float | None = None, storage: str | None = None):
        self.tracking_uri, self.parent_run_id, self.search, self.max_t = tracking_uri, parent_run_id, search, max_t
        self.time_budget_s, self.storage = time_budget_s, storage  # storage: where the budget record goes
        self.budget = BudgetClock(time_budget_s)
        self._runs: dict[str, str] = {}
        self._result_params: set[str] = set()  # trials whose RESULT_PARAMS are logged

    def setup(self, **info):  # after set_state on a resume: the clock is already restored
        if not hasattr(self, "budget"):  # a callback pickled before the clock existed: this run's time only
            self.budget = BudgetClock(getattr(self, "time_budget_s", None))
        self.client = search_client(self.tracking_uri, getattr(self, "storage", None), self.search)
        self.client.flush()  # what an earlier run of the search left queued goes first

    def _run_id(self, trial) -> str:
        """The trial's run (found again on a resume, by its trial id); a placeholder while MLflow is away."""
        if trial.trial_id not in self._runs:
            self._runs[trial.trial_id] = self.client.call(
                "create_trial_run", self.parent_run_id, self.search, trial.trial_id, str(trial),
                flat_params(trial.config), placeholder=f"pending:{trial.trial_id}")
        return self._runs[trial.trial_id]

    def on_step_begin(self, iteration, trials, **info):
        self.budget.tick(time.time())

    def on_step_end(self, iteration, trials, **info):
        self.budget.tick(time.time())

    def get_state(self) -> dict:
        """Saved by Ray with its experiment state, beside its stopper's budget left (see BudgetClock)."""
        self.budget.tick(time.time())
        return {"budget": self.budget.get_state()}

    def set_state(self, state: dict) -> None:
        if not hasattr(self, "budget"):
            self.budget = BudgetClock(getattr(self, "time_budget_s", None))
        self.budget.set_state(state["budget"])

    def on_trial_start(self, iteration, trials, trial, **info):
        self.client.update_run(self._run_id(trial), status="RUNNING")

    def on_trial_restore(self, iteration, trials, trial, **info):
        self.client.update_run(self._run_id(trial), status="RUNNING")

    def on_trial_result(self, iteration, trials, trial, result, **info):
        if reported_failure(result):  # the trial's own end, not an epoch: on_trial_complete records it
            return
        step = int(result.get("training_iteration", 0))
        if result.get(REPLAYED):  # an epoch a restarted data-parallel trial reports again: log it once
            if step in self._logged_steps(trial):
                return
            result = {key: value for key, value in result.items() if key != REPLAYED}
        params = flat_params({key: result[key] for key in RESULT_PARAMS if key in result}) \
            if trial.trial_id not in self._result_params else []  # once per trial (again after a resume: same value)
        self._result_params.add(trial.trial_id)
        self.client.log_batch(self._run_id(trial), metrics=numeric_metrics(result, step), params=params)

    def _logged_steps(self, trial) -> set[int]:
        """The epochs the trial's run holds; none while MLflow is away (then a replayed epoch is logged again)."""
        try:
            history = self.client.attempt(lambda client, run_id: client.get_metric_history(run_id, "epoch"),
                                          self._run_id(trial))
        except Exception:  # noqa: BLE001 (away, or a run still pending: logging twice is the lesser harm)
            return set()
        return {metric.step for metric in history}

    def on_trial_complete(self, iteration, trials, trial, **info):
        failure = reported_failure(trial.last_result)
        if failure:  # ended itself on a deterministic error (trainables.ray_trainable): failed, not retried
            self._fail(trial, failure)
            return
        self._close(trial, outcome(int(trial.last_result.get("training_iteration", 0)), self.max_t))

    def on_experiment_end(self, trials, **info):
        self.budget.tick(time.time())
        spent = self.budget.spent
        for trial in trials:
            if trial.status != "TERMINATED":
                if trial.status != "ERROR" and trial.trial_id in self._runs:  # waiting to be retried: interrupted
                    self._interrupt(trial)
                continue
            ended = outcome(int(trial.last_result.get("training_iteration", 0)), self.max_t,
                            marked_done=bool(trial.last_result.get("done")), budget_spent=spent)
            if ended == CUT_BY_BUDGET:
                self._close(trial, ended)
            elif ended == INTERRUPTED:
                self._interrupt(trial)
        if getattr(self, "storage", None) and self.budget.budget_s is not None:  # last: the storage may be failing
            record_budget(self.storage, self.search, self.budget)  # what tune.py's summary and ranking read

    def _interrupt(self, trial) -> None:
        """Never left RUNNING: KILLED, tagged interrupted; --resume finds the run again by its trial id."""
        run_id = self._run_id(trial)
        self.client.log_batch(run_id, tags=[RunTag(TAG_OUTCOME, INTERRUPTED)])
        self.client.set_terminated(run_id, status="KILLED")

    def _close(self, trial, ended: str) -> None:
        """Tag how the trial ended, log its report files and checkpoint URI, and finish its run."""
        run_id = self._run_id(trial)
        tags = [RunTag(TAG_OUTCOME, ended)]
        uri = checkpoint_location(trial.checkpoint, trial.last_result)
        if uri is not None:
            tags.append(RunTag(TAG_CHECKPOINT, uri))
            self.client.call("log_checkpoint_files", run_id, uri)  # read when logged: the folder outlives an outage
        self.client.log_batch(run_id, tags=tags)
        self.client.set_terminated(run_id, status="FINISHED")

    def on_trial_error(self, iteration, trials, trial, **info):
        error = (trial.error_file and Path(trial.error_file).exists() and
                 Path(trial.error_file).read_text().strip().splitlines()[-1]) or "trial failed"
        if storage_lost(error):  # not the trial's failure: the search stops, and --resume trains it on
            self._interrupt(trial)
            return
        self._fail(trial, error)

    def _fail(self, trial, error: str) -> None:
        run_id = self._run_id(trial)
        self.client.log_batch(run_id, tags=[RunTag(TAG_OUTCOME, FAILED), RunTag(TAG_ERROR, error[:5000])])
        self.client.set_terminated(run_id, status="FAILED")


def winner_metrics(metrics: dict) -> dict:
    """What the parent run keeps of the winner's last result: its validation and test numbers."""
    return {key: value for key, value in metrics.items() if key.startswith(("val_", "test_", "best_"))
            and isinstance(value, (int, float)) and not isinstance(value, bool)}


def close_search(client: MlflowClient, parent_id: str, best_trial_id: str | None, best_metrics: dict,
                 live_trial_ids) -> str | None:
    """Name the winner on the parent, end runs of trials Ray no longer knows, end the parent run. Idempotent: what
    is already so is not written again (a replayed queue and `analysis.sync` call it too)."""
    parent = client.get_run(parent_id)
    best_run_id = None
    for run in trial_runs(client, parent):
        trial_id = run.data.tags.get(TAG_TRIAL)
        if trial_id == best_trial_id:
            best_run_id = run.info.run_id
            if run.data.tags.get(TAG_IS_BEST) != "true":
                client.set_tag(best_run_id, TAG_IS_BEST, "true")
        if run.info.status == "RUNNING":  # killed mid-trial and not resumed: never leave it RUNNING
            client.set_terminated(run.info.run_id, status="KILLED" if trial_id not in live_trial_ids else "FINISHED")
    if best_run_id and parent.data.tags.get(TAG_BEST_RUN) != best_run_id:
        client.set_tag(parent_id, TAG_BEST_RUN, best_run_id)
        client.log_batch(parent_id, metrics=numeric_metrics(winner_metrics(best_metrics), 0))
    if parent.info.status != "FINISHED":
        client.set_terminated(parent_id, status="FINISHED")
    return best_run_id


OPERATIONS = {"create_trial_run": create_trial_run, "log_checkpoint_files": log_checkpoint_files,
              "close_search": close_search}
_CLIENTS: dict[tuple, ResilientClient] = {}


def search_client(tracking_uri: str, storage: str | None, search: str) -> ResilientClient:
    """The one ResilientClient of search `search` in this process (tune.py and the callback share its queue)."""
    key = (tracking_uri, storage, search)
    if key not in _CLIENTS:
        _CLIENTS[key] = ResilientClient(tracking_uri, storage, search, OPERATIONS)
    return _CLIENTS[key]

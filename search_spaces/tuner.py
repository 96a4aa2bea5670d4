"""The Ray side of a search: start or join Ray, build the Tuner (Optuna TPE + ASHA), print progress lines.

Ray is imported inside the functions so that `tune.py --help` and every input check stay fast.
"""

from __future__ import annotations

import logging
import os
import sys
from contextlib import contextmanager

from ray.tune import Callback

from search_spaces import SearchSpace
from search_spaces.searcher import DistinctOptunaSearch
from search_spaces.stopping import SavedFirst, SearchStop, failed_on_storage, put_back_ray_state
from trainables.errors import UserError
from trainables.tracking import mlflow_runs
from trainables.tracking.names import REPLAYED
from trainables.tracking.ranking import outcome, reported_failure, selection_key
from trainables.tracking.text import fmt

# Ray pickles a search's callbacks by module path. A module that moved answers to its old path while a search
# started before the move is restored; Ray then saves the callbacks under their new path.
MOVED_MODULES = {"analysis.tracking": mlflow_runs}  # the MLflow callback, in trainables/tracking/ since 2026-12
CHECKPOINTS_KEPT = 1  # the latest only: it holds the best weights (trainables/training/split_run.py checkpoint_weights)


def start_ray(address: str | None, space: SearchSpace, debug: bool) -> float:
    """Start or join Ray; returns the GPUs per trial the cluster can give (0 when it has none). The space
    itself keeps what the user asked for: the state file and a resume see that, not this fallback."""
    import ray

    if not debug:  # our ProgressLines replace Ray's tables and banners
        os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
        # Keeping one checkpoint makes Ray snapshot its small experiment state at every checkpoint (so a
        # restore never points at a deleted one), and warn about it each time: the snapshot is wanted.
        os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    # No --address and no RAY_ADDRESS: a Ray of our own. Ray's own default (address None) would join the last
    # cluster anyone started on this machine (/tmp/ray/ray_current_cluster), e.g. another user's `ray start`.
    address = address or os.environ.get("RAY_ADDRESS") or None
    if address and (os.environ.get("RAY_AUTH_TOKEN") or os.environ.get("RAY_AUTH_TOKEN_PATH")):
        os.environ.setdefault("RAY_AUTH_MODE", "token")  # Ray switches token auth on by itself only for "auto"
    try:
        ray.init(address=address or "local", include_dashboard=False, dashboard_host="127.0.0.1",
                 log_to_driver=debug, logging_level="ERROR" if not debug else "INFO")
    except ConnectionError as error:
        if address is None:
            raise
        raise UserError(f"Cannot join the Ray cluster at {address} ({str(error).splitlines()[0]}); check the address "
                        "and, with token authentication, set RAY_AUTH_MODE=token and the cluster's token "
                        "(RAY_AUTH_TOKEN_PATH, RAY_AUTH_TOKEN or ~/.ray/auth_token)") from error
    if space.cpu > max(node["Resources"].get("CPU", 0) for node in ray.nodes() if node["Alive"]):
        raise UserError(f"{space.cpu} CPUs per trial but no node has that many; lower --cpus-per-trial")
    if space.gpu > 0 and ray.cluster_resources().get("GPU", 0) == 0:
        print(f"note: no GPU in the Ray cluster; trials run on CPU (asked for {space.gpu} GPU per trial)")
        check_workers_fit(space, ray.cluster_resources(), gpu=0.0)
        return 0.0
    check_workers_fit(space, ray.cluster_resources(), gpu=space.gpu)
    return space.gpu


def check_workers_fit(space: SearchSpace, cluster: dict, gpu: float) -> None:
    """A data-parallel trial's workers fit in the cluster together; Ray Train would otherwise wait for them forever."""
    for kind, each in (("CPU", space.cpu), ("GPU", gpu)):
        need, have = space.workers * each, cluster.get(kind, 0)
        if space.workers > 1 and need > have:
            raise UserError(f"a trial of {space.workers} workers x {each:g} {kind}s needs {need:g} {kind}s, the Ray "
                            f"cluster has {have:g}; lower resources.workers or resources.{kind.lower()}")


def make_trainable(space: SearchSpace, datasets: dict, gpu: float):
    """The function trainable with its resources attached. `datasets` maps (dataset, image size) to a DatasetRef
    (search_spaces.preflight.dataset_refs): trials open the data by path, so only these small references go
    through the object store, never an image array."""
    from ray import tune

    from trainables.distributed import TUNE_SIDE
    from trainables.ray_trainable import tune_trainable

    if space.workers > 1:  # a data-parallel trial: Ray Train's workers ask for the resources, the trial itself ~none
        return tune.with_resources(tune.with_parameters(tune_trainable, datasets=datasets, variants=space.variants,
                                                        per_worker={"cpu": space.cpu, "gpu": gpu}), TUNE_SIDE)
    return tune.with_resources(tune.with_parameters(tune_trainable, datasets=datasets, variants=space.variants),
                               {"cpu": space.cpu, "gpu": gpu})


def make_searcher(space: SearchSpace, seed: int):
    """Optuna's TPE (seeded), trying the space's `points_to_evaluate` first; None when nothing is searched.

    The sampler's settings are stated, not left to Optuna's defaults (which changed in 5.0): multivariate TPE
    models the keys jointly, and the constant liar counts running trials as bad results so trials running at
    the same time are not handed the same region (max_concurrent > 1). `group` is not needed: Ray's OptunaSearch
    asks for the whole space in every trial, and a `variant` is one categorical key beside the others (no searched
    key depends on it), so the space is never conditional. A proposal some trial already had is not run
    (search_spaces/searcher.py says how repeats happen).

    Versions: both arguments exist since Optuna 2.8; the liar's split of running trials was fixed in 3.0.5/3.1.0
    (optuna#4073) and multivariate TPE with the liar stopped failing in 3.1.1 (optuna#4462). The later fixes of
    the pair (optuna#6189 in 4.5, undone in 4.6, optuna#6505 in 4.8) are for trials asked before their parameters
    are suggested; Ray asks with the whole space fixed, so a running trial's parameters are stored at once (the
    liar changes Ray-style proposals on 4.0, 4.4, 4.7 and 5.1 alike). pyproject's floor (4.0) covers this."""
    import warnings

    from optuna.exceptions import ExperimentalWarning
    from optuna.samplers import TPESampler

    if not space.params and not space.variants:
        return None  # nothing to search: run the fixed config num_samples times
    startup = max(2, min(10, (space.num_samples or 30) // 3))  # no trial count (a time budget): 10
    with warnings.catch_warnings():  # both were experimental before Optuna 5.0: the warning says nothing here
        warnings.simplefilter("ignore", ExperimentalWarning)
        sampler = TPESampler(seed=seed, n_startup_trials=startup, multivariate=True, constant_liar=True)
    return DistinctOptunaSearch(metric=selection_key(space.metric), mode=space.mode,
                                points_to_evaluate=space.points_to_evaluate or None, sampler=sampler)


def make_scheduler(space: SearchSpace):
    """ASHA, or FIFO (`scheduler: {kind: fifo}`): every trial trains max_t epochs, the same budget for every model.

    ASHA's rungs count epochs (`training_iteration`) or, with `rungs: seconds`, the trial's own training seconds
    (`time_total_s`, what it has cost of the budget). Seconds rather than a projection of whether a trial can reach
    its next rung in the budget left: what is left depends on the trials not yet proposed and on concurrency, and a
    projection cut would be a fourth way to end; rungs at equal seconds answer the question a budget asks (is this
    trial worth its seconds more than the others were worth theirs) with ASHA's own rule, and their trials end
    "stopped early" as before. In seconds the rungs climb from the first rung to the time budget and ASHA never
    stops a trial for its age (`stop_last_trials=False`): a trial ends by training its max_t epochs (completed), at a
    rung (stopped early) or with the budget (cut), as the outcome rule (trainables/tracking/ranking.py) reads it.
    Across a resume `time_total_s` goes on from the restored checkpoint's value (Ray's Trainable.restore reads it
    from the checkpoint's metrics), as the epoch count does."""
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    if space.scheduler == "fifo":
        return FIFOScheduler()
    if space.rung_unit == "seconds":
        return ASHAScheduler(time_attr="time_total_s", metric=space.metric, mode=space.mode, max_t=space.time_budget,
                             grace_period=space.first_rung, reduction_factor=space.reduction_factor,
                             stop_last_trials=False)
    return ASHAScheduler(time_attr="training_iteration", metric=space.metric, mode=space.mode, max_t=space.max_t,
                         grace_period=space.first_rung, reduction_factor=space.reduction_factor)


class RungRecords(Callback):
    """ASHA's rung records, saved with the experiment and put back on a resume. Ray 2.60 saves the searcher and the
    callbacks with its experiment state but not the scheduler (TuneController.__getstate__ leaves it out): a resumed
    search's ASHA is the one pickled when the Tuner was built, with empty rungs, so every trial would pass its next
    rung as the first one there. This callback holds the same scheduler object (Ray pickles the Tuner's config
    and callbacks together, so the reference survives) and saves its rungs whenever Ray saves the callbacks."""

    def __init__(self, scheduler):
        self.scheduler = scheduler

    def get_state(self) -> dict:
        return {"rungs": [[(milestone, dict(recorded)) for milestone, recorded in bracket._rungs]
                          for bracket in self.scheduler._brackets]}

    def set_state(self, state: dict) -> None:
        for bracket, rungs in zip(self.scheduler._brackets, state["rungs"]):
            bracket._rungs = [(milestone, dict(recorded)) for milestone, recorded in rungs]


def build_tuner(space: SearchSpace, name: str, storage: str, trainable, callbacks: list, seed: int):
    from ray import tune
    from ray.tune.schedulers import AsyncHyperBandScheduler

    scheduler = make_scheduler(space)
    rungs = [RungRecords(scheduler)] if isinstance(scheduler, AsyncHyperBandScheduler) else []
    run_config = tune.RunConfig(
        name=name, storage_path=storage, callbacks=[*callbacks, ProgressLines(space), *rungs, SavedFirst()], verbose=0,
        checkpoint_config=tune.CheckpointConfig(num_to_keep=CHECKPOINTS_KEPT),
        failure_config=tune.FailureConfig(max_failures=space.max_failures),
    )
    return tune.Tuner(trainable, param_space=space.param_space(), run_config=run_config,
                      tune_config=tune.TuneConfig(search_alg=make_searcher(space, seed), scheduler=scheduler,
                                                  num_samples=space.num_samples or -1,  # -1: until the budget
                                                  time_budget_s=space.time_budget,
                                                  max_concurrent_trials=space.max_concurrent,
                                                  trial_name_creator=trial_name, trial_dirname_creator=trial_name))


def restore_tuner(space: SearchSpace, name: str, storage: str, trainable):
    """The interrupted search, with its sampler state and callbacks (they hold its MLflow parent run). Errored trials
    stay so, unless the storage failed under one (search_spaces/stopping.py)."""
    from ray import tune

    copy = put_back_ray_state(f"{storage}/{name}")
    if copy:
        print(f"Ray's saved state was cut short (the storage filled up): put back from this machine's copy in {copy}")
    stranded = failed_on_storage(f"{storage}/{name}")
    if stranded:
        print(f"resuming {len(stranded)} trials the storage failed under: {', '.join(stranded)}")
        # Ray's Optuna searcher counted them as failed: their later results are not told to TPE, and it says so
        logging.getLogger("ray.tune.search.optuna.optuna_search").setLevel(logging.ERROR)
    with moved_modules():
        return tune.Tuner.restore(f"{storage}/{name}", trainable=trainable, resume_unfinished=True,
                                  resume_errored=bool(stranded), param_space=space.param_space())


@contextmanager
def moved_modules():
    """`MOVED_MODULES` importable under their old paths, for as long as Ray unpickles a saved search."""
    added = {old: module for old, module in MOVED_MODULES.items() if old not in sys.modules}
    sys.modules.update(added)
    try:
        yield
    finally:
        for old in added:
            sys.modules.pop(old, None)


def trial_name(trial) -> str:
    return f"trial_{trial.trial_id}"


class ProgressLines(Callback):
    """One short line per epoch and per trial end, instead of Ray's wide tables."""

    def __init__(self, space: SearchSpace):
        self.metric, self.max_t, self.searched = space.metric, space.max_t, space.searched_keys()

    def on_trial_start(self, iteration, trials, trial, **info):
        print(f"[{trial.trial_id}] start " + " ".join(f"{k}={fmt(trial.config.get(k))}" for k in self.searched),
              flush=True)

    def on_trial_result(self, iteration, trials, trial, result, **info):
        if reported_failure(result) or result.get(REPLAYED):  # the trial's own end, or an epoch told before
            return
        print(f"[{trial.trial_id}] epoch {result['training_iteration']}/{self.max_t} "
              f"{self.metric}={fmt(result.get(self.metric))} ({result.get('epoch_seconds', 0):.0f}s)", flush=True)

    def on_trial_complete(self, iteration, trials, trial, **info):
        failure = reported_failure(trial.last_result)
        if failure:
            print(f"[{trial.trial_id}] FAILED ({failure}; not retried: it would fail the same way)", flush=True)
            return
        ended = outcome(int(trial.last_result.get("training_iteration", 0)), self.max_t)
        print(f"[{trial.trial_id}] {ended.replace('_', ' ')}{' by ASHA' if ended != 'completed' else ''}", flush=True)

    def on_trial_error(self, iteration, trials, trial, **info):
        stop = SearchStop.current
        if stop is not None and stop.storage_failure is not None:
            return  # the storage failed, not the trial: the search's one line says so
        print(f"[{trial.trial_id}] FAILED (see {trial.error_file})", flush=True)


def quiet_libraries(debug: bool) -> None:
    """MLflow, Ray Tune and Optuna log INFO chatter by default; keep the terminal to our lines."""
    import mlflow  # noqa: F401  (configures its loggers on import: set levels after)
    import optuna

    for library in ("mlflow", "ray.tune"):
        logging.getLogger(library).setLevel(logging.DEBUG if debug else logging.WARNING)
    optuna.logging.set_verbosity(optuna.logging.DEBUG if debug else optuna.logging.WARNING)

"""medtune's main command: run a named search space with Optuna + ASHA on Ray Tune, tracked in MLflow.

    python tune.py --list-spaces
    python tune.py --space smoke
    python tune.py --space resnetd_depth --address auto --storage s3://bucket/medtune --tracking-uri http://mlflow:5000
    python tune.py --resume smoke-20261121-101500

Every user error (unknown space, bad YAML, missing data, unreachable tracking server) is reported as one
line on stderr with exit code 2, before Ray starts any trial.
"""

from __future__ import annotations

import argparse
import datetime as dt
import importlib.metadata
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import yaml
from ray.tune import Callback

from search_spaces import SearchSpace, load_space, parse_space, shipped_spaces, validate_space
from trainables.datasets import load_dataset
from trainables.errors import UserError
from trainables.leaks import format_leak_report, leak_metrics, leak_report
from trainables.models import create_model
from trainables.splits import train_val_indices

STATE_FILE = "medtune_search.yaml"  # what --resume needs to rebuild the search, next to Ray's state


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Hyperparameter search for medical image classification.")
    what = parser.add_mutually_exclusive_group(required=True)
    what.add_argument("--space", help="shipped space name (see --list-spaces) or path of your own YAML file")
    what.add_argument("--list-spaces", action="store_true", help="list the shipped spaces and exit")
    what.add_argument("--resume", metavar="NAME", help="resume the interrupted search NAME (same --storage)")
    parser.add_argument("--dataset", help="override the space's dataset (name, imagefolder:PATH, csv:PATH, ...)")
    parser.add_argument("--image-size", type=int, help="override the image size (pixels)")
    parser.add_argument("--data-root", help="folder with the datasets (default $MEDTUNE_DATA_ROOT or ~/.medmnist)")
    parser.add_argument("--skip-bad-images", action="store_true",
                        help="skip unreadable images (counted and logged) instead of stopping")
    parser.add_argument("--num-samples", type=int, help="number of trials")
    parser.add_argument("--max-epochs", type=int, help="epochs per trial (ASHA max_t)")
    parser.add_argument("--cpus-per-trial", type=float, help="CPUs per trial")
    parser.add_argument("--gpus-per-trial", type=float, help="GPUs per trial; fractions share a card")
    parser.add_argument("--max-concurrent", type=int, help="trials running at once")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="fix a trial config key (YAML value)")
    parser.add_argument("--address", help="join a running Ray cluster (e.g. auto); default: start a local one")
    parser.add_argument("--storage", default="medtune_results",
                        help="Ray results/checkpoints: a shared dir, s3:// or gs:// (default ./medtune_results)")
    parser.add_argument("--name", help="search name (default <space>-<timestamp>)")
    parser.add_argument("--tracking-uri", help="MLflow tracking URI (default sqlite:///mlflow.db here)")
    parser.add_argument("--seed", type=int, default=0, help="seeds the sampler and every trial")
    parser.add_argument("--debug", action="store_true", help="show tracebacks and Ray's progress output")
    return parser


# --- checks before any compute ------------------------------------------------------------------

def apply_overrides(space: SearchSpace, args) -> SearchSpace:
    """The space with the command line's overrides, validated again."""
    if args.dataset:
        space.dataset = args.dataset
    if args.image_size:
        space.params.pop("image_size", None)
        space.fixed["image_size"] = args.image_size
    for field, value in (("num_samples", args.num_samples), ("max_t", args.max_epochs), ("cpu", args.cpus_per_trial),
                         ("gpu", args.gpus_per_trial), ("max_concurrent", args.max_concurrent)):
        if value is not None:
            setattr(space, field, value)
    space.grace_period = min(space.grace_period, space.max_t)
    for item in args.set:
        key, sep, value = item.partition("=")
        if not sep:
            raise UserError(f"--set {item!r}: write KEY=VALUE, e.g. --set batch_size=64")
        space.params.pop(key, None)
        space.fixed[key] = yaml.safe_load(value)
    if args.data_root:
        space.fixed["data_root"] = str(Path(args.data_root).expanduser().resolve())
    space.fixed["seed"] = args.seed
    validate_space(space)
    return space


def load_datasets(space: SearchSpace, skip_bad_images: bool) -> dict:
    """Every (dataset, image size) a trial may ask for, loaded once on the driver (missing data fails here)."""
    data_root = space.fixed.get("data_root")
    return {(space.dataset, int(size)): load_dataset(space.dataset, image_size=int(size), data_root=data_root,
                                                     skip_bad_images=skip_bad_images)
            for size in space.values_of("image_size")}


def check_leaks(space: SearchSpace, datasets: dict, seed: int) -> tuple[dict, dict]:
    """Duplicate images and shared patients across train/val/test, printed now; (metrics, detail) for MLflow."""
    dataset = next(iter(datasets.values()))
    report = leak_report(dataset, *train_val_indices(dataset, space.values_of("split_ratio")[0], seed))
    print(format_leak_report(report))
    metrics = leak_metrics(report)
    skipped = getattr(dataset, "skipped_files", ())
    if skipped:
        print(f"skipped {len(skipped)} unreadable images (--skip-bad-images), e.g. {skipped[0]}")
        metrics["skipped_images"] = float(len(skipped))
    return metrics, {**report["leak_detail"], "skipped_images": [str(f) for f in skipped]}


def check_pretrained(space: SearchSpace, datasets: dict) -> None:
    """Build each pretrained model once, so missing weights fail now and not in every trial."""
    dataset = next(iter(datasets.values()))
    for variant in space.variants.values() or [{}]:
        if True not in ([variant["pretrained"]] if "pretrained" in variant else space.values_of("pretrained")):
            continue
        models = [variant["model"]] if "model" in variant else space.values_of("model")
        for model in models:
            create_model(model, num_classes=dataset.num_classes, in_chans=dataset.channels,
                         img_size=int(dataset.dev.images.shape[1]), pretrained=True,
                         pretrained_path=space.fixed.get("pretrained_path"))


def check_tracking(uri: str):
    from analysis.tracking import check_tracking_uri

    try:
        return check_tracking_uri(uri)
    except ConnectionError as error:
        if "error code 401" in str(error) or "error code 403" in str(error):
            raise UserError(f"MLflow tracking server {uri} refused the login; set MLFLOW_TRACKING_USERNAME and "
                            "MLFLOW_TRACKING_PASSWORD (or ~/.mlflow/credentials)") from None
        raise UserError(f"MLflow tracking server {uri} is unreachable ({error}); start it or pass a reachable "
                        "--tracking-uri") from None


def storage_root(storage: str) -> str:
    return storage if "://" in storage else str(Path(storage).expanduser().resolve())


def _state_location(storage: str, name: str):
    """(filesystem, path) of a search's state file: local folder, s3:// or gs:// alike, as Ray stores them."""
    import pyarrow.fs

    return pyarrow.fs.FileSystem.from_uri(f"{storage_root(storage)}/{name}/{STATE_FILE}")


def read_state(storage: str, name: str) -> dict | None:
    """The state `write_state` left for search `name`, or None when there is no such search."""
    fs, path = _state_location(storage, name)
    try:
        with fs.open_input_stream(path) as handle:
            return yaml.safe_load(handle.read())
    except (FileNotFoundError, OSError):
        return None


def write_state(storage: str, name: str, state: dict) -> None:
    fs, path = _state_location(storage, name)
    fs.create_dir(path.rsplit("/", 1)[0])
    with fs.open_output_stream(path) as handle:
        handle.write(yaml.safe_dump(state, sort_keys=False).encode())


# --- the search ---------------------------------------------------------------------------------

def build_tuner(space: SearchSpace, name: str, storage: str, datasets: dict, callbacks: list, seed: int):
    from optuna.samplers import TPESampler
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler
    from ray.tune.search.optuna import OptunaSearch

    trainable = make_trainable(space, datasets)
    startup = max(2, min(10, space.num_samples // 3))
    searcher = OptunaSearch(metric=f"best_{space.metric}", mode=space.mode,
                            sampler=TPESampler(seed=seed, n_startup_trials=startup))
    if not space.params and not space.variants:
        searcher = None  # nothing to search: run the fixed config num_samples times
    scheduler = ASHAScheduler(time_attr="training_iteration", metric=space.metric, mode=space.mode,
                              max_t=space.max_t, grace_period=space.grace_period,
                              reduction_factor=space.reduction_factor)
    run_config = tune.RunConfig(
        name=name, storage_path=storage, callbacks=[*callbacks, ProgressLines(space)], verbose=0,
        checkpoint_config=tune.CheckpointConfig(num_to_keep=2, checkpoint_score_attribute=f"best_{space.metric}",
                                                checkpoint_score_order=space.mode),
        failure_config=tune.FailureConfig(max_failures=space.max_failures),
    )
    return tune.Tuner(trainable, param_space=space.param_space(), run_config=run_config,
                      tune_config=tune.TuneConfig(search_alg=searcher, scheduler=scheduler,
                                                  num_samples=space.num_samples,
                                                  max_concurrent_trials=space.max_concurrent,
                                                  trial_name_creator=trial_name, trial_dirname_creator=trial_name))


def trial_name(trial) -> str:
    return f"trial_{trial.trial_id}"


class ProgressLines(Callback):
    """One short line per epoch and per trial end, instead of Ray's wide tables."""

    def __init__(self, space: SearchSpace):
        self.metric, self.max_t, self.searched = space.metric, space.max_t, list(space.params)

    def on_trial_start(self, iteration, trials, trial, **info):
        print(f"[{trial.trial_id}] start " + " ".join(f"{k}={_fmt(trial.config.get(k))}" for k in self.searched), flush=True)

    def on_trial_result(self, iteration, trials, trial, result, **info):
        print(f"[{trial.trial_id}] epoch {result['training_iteration']}/{self.max_t} "
              f"{self.metric}={_fmt(result.get(self.metric))} ({result.get('epoch_seconds', 0):.0f}s)", flush=True)

    def on_trial_complete(self, iteration, trials, trial, **info):
        done = trial.last_result.get("training_iteration", 0) >= self.max_t
        print(f"[{trial.trial_id}] {'completed' if done else 'stopped early by ASHA'}", flush=True)

    def on_trial_error(self, iteration, trials, trial, **info):
        print(f"[{trial.trial_id}] FAILED (see {trial.error_file})", flush=True)


def make_trainable(space: SearchSpace, datasets: dict):
    """The function trainable with its data in the object store and its resources attached."""
    from ray import tune

    from trainables.ray_trainable import tune_trainable

    return tune.with_resources(tune.with_parameters(tune_trainable, datasets=datasets, variants=space.variants),
                               {"cpu": space.cpu, "gpu": space.gpu})


def restore_tuner(space: SearchSpace, name: str, storage: str, datasets: dict):
    from ray import tune

    return tune.Tuner.restore(f"{storage}/{name}", trainable=make_trainable(space, datasets), resume_unfinished=True,
                              resume_errored=False, param_space=space.param_space())


def start_ray(address: str | None, space: SearchSpace, debug: bool) -> None:
    import ray

    if not debug:  # our ProgressLines replace Ray's tables and banners
        os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    if address and (os.environ.get("RAY_AUTH_TOKEN") or os.environ.get("RAY_AUTH_TOKEN_PATH")):
        os.environ.setdefault("RAY_AUTH_MODE", "token")  # Ray switches token auth on by itself only for "auto"
    try:
        ray.init(address=address, include_dashboard=False, dashboard_host="127.0.0.1",
                 log_to_driver=debug, logging_level="ERROR" if not debug else "INFO")
    except ConnectionError as error:
        if address is None:
            raise
        raise UserError(f"Cannot join the Ray cluster at {address} ({str(error).splitlines()[0]}); check the address "
                        "and, with token authentication, set RAY_AUTH_MODE=token and the cluster's token "
                        "(RAY_AUTH_TOKEN_PATH, RAY_AUTH_TOKEN or ~/.ray/auth_token)") from None
    resources = ray.cluster_resources()
    if space.gpu > 0 and resources.get("GPU", 0) == 0:
        print(f"note: no GPU in the Ray cluster; trials run on CPU (asked for {space.gpu} GPU per trial)")
        space.gpu = 0
    if space.cpu > max(node["Resources"].get("CPU", 0) for node in ray.nodes() if node["Alive"]):
        raise UserError(f"{space.cpu} CPUs per trial but no node has that many; lower --cpus-per-trial")


def git_commit() -> str | None:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True,
                              cwd=Path(__file__).parent).stdout.strip() or None
    except (OSError, subprocess.CalledProcessError):
        return None


def search_tags(space: SearchSpace, seed: int) -> dict:
    tags = {"medtune.space": space.name, "medtune.dataset": space.dataset, "medtune.seed": str(seed),
            "medtune.version": importlib.metadata.version("medtune")}
    commit = git_commit()
    if commit:
        tags["mlflow.source.git.commit"] = commit
    return tags


def rank_trials(results, space: SearchSpace) -> list:
    """Trials best first, by validation only: `best_<metric>` among trials that trained to the end
    (ASHA-stopped trials have no test metrics), or among all successful ones when none did."""
    ok = [r for r in results if r.error is None and r.metrics]
    pool = [r for r in ok if r.metrics.get("training_iteration", 0) >= space.max_t] or ok
    key, sign = f"best_{space.metric}", (1 if space.mode == "max" else -1)

    def score(result) -> float:
        value = float(result.metrics.get(key, float("nan")))
        return sign * value if value == value else float("-inf")  # NaN ranks last

    return sorted(pool, key=score, reverse=True)


def print_summary(ranked, results, space: SearchSpace, top: int = 5) -> None:
    searched = list(space.params)
    key = f"best_{space.metric}"
    stopped = sum(1 for r in results if r.error is None and r.metrics.get("training_iteration", 0) < space.max_t)
    failed = sum(1 for r in results if r.error is not None)
    print(f"\n{len(results)} trials: {len(results) - stopped - failed} completed, {stopped} stopped early by ASHA, "
          f"{failed} failed")
    header = ["trial", *searched, "epochs", key, "test_auc", "test_acc"]
    rows = []
    for result in ranked[:top]:
        m = result.metrics
        rows.append([m.get("trial_id", "?"), *[_fmt(result.config.get(p)) for p in searched],
                     str(m.get("training_iteration")), _fmt(m.get(key)), _fmt(m.get("test_auc")), _fmt(m.get("test_acc"))])
    widths = [max(len(str(c)) for c in column) for column in zip(header, *rows)]
    for row in [header, *rows]:
        print("  ".join(str(c).ljust(w) for c, w in zip(row, widths)))
    if ranked:
        best = ranked[0]
        print("\nbest config:", json.dumps({p: best.config.get(p) for p in searched}, default=str))
        tests = {k: round(v, 4) for k, v in best.metrics.items() if k.startswith("test_") and isinstance(v, float)}
        print("best test metrics:", json.dumps(tests) if tests else "(none: the best trial did not finish)")


def _fmt(value) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def quiet_libraries(debug: bool) -> None:
    """MLflow, Ray Tune and Optuna log INFO chatter by default; keep the terminal to our lines."""
    import mlflow  # noqa: F401  (configures its loggers on import: set levels after)
    import optuna

    for library in ("mlflow", "ray.tune"):
        logging.getLogger(library).setLevel(logging.DEBUG if debug else logging.WARNING)
    optuna.logging.set_verbosity(optuna.logging.DEBUG if debug else optuna.logging.WARNING)


def run_search(space: SearchSpace, args, name: str, resuming: bool) -> int:
    from analysis.tracking import (MLflowTrialCallback, close_search, default_tracking_uri, flat_params,
                                   get_experiment_id, numeric_metrics, runs_table_url, start_search_run)

    quiet_libraries(args.debug)

    datasets = load_datasets(space, args.skip_bad_images)
    check_pretrained(space, datasets)
    leak_metrics_, leak_detail = check_leaks(space, datasets, args.seed)
    tracking_uri = args.tracking_uri or default_tracking_uri()
    client = check_tracking(tracking_uri)
    storage = storage_root(args.storage)

    import ray

    start_ray(args.address, space, args.debug)
    try:
        if not resuming:  # only once Ray is up: a failed join must not leave a search behind
            write_state(storage, name, {"space": space.as_dict(), "space_name": space.name, "seed": args.seed,
                                        "tracking_uri": tracking_uri, "skip_bad_images": args.skip_bad_images})
        experiment_id = get_experiment_id(client)
        parent_id = start_search_run(client, experiment_id, name, search_tags(space, args.seed))
        if not resuming:
            client.log_dict(parent_id, space.as_dict(), "search_space.yaml")
            client.log_dict(parent_id, leak_detail, "leak_report.json")
            client.log_batch(parent_id, metrics=numeric_metrics(leak_metrics_, 0))
            client.log_batch(parent_id, params=flat_params({"space": space.name, "dataset": space.dataset,
                                                            "num_samples": space.num_samples, "max_t": space.max_t,
                                                            "metric": space.metric, "seed": args.seed}))
        callback = MLflowTrialCallback(tracking_uri, parent_id, name, space.max_t)
        if resuming:
            tuner = restore_tuner(space, name, storage, datasets)
        else:
            tuner = build_tuner(space, name, storage, datasets, [callback], args.seed)
        results = tuner.fit()
        ranked = rank_trials(results, space)
        best = ranked[0] if ranked else None
        live = {r.metrics.get("trial_id") for r in results if r.metrics}
        best_run = close_search(client, parent_id, best.metrics.get("trial_id") if best else None,
                                best.metrics if best else {}, live)
        print_summary(ranked, results, space)
        print(f"\nresults:  {storage}/{name}")
        if best is not None and best.checkpoint is not None:
            print(f"best checkpoint: {best.checkpoint.path}")
        print(f"MLflow:   {tracking_uri} (parent run {parent_id}, best trial run {best_run})")
        print(f"MLflow UI: mlflow ui --backend-store-uri {tracking_uri}  then open {runs_table_url(tracking_uri, experiment_id)}")
    finally:
        ray.shutdown()
    return 0 if ranked else 1  # every trial failed: say so to scripts too


def main(argv=None) -> int:
    args = get_args_parser().parse_args(argv)
    try:
        if args.list_spaces:
            for name, path in shipped_spaces().items():
                print(f"{name:24s} {load_space(str(path)).description}")
            return 0
        if args.resume:
            state = read_state(args.storage, args.resume)
            if state is None:
                raise UserError(f"No search named {args.resume!r} in {storage_root(args.storage)}; "
                                "check --resume NAME and --storage")
            args.skip_bad_images = state.get("skip_bad_images", False)
            space = parse_space(state["space"], Path(f"{state['space_name']}.yaml"))
            args.seed = state["seed"]
            args.tracking_uri = args.tracking_uri or state["tracking_uri"]
            return run_search(space, args, args.resume, resuming=True)
        space = apply_overrides(load_space(args.space), args)
        name = args.name or f"{space.name}-{dt.datetime.now():%Y%m%d-%H%M%S}"
        if read_state(args.storage, name) is not None:
            raise UserError(f"A search named {name!r} already exists; resume it with --resume {name} or pick another --name")
        return run_search(space, args, name, resuming=False)
    except UserError as error:
        if args.debug:
            raise
        print(f"error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

"""medtune's main command: run a named search space with Optuna + ASHA on Ray Tune, tracked in MLflow.

    python tune.py --list-spaces
    python tune.py --space smoke
    python tune.py --space resnetd_depth --address auto --storage s3://bucket/medtune --tracking-uri http://mlflow:5000
    python tune.py --resume smoke-20261121-101500

Every user error (unknown space, bad value, missing data, unreachable tracking server or storage) is one line
on stderr with exit code 2, before Ray starts any trial. The work is done by modules named for their job:
search_spaces/ (the space, preflight checks, state file, the Tuner) and analysis/ (MLflow, ranking, summary).
"""

from __future__ import annotations

import argparse
import datetime as dt
import shlex
import signal
import sys
import time
from pathlib import Path

from search_spaces import SearchSpace, load_space, parse_space, shipped_spaces
from search_spaces.budget import budget_line, parse_duration
from search_spaces.overrides import (
    apply_overrides,
    check_resume_flags,
    check_resume_selection,
    check_saved_direction,
    pin_older_stem,
    resume_tracking_uri,
)
from trainables.errors import UserError
from trainables.tracking.ranking import FAILED
from trainables.tracking.state import budget_spent, check_storage, read_state, storage_root, write_state


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a bad flag is one line (`error: ...`) and exit 2, like every other user error."""

    def error(self, message: str):
        self.exit(2, f"error: {message}; see {self.prog} --help\n")


def positive(kind):
    def parse(text: str):
        value = kind(text)
        if value <= 0:
            raise argparse.ArgumentTypeError(f"{text} is not > 0")
        return value
    parse.__name__ = f"positive {kind.__name__}"
    return parse


def non_negative_float(text: str) -> float:
    value = float(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text} is negative")
    return value


def duration(text: str) -> float:
    try:
        return parse_duration(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from error


def get_args_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="tune.py", description="Hyperparameter search for medical image classification.")
    what = parser.add_mutually_exclusive_group(required=True)
    what.add_argument("--space", help="shipped space name (see --list-spaces) or path of your own YAML file")
    what.add_argument("--list-spaces", action="store_true", help="list the shipped spaces and exit")
    what.add_argument("--resume", metavar="NAME", help="resume the interrupted search NAME (same --storage)")
    parser.add_argument("--dataset", help="override the space's dataset (name, imagefolder:PATH, csv:PATH, ...)")
    parser.add_argument("--image-size", type=int, help="override the image size (pixels)")
    parser.add_argument("--data-root", help="folder with the datasets (default $MEDTUNE_DATA_ROOT or ~/.medmnist)")
    parser.add_argument("--skip-bad-images", action="store_true",
                        help="skip unreadable images (counted and logged) instead of stopping")
    parser.add_argument("--num-samples", type=positive(int), help="number of trials")
    parser.add_argument("--time-budget", type=duration, metavar="DURATION",
                        help="keep starting trials until this much time is spent (90s, 30m, 1.5h; a number = seconds); "
                             "the space's trial count no longer applies unless --num-samples is given too")
    parser.add_argument("--max-epochs", type=positive(int), help="epochs per trial (ASHA max_t)")
    parser.add_argument("--cpus-per-trial", type=positive(float), help="CPUs per trial")
    parser.add_argument("--gpus-per-trial", type=non_negative_float, help="GPUs per trial; fractions share a card")
    parser.add_argument("--max-concurrent", type=positive(int), help="trials running at once")
    parser.add_argument("--cv-folds", type=positive(int), metavar="K",
                        help="cross-validated trials: K fold models of the development pool each, ranked and stopped "
                             "on the fold mean (1..20; default the space's cv_folds, 1 = one validation split)")
    parser.add_argument("--metric", help="validation metric that picks each trial's best epoch and the winner "
                                         "(e.g. val_loss); overrides the space's")
    parser.add_argument("--mode", choices=("max", "min"), help="direction of --metric (default: the metric's own)")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="fix a trial config key (YAML value)")
    parser.add_argument("--address", help="join a running Ray cluster (e.g. auto); default: start a local one")
    parser.add_argument("--storage", default="medtune_results",
                        help="Ray results/checkpoints: a shared dir, s3:// or gs:// (default ./medtune_results)")
    parser.add_argument("--name", help="search name (default <space>-<timestamp>)")
    parser.add_argument("--tracking-uri",
                        help="MLflow tracking URI (default $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db here)")
    parser.add_argument("--seed", type=int, help="seeds the sampler and every trial (default 0)")
    parser.add_argument("--no-report", action="store_true",
                        help="skip the study report (reports/<search>/report.html) at the end; the run's description stays")
    parser.add_argument("--ensemble", type=positive(int), default=1, metavar="K",
                        help="at the end, select an ensemble of at most K trials from their validation predictions, "
                             "choose between it and the winner on a held-back half of validation (as "
                             "analysis.export --ensemble K) and print the choice and why")
    parser.add_argument("--ensemble-rule", choices=("select", "topk"), default="select",
                        help="with --ensemble: select (default, ensemble selection with weights) or topk (the top K "
                             "averaged, shipped by the one-SE rule)")
    parser.add_argument("--tta", action="store_true", help="with the end-of-search choice, also consider flip TTA")
    parser.add_argument("--debug", action="store_true", help="show tracebacks and Ray's progress output")
    return parser


def run_search(space: SearchSpace, args, name: str, seed: int, tracking_uri: str, resuming: bool) -> int:
    """Check everything, start Ray, run (or resume) the Tuner, name the winner in MLflow, print where it is."""
    import ray

    from analysis.summary import print_ensemble, print_summary, print_where, publish, rank_results, result_outcome
    from search_spaces import stopping
    from search_spaces.preflight import (
        check_folds,
        check_leaks,
        check_metric,
        check_pretrained,
        check_synthetic,
        check_tracking,
        dataset_refs,
        load_datasets,
    )
    from search_spaces.stopping import EXIT_CODES, SearchStop
    from search_spaces.tuner import build_tuner, make_trainable, quiet_libraries, restore_tuner, start_ray
    from trainables.tracking.mlflow_runs import (
        MLflowTrialCallback,
        checkpoint_location,
        get_experiment_id,
        numeric_metrics,
        search_client,
        search_params,
        search_tags,
        start_search_run,
        winner_metrics,
    )

    quiet_libraries(args.debug)
    storage = storage_root(args.storage)
    check_storage(args.storage)
    datasets = load_datasets(space)
    check_metric(space, datasets)
    check_pretrained(space, datasets)
    check_synthetic(space, datasets)
    check_folds(space, datasets, seed)
    leak_metrics, leak_detail = check_leaks(space, datasets, seed)
    tracking_uri = check_tracking(tracking_uri).tracking_uri  # without credentials: they stay in this process
    mlflow = search_client(tracking_uri, storage, name)  # every write from here on survives the server going away

    gpu = start_ray(args.address, space, args.debug)
    try:
        mlflow.flush(wait=True)  # what an earlier run of the search left queued goes first
        experiment_id = mlflow.attempt(get_experiment_id)  # needed at once: retried, then one line (nothing trained)
        parent_id = mlflow.attempt(start_search_run, experiment_id, name, search_tags(space.name, space.dataset, seed))
        if not resuming:  # only once Ray is up and the parent run exists: a failed start must not leave a search behind
            write_state(args.storage, name, {"space": space.as_dict(), "space_name": space.name, "seed": seed,
                                             "tracking_uri": tracking_uri})
            mlflow.log_dict(parent_id, space.as_dict(), "search_space.yaml")
            mlflow.log_dict(parent_id, leak_detail, "leak_report.json")
            mlflow.log_batch(parent_id, metrics=numeric_metrics(leak_metrics, 0),
                             params=search_params({**space.as_dict(), "name": space.name}, seed))
        trainable = make_trainable(space, dataset_refs(space, datasets), gpu)
        if resuming:
            tuner = restore_tuner(space, name, storage, trainable)
        else:
            callback = MLflowTrialCallback(tracking_uri, parent_id, name, space.max_t, space.time_budget, storage)
            tuner = build_tuner(space, name, storage, trainable, [callback], seed)
        started, stop = time.time(), SearchStop(storage, mlflow, args.debug)
        try:
            with stop.installed():
                results = tuner.fit()
        except KeyboardInterrupt:  # Ctrl-C again while stopping: at once, as a kill (runs stay RUNNING until resumed)
            print(f"\nstopped at once: Ray's last saved state stands; resume with:  {stopping.resume_command(name, args)}")
            return EXIT_CODES[signal.SIGINT]
        except Exception as error:  # Ray raises what failed in its loop: the storage's failure is one line
            if not stop.note_storage_failure(error):
                raise
            stopping.end_stopped(stop, [], space, args, name, mlflow, parent_id)
        if stop.requested:
            return stopping.end_stopped(stop, results, space, args, name, mlflow, parent_id)
        if resuming and "interrupted" in (saved := read_state(args.storage, name) or {}):  # it went on to its end
            write_state(args.storage, name, {key: value for key, value in saved.items() if key != "interrupted"})
        # the callback's budget clock decided whether Ray cut the running trials (over every run of the search)
        used, spent = budget_spent(read_state(args.storage, name), space.time_budget, time.time() - started)
        ranked = rank_results(results, space.metric, space.mode, space.max_t, spent)
        best = ranked[0] if ranked else None
        live = sorted(r.metrics.get("trial_id") for r in results if r.metrics)
        best_run = mlflow.call("close_search", parent_id, best.metrics.get("trial_id") if best else None,
                               winner_metrics(best.metrics) if best else {}, live)
        print_summary(ranked, results, space.searched_keys(), space.metric, space.max_t, budget_spent=spent,
                      budget=budget_line(space.time_budget, used) if space.time_budget else None)
        logged = mlflow.flush(wait=True)  # the server's last chance: it had the retry window again
        if logged and best is not None and (args.ensemble > 1 or args.tta):  # first: the description shows the hand-over
            print_ensemble(mlflow.client, parent_id, args.ensemble, args.tta, args.data_root, args.ensemble_rule)
        if logged:  # the run's description; reports/<name>/report.html
            logged = publish(mlflow, parent_id, report=not args.no_report)
        print(f"\nresults:  {storage}/{name}")
        if best is not None and checkpoint_location(best.checkpoint, best.metrics):
            print(f"best checkpoint: {checkpoint_location(best.checkpoint, best.metrics)}")
        print(f"MLflow:   {tracking_uri} (parent run {parent_id}, best trial run {best_run})")
        print_where(tracking_uri, experiment_id, parent_id)
        if not logged:
            missing = f"{len(mlflow.queue)} calls queued in {mlflow.queue_file()}" if mlflow.queue else "the description"
            print(f"MLflow did not get everything ({missing}); the results are in Ray storage. Once MLflow answers, "
                  f"log them with:\n  {sync_command(name, args.storage, not args.no_report)}")
    finally:
        ray.shutdown()
    ended = [result_outcome(r, space.max_t, spent) for r in results]
    return 0 if any(e != FAILED for e in ended) else 1  # every trial failed: say so to scripts too


def sync_command(name: str, storage: str, report: bool) -> str:
    """The one command that logs to MLflow what a search left in Ray storage (analysis.sync)."""
    return (f"python -m analysis.sync --search {shlex.quote(name)} --storage {shlex.quote(storage_root(storage))}"
            + ("" if report else " --no-report"))


def main(argv=None) -> int:
    args = get_args_parser().parse_args(argv)
    try:
        if args.list_spaces:
            for name, path in shipped_spaces().items():
                print(f"{name:24s} {load_space(str(path)).description}")
            return 0
        if args.resume:
            check_resume_flags(args)
            state = read_state(args.storage, args.resume)
            if state is None:
                raise UserError(f"No search named {args.resume!r} in {storage_root(args.storage)}; "
                                "check --resume NAME and --storage")
            check_saved_direction(args.resume, state["space"])
            space = pin_older_stem(parse_space(state["space"], Path(f"{state['space_name']}.yaml")))
            check_resume_selection(args, space)
            tracking_uri = resume_tracking_uri(args, state)
            return run_search(space, args, args.resume, state["seed"], tracking_uri, resuming=True)
        from trainables.tracking.mlflow_runs import tracking_uri_from

        space = apply_overrides(load_space(args.space), args)
        name = args.name or f"{space.name}-{dt.datetime.now():%Y%m%d-%H%M%S}"
        if read_state(args.storage, name) is not None:
            raise UserError(f"A search named {name!r} already exists; resume it with --resume {name} or pick another --name")
        return run_search(space, args, name, args.seed or 0, tracking_uri_from(args.tracking_uri), resuming=False)
    except UserError as error:
        if args.debug:
            raise
        print(f"error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

"""What the command line may change in a search: overrides of a new search, and what a resume must refuse.

Each flag is checked alone (so the error names the flag), then the whole space again.
"""

from __future__ import annotations

import os
from pathlib import Path

from search_spaces import SearchSpace, validate_space
from trainables.config import DEFAULTS, check_value, parse_overrides
from trainables.data.registry import TASKS
from trainables.errors import UserError
from trainables.tracking.ranking import selection_mode
from trainables.training.metrics import metric_names

# Flags that shape a search: a resumed search keeps the ones it started with, so giving one is an error.
SHAPING_FLAGS = {"dataset": "--dataset", "image_size": "--image-size", "data_root": "--data-root",
                 "skip_bad_images": "--skip-bad-images", "num_samples": "--num-samples", "max_epochs": "--max-epochs",
                 "cpus_per_trial": "--cpus-per-trial", "gpus_per_trial": "--gpus-per-trial",
                 "max_concurrent": "--max-concurrent", "cv_folds": "--cv-folds", "set": "--set", "name": "--name",
                 "seed": "--seed", "time_budget": "--time-budget"}



def apply_overrides(space: SearchSpace, args) -> SearchSpace:
    """The space with the command line's overrides, each flag checked alone, then the whole space again."""
    if args.dataset:
        from trainables.data.datasets import check_dataset_name

        check_dataset_name(args.dataset)
        space.dataset = args.dataset
    if args.image_size is not None:
        _check_flag("--image-size", "image_size", args.image_size)
        space.params.pop("image_size", None)
        space.fixed["image_size"] = args.image_size
    if args.time_budget is not None:  # the budget ends the search, not the space's trial count (unless given too)
        space.time_budget, space.num_samples = args.time_budget, args.num_samples
    for field, value in (("num_samples", args.num_samples), ("max_t", args.max_epochs), ("cpu", args.cpus_per_trial),
                         ("gpu", args.gpus_per_trial), ("max_concurrent", args.max_concurrent),
                         ("cv_folds", args.cv_folds)):
        if value is not None:
            setattr(space, field, value)
    if space.grace_period is not None:  # epoch rungs: the first one within the (maybe lowered) epochs
        space.grace_period = min(space.grace_period, space.max_t)
    for key, value in parse_overrides(args.set).items():
        if key == "cv_folds":
            raise UserError("--set cv_folds: the number of folds is the search's, not a trial key; use --cv-folds K")
        _check_flag(f"--set {key}", key, value)
        space.params.pop(key, None)
        space.fixed[key] = value
    if args.data_root:
        space.fixed["data_root"] = str(Path(args.data_root).expanduser().resolve())
    if args.skip_bad_images:
        space.fixed["skip_bad_images"] = True
    space.fixed["seed"] = args.seed or 0
    if not mentions(space, "stem"):  # stated in the saved space, so a resume never mistakes it for an older search
        space.fixed["stem"] = DEFAULTS["stem"]
    apply_selection(space, args.metric, args.mode)
    return validate_space(space, origin=f"{space.source} with the command line's overrides")


def mentions(space: SearchSpace, key: str) -> bool:
    return key in space.fixed or key in space.params or any(key in keys for keys in space.variants.values())


def pin_older_stem(space: SearchSpace) -> SearchSpace:
    """A search saved before the `stem` key existed built its trials with timm's ImageNet stem: resume it so."""
    if not mentions(space, "stem"):
        space.fixed["stem"] = "imagenet"
    return space


def apply_selection(space: SearchSpace, metric: str | None, mode: str | None) -> None:
    """--metric / --mode: the validation metric that picks each trial's best epoch and the search's winner, and its
    direction (inferred from the metric when --mode is left out). Whether the dataset's task logs it: preflight."""
    if metric is None and mode is None:
        return
    metric = metric or space.metric
    if not metric.startswith("val_"):
        raise UserError(f"--metric {metric}: selection uses validation metrics only (the test split never selects "
                        "anything); use val_..., e.g. val_auc or val_loss")
    known = dict.fromkeys(name for task in TASKS for name in metric_names(task))
    name = metric.removeprefix("val_")
    if name not in known and not name.startswith("auc_"):  # auc_<label>: multi-label, named by the data's labels
        raise UserError(f"--metric {metric} is not a metric trials log; valid: "
                        f"{', '.join('val_' + n for n in known)} (multi-label also val_auc_<label>)")
    try:
        space.metric, space.mode = metric, selection_mode(metric, mode, flag="--mode")
    except ValueError as error:
        raise UserError(str(error)) from error


def _check_flag(flag: str, key: str, value) -> None:
    try:
        check_value(key, value)
    except UserError as error:
        raise UserError(f"{flag}: {error}") from error


def check_resume_flags(args) -> None:
    """A resumed search runs as it was started: a flag it would ignore is refused, not dropped."""
    given = [flag for attr, flag in SHAPING_FLAGS.items() if getattr(args, attr) not in (None, False, [])]
    if given:
        raise UserError(f"--resume continues search {args.resume!r} as it was started, so {given[0]} would be "
                        f"ignored; remove it, or start a new search with --space")


def check_resume_selection(args, saved: SearchSpace) -> None:
    """--metric / --mode on a resume: accepted when they repeat the saved search's, refused when they differ."""
    for flag, asked, kept in (("--metric", args.metric, saved.metric), ("--mode", args.mode, saved.mode)):
        if asked is not None and asked != kept:
            raise UserError(f"--resume continues search {args.resume!r}, which selects by {saved.metric} "
                            f"({saved.mode}), so {flag} {asked} would change what its trials were chosen by; "
                            f"remove {flag}, or start a new search with --space")


def check_saved_direction(name: str, saved: dict) -> None:
    """A search saved by an earlier medtune that gave a space without `mode` the direction max whatever its metric
    (so it maximised val_loss): its sampler and scheduler learnt that direction, so it is not resumed."""
    metric, mode = saved.get("metric", "val_auc"), saved.get("mode")
    try:
        selection_mode(metric, mode)
    except ValueError as error:
        raise UserError(f"Search {name!r} was started with mode {mode} for metric {metric} (an earlier medtune's "
                        "default, the wrong direction), so it cannot be resumed; start a new search with --space") \
            from error


def resume_tracking_uri(args, state: dict) -> str:
    """The MLflow server the search started with; a different --tracking-uri or $MLFLOW_TRACKING_URI is refused."""
    from trainables.tracking.mlflow_runs import normalise_tracking_uri, without_credentials

    stored = state["tracking_uri"]
    asked = args.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
    if asked and without_credentials(normalise_tracking_uri(asked)) != stored:
        source = "--tracking-uri" if args.tracking_uri else "MLFLOW_TRACKING_URI"
        raise UserError(f"Search {args.resume!r} logs to MLflow at {stored}, but {source} is "
                        f"{without_credentials(asked)}; a resume must log where the search started: pass "
                        f"--tracking-uri {stored} or unset {source}")
    return normalise_tracking_uri(asked) if asked else stored

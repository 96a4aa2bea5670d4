"""Every check a search makes before it spends compute: data, pretrained weights, leaks, MLflow, storage.

Each failure is a UserError (one line, exit 2) raised before Ray starts.
"""

from __future__ import annotations

from search_spaces import SearchSpace
from trainables.augment.synthetic import check_synthetic_task
from trainables.data.datasets import dataset_ref, load_dataset
from trainables.data.leaks import format_leak_report, leak_metrics, leak_report
from trainables.data.splits import cv_fold_indices, train_val_indices
from trainables.errors import UserError
from trainables.models import create_model
from trainables.training.metrics import metric_names


def _load_arguments(space: SearchSpace) -> dict:
    return {key: space.values_of(key)[0] for key in ("data_root", "skip_bad_images", "split_version")}


def load_datasets(space: SearchSpace) -> dict:
    """Every (dataset, image size) a trial may ask for, loaded once on the driver (missing data fails here; file
    datasets are decoded into their cache now, so trials on this node find it built)."""
    return {(space.dataset, int(size)): load_dataset(space.dataset, image_size=int(size), **_load_arguments(space))
            for size in space.values_of("image_size")}


def dataset_refs(space: SearchSpace, datasets: dict) -> dict:
    """What trials get instead of `datasets`: references they open themselves (trainables.data.datasets.DatasetRef),
    so no image goes through Ray's object store and the driver's memory maps are never copied."""
    return {(spec, size): dataset_ref(dataset, spec, image_size=size, **_load_arguments(space))
            for (spec, size), dataset in datasets.items()}


def check_leaks(space: SearchSpace, datasets: dict, seed: int) -> tuple[dict, dict]:
    """Duplicate images and shared patients across train/val/test, printed now; (metrics, detail) for MLflow."""
    dataset = next(iter(datasets.values()))
    split_version = space.values_of("split_version")[0]
    report = leak_report(dataset, *train_val_indices(dataset, space.values_of("split_ratio")[0], seed, split_version))
    print(format_leak_report(report))
    metrics = leak_metrics(report)
    skipped = getattr(dataset, "skipped_files", ())
    if skipped:
        print(f"skipped {len(skipped)} unreadable images (--skip-bad-images), e.g. {skipped[0]}")
        metrics["skipped_images"] = float(len(skipped))
    return metrics, {**report["leak_detail"], "skipped_images": [str(f) for f in skipped]}


def check_folds(space: SearchSpace, datasets: dict, seed: int) -> None:
    """With cv_folds > 1, make the folds once: too few images, patients or class members fail here."""
    if space.cv_folds > 1:
        cv_fold_indices(next(iter(datasets.values())), space.cv_folds, seed)


def check_metric(space: SearchSpace, datasets: dict) -> None:
    """The selection metric is one the dataset's task logs (a binary task has no val_hamming_loss)."""
    dataset = next(iter(datasets.values()))
    names = metric_names(dataset.task, dataset.class_names)
    if space.metric.removeprefix("val_") not in names:
        raise UserError(f"metric {space.metric} is not logged for {space.dataset} ({dataset.task}); valid: "
                        f"{', '.join('val_' + n for n in names)}; set it with --metric or the space's metric")


def check_pretrained(space: SearchSpace, datasets: dict) -> None:
    """Build each pretrained model once, so missing weights fail now and not in every trial."""
    dataset = next(iter(datasets.values()))
    for variant in space.variants.values() or [{}]:
        if True not in ([variant["pretrained"]] if "pretrained" in variant else space.values_of("pretrained")):
            continue
        models = [variant["model"]] if "model" in variant else space.values_of("model")
        stem = variant.get("stem", space.values_of("stem")[0])  # the stem changes no weight: any valid one will do
        for model in models:
            create_model(model, num_classes=dataset.num_classes, in_chans=dataset.channels,
                         img_size=int(dataset.dev.images.shape[1]), pretrained=True,
                         pretrained_path=space.fixed.get("pretrained_path"), stem=stem)


def check_synthetic(space: SearchSpace, datasets: dict) -> None:
    """Generated images (`synthetic_pct`) need single-label classes: a multi-label dataset fails now, not per trial."""
    if "synthetic_pct" in space.params or any(float(v) > 0 for v in space.values_of("synthetic_pct")):
        check_synthetic_task(next(iter(datasets.values())).task, space.dataset)


def check_tracking(uri: str):
    """A client for the tracking server that has answered; a login or network problem is one line."""
    from trainables.tracking.mlflow_runs import check_tracking_uri, without_credentials

    try:
        return check_tracking_uri(uri)
    except ConnectionError as error:
        shown = without_credentials(uri)
        if "error code 401" in str(error) or "error code 403" in str(error):
            raise UserError(f"MLflow tracking server {shown} refused the login; set MLFLOW_TRACKING_USERNAME and "
                            "MLFLOW_TRACKING_PASSWORD (or ~/.mlflow/credentials)") from error
        raise UserError(f"MLflow tracking server {shown} is unreachable ({error}); start it or pass a reachable "
                        "--tracking-uri (or set MLFLOW_TRACKING_URI)") from error

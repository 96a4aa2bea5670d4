"""What the export fits on validation and measures on test, for one shipped network.

Fitted on validation only (out-of-fold predictions for a cross-validated winner): the temperature and, for binary
tasks, the decision threshold (`fit_decision`). Measured on test, never fitted on: the exported model's metrics
with bootstrap CIs and its confusion matrices (`score_test`). Also the calibration figures before/after the
temperature, the image counts of each split and the winner's searched values, as metrics.json records them.
"""

from __future__ import annotations

import numpy as np

from analysis.bootstrap import metrics_with_ci
from analysis.calibration import calibrated, choose_threshold, expected_calibration_error, fit_temperature, nll
from analysis.replay import Replay
from trainables.training.metrics import classification_metrics, confusion, probabilities


def fit_decision(val_logits: np.ndarray, val_labels: np.ndarray, task: str, class_names,
                 target_sensitivity: float | None = None) -> dict:
    """Temperature (all tasks) and, for binary tasks, the threshold on the calibrated positive probability. An
    ensemble's `val_logits` are its output (log of the mean calibrated probability): its T rescales that."""
    temperature = fit_temperature(val_logits, val_labels, task)
    decision = {"temperature": temperature, "threshold": None, "positive_class": None, "threshold_rule": None}
    if task == "binary":
        threshold, rule = choose_threshold(val_labels, calibrated(val_logits, task, temperature)[:, 1], target_sensitivity)
        decision.update(threshold=threshold, positive_class=class_names[1], threshold_rule=rule)
    return decision


def decision_data(state: dict, rep: Replay) -> tuple[np.ndarray, np.ndarray]:
    """What the threshold and temperature are fitted on: a cross-validated trial's out-of-fold predictions (every
    development image, scored by the fold model that held it out), else the trial's validation split replayed."""
    if "oof" in state:
        return state["oof"]["logits"].numpy(), state["oof"]["labels"].numpy()
    return rep.logits(rep.model, rep.val)


def calibration_report(logits: np.ndarray, labels: np.ndarray, task: str, temperature: float) -> dict:
    before, after = probabilities(task, logits), calibrated(logits, task, temperature)
    return {"ece_before": expected_calibration_error(labels, before, task),
            "ece_after": expected_calibration_error(labels, after, task),
            "nll_before": nll(logits, labels, task), "nll_after": nll(logits, labels, task, temperature)}


def score_test(model, rep: Replay, decision: dict, n_resamples: int, seed: int) -> dict:
    """Test metrics of the exported model: at the argmax rule (the trial's) and at the chosen threshold."""
    task, names = rep.dataset.task, rep.dataset.class_names
    logits, labels = rep.logits(model, rep.test)
    probs = probabilities(task, logits)
    scored = {"n": int(len(labels)), "logits": logits, "labels": labels,
              "metrics": classification_metrics(task, labels, probs, names),
              "argmax": metrics_with_ci(task, labels, probs, 0.5, n_resamples, seed=seed),
              "confusion_argmax": confusion(task, labels, probs).tolist()}
    if decision["threshold"] is not None:
        cal = calibrated(logits, task, decision["temperature"])
        scored["threshold"] = metrics_with_ci(task, labels, cal, decision["threshold"], n_resamples, seed=seed)
        scored["confusion_threshold"] = confusion(task, labels, cal, decision["threshold"]).tolist()
    return scored


def searched_values(keys: list[str], config: dict, trial) -> dict:
    """The winner's value of each searched key: from its config, or as logged (`variant` is expanded into the
    config keys it fixes, so only the trial's MLflow params name it)."""
    return {k: config[k] if k in config else trial.data.params.get(k) for k in keys}


def split_summary(rep: Replay, fold: int = 0) -> dict:
    """Image counts per split; `fold`: which fold model of a cross-validated trial was exported."""
    def counts(labels):
        if labels.ndim == 2:
            return {n: int(c) for n, c in zip(rep.dataset.class_names, labels.sum(axis=0))}
        return {n: int((labels == i).sum()) for i, n in enumerate(rep.dataset.class_names)}

    dev = rep.dataset.dev
    return {"train": {"n": int(len(rep.train_index)), "per_class": counts(dev.labels[rep.train_index])},
            "val": {"n": int(len(rep.val_index)), "per_class": counts(dev.labels[rep.val_index])},
            "test": {"n": int(len(rep.test)), "per_class": counts(rep.test.labels)},
            "split_ratio": rep.config["split_ratio"], "seed": rep.config["seed"],
            "cv_folds": int(rep.config.get("cv_folds", 1)), "fold": fold,
            "patient_grouped": dev.groups is not None}

"""Does the shipped model still compute what the trial computed? The reproduction check and the precision change.

`reproduction`: the best checkpoint replayed on the trial's own device and precision (analysis.replay) must give the
trial's logged test metrics, exactly where this machine repeats the trial's arithmetic and within TOLERANCE where
it cannot; otherwise the data or the checkpoint is wrong and the export fails. `precision_change`: how many test
predictions flip, and how far each metric moves, between that replay and the exported float32 model. Each has its
one-sentence text, shared by the model card and the export's printed summary.
"""

from __future__ import annotations

import numpy as np

from analysis.replay import Replay
from trainables.training.metrics import classification_metrics, predictions, probabilities

# How closely a replay of the best checkpoint must reproduce the trial's logged test metrics. Exact where the
# replay repeats the trial's arithmetic (CPU, same precision; AUC to 1e-6 for float summation order); within
# TOLERANCE where it cannot (a CUDA trial replayed elsewhere or on another GPU, a checkpoint that does not
# record its setting): accuracy within 1 point or 2 test images' worth, whichever is larger, AUC within 0.005.
# Wrong data or a wrong checkpoint moves them by far more.
EXACT = {"acc": 0.0, "auc": 1e-6}
TOLERANCE = {"acc": 0.01, "auc": 0.005}
TOLERANCE_IMAGES = 2
SHOWN_FLIPS = 20  # flipped test images listed by index in metrics.json


def tolerances(exact: bool, n: int) -> dict:
    """{metric: allowed |replayed - logged|}: EXACT, or TOLERANCE (accuracy at least TOLERANCE_IMAGES / n)."""
    if exact:
        return dict(EXACT)
    return {"acc": max(TOLERANCE["acc"], TOLERANCE_IMAGES / max(n, 1)), "auc": TOLERANCE["auc"]}


def reproduction(replayed: dict, logged: dict, rep: Replay, n: int) -> dict:
    """The best checkpoint replayed on the trial's setting vs the trial's logged test acc/AUC."""
    allowed = tolerances(rep.exact, n)
    check = {}
    for key, tolerance in allowed.items():
        mine, theirs = replayed.get(key), logged.get(f"test_{key}")
        check[key] = {"replayed": mine, "logged": theirs, "tolerance": tolerance,
                      "match": None if theirs is None or mine is None else bool(abs(mine - theirs) <= tolerance)}
    return {"trial": rep.trial.as_dict(), "replayed_on": rep.replayed.as_dict(), "exact": rep.exact,
            "metrics": check, "ok": all(v["match"] is not False for v in check.values())}


def precision_change(trial_logits: np.ndarray, exported_logits: np.ndarray, labels: np.ndarray, rep: Replay,
                     logged: dict) -> dict:
    """The exported float32 model vs the trial-setting replay on the test split: flipped predictions at the
    argmax rule (multi-label: any label at 0.5) and every metric's difference (exported - replayed)."""
    task, names = rep.dataset.task, rep.dataset.class_names
    trial_probs, exported_probs = probabilities(task, trial_logits), probabilities(task, exported_logits)
    before, after = predictions(task, trial_probs), predictions(task, exported_probs)
    changed = before != after
    flipped = np.flatnonzero(changed.any(axis=1) if changed.ndim == 2 else changed)
    replayed = classification_metrics(task, labels, trial_probs, names)
    exported = classification_metrics(task, labels, exported_probs, names)
    change = {"from": str(rep.replayed), "to": "cpu fp32 (the exported model)", "same_setting": rep.fp32_is_trial,
              "n": int(len(labels)),
              "flips": int(len(flipped)), "flipped_test_indices": flipped[:SHOWN_FLIPS].tolist(),
              "max_abs_logit_difference": float(np.abs(trial_logits - exported_logits).max()) if len(labels) else 0.0,
              "metrics": {k: {"exported": exported[k], "replayed": replayed[k], "logged": logged.get(f"test_{k}"),
                              "difference": exported[k] - replayed[k]} for k in exported}}
    if task == "multilabel":
        change["label_flips"] = int(changed.sum())
    return change


def reproduction_text(repro: dict) -> str:
    """The reproduction check in one sentence: where it was replayed and each metric against the logged one."""
    def one(key, check):
        if check["logged"] is None or check["replayed"] is None:
            return f"{key} {check['replayed']} (nothing logged to compare)"
        verdict = "equal" if check["replayed"] == check["logged"] else \
            f"match within {check['tolerance']:g}" if check["match"] else f"MISMATCH, tolerance {check['tolerance']:g}"
        return f"{key} {check['replayed']:.6f} vs logged {check['logged']:.6f} ({verdict})"

    where = repro["replayed_on"]
    how = "the trial's own setting" if repro["exact"] else \
        f"the trial's setting as closely as this machine allows; trial: {_setting(repro['trial'])}"
    return (f"replayed on {_setting(where)} ({how}): " + "; ".join(one(k, v) for k, v in repro["metrics"].items()))


def _setting(setting: dict) -> str:
    return f"{setting['device'] or 'unknown device'} {setting['precision'] or 'unknown precision'}"


def change_text(change: dict) -> str:
    """The precision change in one sentence: flips between the trial's setting and float32, metric moves."""
    if change["same_setting"]:
        return (f"none: the trial evaluated in {change['from']}, the exported model's own arithmetic "
                f"({change['flips']} of {change['n']} test predictions flip)")
    metrics = change["metrics"]
    moved = ", ".join(f"{k} {metrics[k]['difference']:+.4f}" for k in ("acc", "auc") if k in metrics)
    labels = f" ({change['label_flips']} label decisions)" if "label_flips" in change else ""
    return (f"{change['flips']} of {change['n']} test predictions flip{labels} between {change['from']} and the "
            f"exported float32 model; metric change (exported - replayed): {moved}; largest logit difference "
            f"{change['max_abs_logit_difference']:.2g}")

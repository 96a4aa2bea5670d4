"""Test metrics per subgroup (sex, age band, view, ...): does the model work as well for every group of patients?

The groups come from the per-image attributes the dataset's loader read (trainables.data.attributes): one group per
value of each attribute, an age in fixed bands (AGE_BANDS). Each group is scored on its own test rows with the
same metrics and the same bootstrap as the whole test split (analysis.bootstrap), and flagged when its 95 % CI
lies wholly below the overall figure. Reported only: nothing (epoch, trial, threshold, temperature) is chosen on
a subgroup.

Rules, fixed before any number is seen:
- a group of fewer than MIN_IMAGES images is listed with its count but not scored (an AUC on a dozen images is
  noise); binary / multi-class: nor is one where a class has fewer than MIN_POSITIVES images;
- multi-label: a group's macro AUC is over the labels with at least MIN_POSITIVES positives (and one negative)
  in it, and is compared with the overall macro AUC over those same labels; with no such label it is not scored;
- the figures use the probabilities and the decision rule the caller gives (the export: the shipped model's
  calibrated probabilities at its threshold; the search's description: the trial's own, at the argmax rule).
"""

from __future__ import annotations

import math
import warnings

import numpy as np
from scipy import stats

from analysis.bootstrap import CONFIDENCE, bootstrap_ci, core_metrics, format_ci, interval_metric_names, metrics_with_ci
from trainables.data.attributes import MISSING, is_age
from trainables.tracking.text import markdown_table

# Twenty-year bands, fixed in advance: the bands the chest X-ray fairness audits report (Seyyed-Kalantari et al.,
# "Underdiagnosis bias of AI algorithms applied to chest radiographs", Nature Medicine 2021: 0-20, 20-40, 40-60,
# 60-80, 80+), so cards of different searches and datasets compare; bands from the test split's own quantiles
# would move with every split. (upper bound, exclusive; label)
AGE_BANDS = ((20.0, "<20"), (40.0, "20-39"), (60.0, "40-59"), (80.0, "60-79"), (math.inf, "80+"))
MAX_AGE = 120.0  # above it an age is an entry error (the full NIH table has a few of 148-414 years): band unknown
MIN_IMAGES = 30
MIN_POSITIVES = 5
SHOWN = {"binary": ("auc", "acc", "sensitivity", "specificity"), "multiclass": ("auc", "acc", "balanced_acc"),
         "multilabel": ("auc",)}
NAMES = {"auc": "AUC", "acc": "accuracy", "sensitivity": "sensitivity", "specificity": "specificity",
         "balanced_acc": "balanced accuracy"}
NO_ATTRIBUTES = ("the dataset carries no per-image attributes (sex, age, view), so no subgroup can be scored; "
                 "MedMNIST files have none, `nih_chestxray14:` reads them from its table, `csv:` from the "
                 "columns named with `?subgroups=sex,age`")


def age_band(years: float) -> str:
    """The AGE_BANDS label of an age in years; MISSING for NaN and for an impossible age (< 0 or > MAX_AGE)."""
    if math.isnan(years) or not 0 <= years <= MAX_AGE:
        return MISSING
    return next(label for upper, label in AGE_BANDS if years < upper)


def group_values(name: str, values: np.ndarray) -> tuple[np.ndarray, list[str]]:
    """(each image's group, the groups in reading order): an age column in AGE_BANDS (band order), others by value
    (sorted); MISSING last."""
    if is_age(name):
        grouped = np.array([age_band(float(v)) for v in values], dtype=object)
        order = [label for _, label in AGE_BANDS]
    else:
        grouped = np.asarray(values).astype(str).astype(object)
        order = sorted(set(grouped) - {MISSING})
    present = set(grouped)
    return grouped, [g for g in order if g in present] + ([MISSING] if MISSING in present else [])


def rank_auc(labels: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """Per column, the ROC AUC as the Mann-Whitney U statistic from SciPy's average ranks (ties count a half, as
    scikit-learn's roc_auc_score): one ranking of every column at once, so a multi-label bootstrap of 2,000
    resamples takes a second, not a minute. NaN for a column with one class only."""
    ranks = stats.rankdata(scores, axis=0)
    positives = labels.sum(axis=0).astype(float)
    negatives = len(labels) - positives
    with np.errstate(divide="ignore", invalid="ignore"):
        return ((ranks * labels).sum(axis=0) - positives * (positives + 1) / 2) / (positives * negatives)


def macro_auc(labels: np.ndarray, probs: np.ndarray) -> float:
    """The mean AUC of the labels defined on these rows (NaN when none is)."""
    aucs = rank_auc(labels, probs)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all NaN: a resample with one class in every label
        return float(np.nanmean(aucs))


def _eligibility(task: str, names, labels: np.ndarray) -> tuple[str | None, list[int] | None, dict]:
    """(why the group is not scored or None, the label columns a multi-label group is scored on, counts per class)."""
    if labels.ndim == 2:
        counts = {n: int(c) for n, c in zip(names, labels.sum(axis=0))}
        scored = [j for j in range(labels.shape[1]) if MIN_POSITIVES <= labels[:, j].sum() < len(labels)]
    else:
        counts = {n: int((labels == i).sum()) for i, n in enumerate(names)}
        scored = None
    if len(labels) < MIN_IMAGES:
        return f"fewer than {MIN_IMAGES} images", scored, counts
    if labels.ndim == 2 and not scored:
        return f"no label has {MIN_POSITIVES} positives", scored, counts
    few = [n for n, c in counts.items() if c < MIN_POSITIVES]
    if labels.ndim == 1 and few:
        return f"class {few[0]} has {counts[few[0]]} image(s), fewer than {MIN_POSITIVES}", scored, counts
    return None, scored, counts


def _point(task: str, labels: np.ndarray, probs: np.ndarray, threshold: float, columns: list[int] | None) -> dict:
    """{metric: value} of SHOWN[task] on these rows (multi-label: macro AUC over `columns`)."""
    if task == "multilabel":
        return {"auc": macro_auc(labels[:, columns], probs[:, columns])}
    values = dict(zip(interval_metric_names(task), core_metrics(task, labels, probs, threshold)))
    return {k: float(values[k]) for k in SHOWN[task]}


def _with_ci(task: str, labels: np.ndarray, probs: np.ndarray, threshold: float, columns: list[int] | None,
             n_resamples: int, seed: int) -> dict:
    """{metric: {"value", "low", "high"}} of SHOWN[task], by analysis.bootstrap over the group's images."""
    if task != "multilabel":
        cis = metrics_with_ci(task, labels, probs, threshold, n_resamples, seed=seed)
        return {k: cis[k] for k in SHOWN[task]}
    labels, probs = labels[:, columns], probs[:, columns]
    low, high = bootstrap_ci(lambda rows: macro_auc(labels[rows], probs[rows]), np.arange(len(labels)),
                             n_resamples=n_resamples, seed=seed)
    return {"auc": {"value": macro_auc(labels, probs), "low": float(low[0]), "high": float(high[0])}}


def score_groups(task: str, names, labels: np.ndarray, probs: np.ndarray, threshold: float | None,
                 attributes: dict | None, n_resamples: int, seed: int = 0, cis: bool = True,
                 only: tuple[str, str] | None = None) -> list[dict]:
    """One row per (attribute, group): its count, per-class counts, whether it is scored and why not, its metrics
    (with CIs when `cis`, else point values under "value"), the overall figure it is compared with, and the metrics
    whose CI lies wholly below that figure ("below_overall"). `only`: (attribute, group) of the one row wanted."""
    threshold = 0.5 if threshold is None else threshold
    rows = []
    for attribute, values in (attributes or {}).items():
        grouped, order = group_values(attribute, values)
        for group in order:
            if only is not None and (attribute, group) != only:
                continue
            index = np.flatnonzero(grouped == group)
            why, columns, counts = _eligibility(task, names, labels[index])
            row = {"attribute": attribute, "group": group, "n": int(len(index)), "per_class": counts,
                   "scored": why is None, "not_scored_because": why}
            if why is None:
                overall = _point(task, labels, probs, threshold, columns)
                if cis:
                    metrics = _with_ci(task, labels[index], probs[index], threshold, columns, n_resamples, seed)
                else:
                    metrics = {k: {"value": v} for k, v in _point(task, labels[index], probs[index], threshold,
                                                                 columns).items()}
                row.update(metrics=metrics, overall=overall,
                           below_overall=[k for k, v in metrics.items() if "high" in v and v["high"] < overall[k]])
                if columns is not None:
                    row["labels_scored"] = [names[j] for j in columns]
            rows.append(row)
    return rows


def weakest(rows: list[dict]) -> dict | None:
    """The scored group with the lowest AUC (the one metric every task has), None when none is scored."""
    scored = [r for r in rows if r["scored"] and not math.isnan(r["metrics"]["auc"]["value"])]
    return min(scored, key=lambda r: r["metrics"]["auc"]["value"]) if scored else None


def weakest_group(task: str, names, labels: np.ndarray, probs: np.ndarray, attributes: dict | None,
                  n_resamples: int, seed: int = 0) -> dict | None:
    """The weakest scored group's row at the argmax rule, with its CI (the others get point values only: the
    search's description names one group, and pays for one bootstrap); None when no group is scored."""
    low = weakest(score_groups(task, names, labels, probs, None, attributes, n_resamples, seed, cis=False))
    if low is None:
        return None
    only = (low["attribute"], low["group"])
    return score_groups(task, names, labels, probs, None, attributes, n_resamples, seed, only=only)[0]


def subgroup_report(task: str, names, labels: np.ndarray, probs: np.ndarray, threshold: float | None,
                    attributes: dict | None, n_resamples: int, seed: int, rule: str) -> dict:
    """What metrics.json keeps: every group's row (score_groups), the weakest, the rules; `rule` says whose
    probabilities and which decision rule the figures use."""
    if not attributes:
        return {"attributes": [], "groups": [], "note": NO_ATTRIBUTES}
    rows = score_groups(task, names, labels, probs, threshold, attributes, n_resamples, seed)
    low = weakest(rows)
    return {"attributes": list(attributes), "groups": rows, "rule": rule,
            "weakest": None if low is None else {"attribute": low["attribute"], "group": low["group"]},
            "age_bands": [label for _, label in AGE_BANDS], "min_images": MIN_IMAGES, "min_positives": MIN_POSITIVES,
            "bootstrap": {"n_resamples": n_resamples, "confidence": CONFIDENCE, "seed": seed}}


def reported_weakest(report: dict) -> dict | None:
    """The weakest group's row of a subgroup_report, None when none was scored."""
    named = report.get("weakest")
    return next((r for r in report["groups"] if named == {"attribute": r["attribute"], "group": r["group"]}), None)


def summary_line(report: dict) -> str:
    """One line for the export's printed summary."""
    low = reported_weakest(report)
    if low is not None:
        return f"weakest {weakest_text(low)}"
    return report.get("note") or f"no group of {MIN_IMAGES}+ images to score"


def group_name(row: dict) -> str:
    return f"{row['attribute']} {row['group']}"


def weakest_text(row: dict) -> str:
    """`sex F (n = 104): AUC 0.712 [0.650, 0.771] vs 0.801 overall, CI wholly below it`."""
    auc = row["metrics"]["auc"]
    shown = format_ci(auc) if "high" in auc else f"{auc['value']:.3f}"
    below = ", its CI wholly below it" if "auc" in row.get("below_overall", []) else ""
    macro = " (macro over its labels with 5+ positives)" if "labels_scored" in row else ""
    return f"{group_name(row)} (n = {row['n']}): AUC{macro} {shown} vs {row['overall']['auc']:.3f} overall{below}"


def card_section(report: dict, task: str) -> str:
    """The model card's "Subgroups" section (Markdown) from what subgroup_report returned."""
    if not report["groups"]:
        return f"## Subgroups\n\nNot reported: {report['note']}.\n"
    shown = SHOWN[task]
    rows = []
    for row in report["groups"]:
        if row["scored"]:
            cells = [format_ci(row["metrics"][k]) for k in shown]
            flag = "below overall: " + ", ".join(NAMES[k] for k in row["below_overall"]) if row["below_overall"] else ""
        else:
            cells, flag = ["not scored"] * len(shown), row["not_scored_because"]
        rows.append([row["attribute"], row["group"], row["n"], *cells, flag])
    overall = next((r["overall"] for r in report["groups"] if r["scored"] and task != "multilabel"), None)
    overall_line = ("Overall, the same rule: " + ", ".join(f"{NAMES[k]} {v:.3f}" for k, v in overall.items()) + ".\n\n"
                    if overall else "")
    low = reported_weakest(report)
    flagged = [group_name(r) for r in report["groups"] if r["scored"] and r["below_overall"]]
    small = (f"A group of fewer than {report['min_images']} images"
             + ("" if task == "multilabel" else f", or with a class under {report['min_positives']} images")
             + " is listed but not scored.")
    multilabel = (f" Multi-label: each group's macro AUC is over the labels with at least {report['min_positives']} "
                  "positives (and one negative) in it, compared with the overall macro AUC over the same labels "
                  "(`labels_scored` in metrics.json).") if task == "multilabel" else ""
    boot = report["bootstrap"]
    intro = (f"Test metrics per group of {', '.join(f'`{a}`' for a in report['attributes'])}, from {report['rule']}; "
             f"95 % percentile bootstrap intervals over each group's images ({boot['n_resamples']} resamples, seed "
             f"{boot['seed']}). Age is in fixed 20-year bands ({', '.join(report['age_bands'])}), the bands chest X-ray "
             "fairness audits report (Seyyed-Kalantari et al., Nature Medicine 2021), fixed before any data was seen "
             "so that cards compare across searches; bands cut at the test split's own quantiles would move with every "
             f"split. {small}{multilabel} A flag marks a group whose CI lies wholly below the overall figure; with "
             f"{len(report['groups'])} groups some intervals miss by chance, so a flag asks for a closer look on more "
             "data, it proves nothing by itself. Nothing was chosen on subgroups.")
    table = chr(10).join(markdown_table(["attribute", "group", "images", *[NAMES[k] for k in shown], "flag"], rows))
    return (f"## Subgroups\n\n{intro}\n\n{overall_line}{table}\n\nWeakest scored group (lowest AUC): "
            f"{weakest_text(low) if low else 'none scored'}. Flagged: {', '.join(flagged) or 'none'}.\n")

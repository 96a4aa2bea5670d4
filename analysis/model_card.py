"""The model card (model_card.md): what the exported model is, how it was chosen and scored, and its limits.

Text only: every number comes from metrics.json, preprocessing.json and decision.json as analysis.export wrote
them, so the card cannot say something the files do not.
"""

from __future__ import annotations

import textwrap

from analysis.bootstrap import format_ci
from analysis.calibration import ECE_BINS
from analysis.onnx_model import ONNX_FILE, onnx_text
from analysis.reproduction import change_text, reproduction_text
from analysis.robustness import card_section as robustness_section
from analysis.subgroups import card_section as subgroup_section
from trainables.tracking.text import markdown_table


def _ensemble_text(metrics: dict) -> str:
    """The card's paragraph on the --ensemble / --tta choice (empty without one)."""
    ensemble = metrics.get("ensemble")
    if ensemble is None:
        return ""
    choice = ensemble["choice"]
    rows = [[name, f"{v['value']:.4f}" + (" (stand-in)" if v.get("stand_in") else "")
             + (" (whole validation split)" if v.get("scored_on") == "whole val" else ""),
             "n/a" if v.get("gap_to_best") is None else f"{v['gap_to_best']:+.4f}",
             "n/a" if v.get("se_of_gap") is None else f"{v['se_of_gap']:.4f}", v["passes"],
             f"{ensemble['test_after_choice'][name]['auc']:.4f}", f"{ensemble['test_after_choice'][name]['acc']:.4f}"]
            for name, v in choice["variants"].items()]
    members = ", ".join(f"`{m['label']}`" + (f" weight {m['weight']:.2f}" if "weight" in m else "")
                        for m in ensemble["members"])
    return (f"Shipped variant: **{ensemble['variant']}** (members {members}{', horizontal-flip TTA' if ensemble['tta'] else ''}), "
            f"chosen by the {choice['rule']}: {choice['reason']}. Each member's probabilities are calibrated at its own "
            "temperature (ensemble.json) before averaging" + (" with the weights shown" if any(
                "weight" in m for m in ensemble["members"]) else "") + ", then the average once more (see Calibration). "
            "Test columns were computed after the choice, never used for it.\n\n"
            + table(["variant", f"{_scored_on(ensemble)} {choice['metric']}", "gap to best", "SE of gap",
                      "passes/image", "test AUC", "test acc"], rows) + "\n\n" + "".join(f"- {line}\n" for line in ensemble["skipped"])
            + ("\n" if ensemble["skipped"] else ""))


def _scored_on(ensemble: dict) -> str:
    if ensemble.get("members_are") == "folds":
        return "out-of-fold"
    return "held-back validation half" if ensemble["choice"].get("selection") else "validation"


def _scaled_text(decision: dict) -> str:
    """What the temperature divides: the network's logits, or an ensemble's output (after its members' own)."""
    if decision["temperature_divides"] == "logits":
        return "logits are"
    return f"{decision['temperature_divides']}, each member already at its own temperature (ensemble.json), is"


def _mean_image_file(prep: dict) -> str:
    return f", `{prep['mean_image']}` (the per-pixel mean)" if "mean_image" in prep else ""


def _onnx_text(metrics: dict) -> str:
    """The Files section's paragraph on model.onnx: what it computes and how closely it matches the PyTorch model."""
    record = metrics.get("onnx")
    if record is None:  # metrics.json from before model.onnx
        return ""
    if "max_abs_difference" not in record:
        return f"`{ONNX_FILE}`: {onnx_text(record)}.\n"
    return textwrap.fill(
        f"`{ONNX_FILE}` (ONNX opset {record['opset']}, files {', '.join(f'`{f}`' for f in record['files'])}; "
        f"{record['exporter']}) is the whole network with its calibration: {record['input']} -> {record['output']}; "
        f"the threshold is applied outside, as above. Checked with {record['runtime']}: it {onnx_text(record)}. The "
        "tolerance is float32 rounding with room to spare; a real translation error (a temperature, member or flip "
        "lost) moves probabilities by far more. A label differs only where a probability lies within the tolerance of "
        "the threshold; the threshold is itself one of the validation probabilities, so the image that set it may "
        "flip.", width=115) + "\n"


def _values(values: list) -> str:
    return ", ".join(f"{v:.4g}" for v in values)


def split_text(splits: dict) -> str:
    """How the train/validation rows of the card were drawn: the official split, a re-partition, or one fold of a
    cross-validated trial (whose validation row is the fold it held out)."""
    how = f"stratified by label{', grouped by patient' if splits['patient_grouped'] else ''}, seed {splits['seed']}"
    folds = splits.get("cv_folds", 1)
    if folds > 1:
        return (f"fold {splits['fold'] + 1} of {folds} cross-validation folds of the development pool (the official "
                f"train and validation splits together; {how}): this model trained on the other {folds - 1} folds, "
                "and its validation row is the fold it held out")
    ratio = splits["split_ratio"]
    if ratio is None:
        return "the dataset's official train/validation split"
    return f"a re-partition of the development pool, {ratio:.0%} train / {1 - ratio:.0%} validation ({how})"


def model_card(metrics: dict, prep: dict, decision: dict, config: dict) -> str:
    """The card's Markdown."""
    test, splits, cal = metrics["test"], metrics["splits"], metrics["calibration"]
    names = prep["class_names"]
    thresholded = "threshold" in test
    headers = ["metric", "argmax rule (as logged by the trial)"] + (
        [f"threshold {decision['threshold']:.4f}"] if thresholded else [])
    rows = [[name, format_ci(test["argmax"][name])] + ([format_ci(test["threshold"][name])] if thresholded else [])
            for name in test["argmax"]]
    split_rows = [[split, splits[split]["n"], ", ".join(f"{k} {v}" for k, v in splits[split]["per_class"].items())]
                  for split in ("train", "val", "test")]
    how_split = split_text(splits)
    confusions = []
    if prep["task"] != "multilabel":
        for key, title in (("confusion_argmax", "argmax rule"), ("confusion_threshold", "chosen threshold")):
            if key in test:
                confusions.append(f"Test, {title} (rows: true class, columns: predicted class):\n\n"
                                  + table(["true \\ predicted", *names], [[n, *row] for n, row in zip(names, test[key])]))
    repro = metrics["reproduced"]
    searched = ", ".join(f"{k}={v}" for k, v in metrics["searched"].items()) or "(nothing searched)"
    return f"""# Model card: {prep['task']} classifier for {metrics['dataset']} ({config['model']})

Exported from search `{metrics['search']}`, trial `{metrics['trial_id']}` (MLflow run `{metrics['trial_run_id']}`),
chosen on validation: {metrics['selection']['metric']} = {metrics['selection']['value']:.4f} (best epoch
{metrics['best_epoch']} of {config['epochs']}). Searched values: {searched}.

## Data and splits

- Dataset `{metrics['dataset']}`, task {prep['task']}, classes: {', '.join(names)}.
- Images: {prep['image_size']} x {prep['image_size']} px, {prep['channels']} channel(s) ({prep['mode']}),
  normalised ({prep['normalize']}) as (pixel / 255 - mean) / std with mean {_values(prep['mean'])}{' (per pixel: '
  + prep['mean_image'] + ', here its channel average)' if 'mean_image' in prep else ''} and std {_values(prep['std'])}
  (see `preprocessing.json`).
- Train/validation: {how_split}. Test: the dataset's fixed test split, never used to select the epoch,
  the trial, the threshold or the temperature.

{table(['split', 'images', 'per class'], split_rows)}

## Test metrics

95 % percentile bootstrap intervals over test images ({metrics['bootstrap']['n_resamples']} resamples,
seed {metrics['bootstrap']['seed']}); computed with the exported float32 model (`model.safetensors`).

{table(headers, rows)}

{_ensemble_text(metrics)}Reproduction check, the best checkpoint vs the trial's logged test metrics: {reproduction_text(repro)}.

Precision change: {change_text(metrics['precision_change'])}.

{subgroup_section(metrics['subgroups'], prep['task'])}
{robustness_section(metrics['robustness'])}
## Decision threshold

{('Threshold ' + format(decision['threshold'], '.4f') + ' on the calibrated probability of `' + decision['positive_class']
  + '`, chosen by ' + decision['threshold_rule'] + '.') if decision['threshold'] is not None
 else 'Not a binary task: the predicted class is the argmax (multi-label: probability >= 0.5 per label).'}

## Calibration

Temperature scaling: {_scaled_text(decision)} divided by T = {decision['temperature']:.4f}, fitted on
{decision.get('fitted_on', 'the validation split')} by minimising the negative log-likelihood. Expected calibration
error ({ECE_BINS} equal-width bins, top label):

{table(['split', 'ECE before', 'ECE after', 'NLL before', 'NLL after'],
        [[s, f"{cal[s]['ece_before']:.4f}", f"{cal[s]['ece_after']:.4f}", f"{cal[s]['nll_before']:.4f}",
          f"{cal[s]['nll_after']:.4f}"] for s in ('val', 'test')])}

(The validation row is in-sample for T; the test row is the honest one.)

## Confusion matrices

{(chr(10) * 2).join(confusions) or 'Multi-label: see metrics.json.'}

## Intended use and limits

- Research use: comparing training choices on {metrics['dataset']}, and as a starting point for a model that
  is validated prospectively. It is not a medical device and must not be used for diagnosis.
- Trained on {splits['train']['n']} images at {prep['image_size']} px from one source; images from other
  hospitals, scanners, populations, views or resolutions (e.g. full-size clinical JPEGs resized here) are a
  distribution shift: accuracy, calibration and the threshold may not hold there. Re-check on local data.
- The intervals cover resampling of this test set only, not the variation between training runs or sites.
- The threshold trades sensitivity for specificity on the validation split; choose it again for the
  prevalence and costs of the intended setting (`--target-sensitivity`).

## Files

`model.json` (the network: `trainables.models.create_model` name and arguments), `model.safetensors` (its
float32 state dict), `model.ts` (the same network as TorchScript, for other runtimes: normalised float32
(N, C, H, W) -> logits), `preprocessing.json`{_mean_image_file(prep)}, `decision.json` (temperature, threshold),
`config.json` (the trial config), `metrics.json` (every number above), `robustness.png` (the plot above).

{_onnx_text(metrics)}
Predict: `python -m analysis.predict --model <this folder> IMAGE...` (PNG, JPEG or DICOM files; `--runtime onnx` runs
`model.onnx` in onnxruntime).
"""


def table(headers: list, rows: list) -> str:
    return "\n".join(markdown_table(headers, rows))

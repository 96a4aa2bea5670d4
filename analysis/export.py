"""Export the winner of a search: weights, TorchScript, preprocessing, threshold, temperature, model card.

    python -m analysis.export --search smoke-20261121-101500 --out exported/
    python -m analysis.export --search NAME --out DIR --target-sensitivity 0.95 --register pneumonia-cnn

The winner is the trial tune.py picked on validation. The threshold and the temperature are fitted on
that trial's validation split (rebuilt from its checkpoint config). The test split is only scored, never
fitted on, twice: by the exported float32 model (model.json + model.safetensors, as analysis.predict loads
it), whose numbers the card reports, and by the best checkpoint replayed on the trial's own device and
precision (analysis.replay), which must reproduce the trial's logged test metrics -- exactly where this
machine repeats the trial's arithmetic, within TOLERANCE where it cannot -- or the export exits 1 (wrong
data or checkpoint). A trial evaluated under bf16 autocast (GPU trials by default) ships as float32: how
many test predictions flip between the two and how far each metric moves is in metrics.json
("precision_change"), the model card and the printed summary.

`--ensemble K` / `--tta` (analysis.ensemble): the winner, flip TTA and the top-K ensemble are compared on
validation and the cheapest variant within one SE of the best ships, as one network (ensemble.json + members/);
test is scored only after that choice. A cross-validated winner's ensemble is its K fold models, TTA chosen on
out-of-fold predictions, its threshold fitted on them (analysis.ensemble.decide_folds says why).
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import shutil
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

from analysis import runs
from analysis.bootstrap import N_RESAMPLES, format_ci, metrics_with_ci
from analysis.calibration import ECE_BINS, calibrated, choose_threshold, expected_calibration_error, fit_temperature, nll
from analysis.ensemble import N_RESAMPLES as N_RESAMPLES_CHOICE
from analysis.ensemble import Choice, choose_for_search, figures_after_choice, figures_line
from analysis.ensemble_model import ENSEMBLE, MEMBERS
from analysis.predict import ARCHITECTURE, FORMAT, MEAN_IMAGE, TORCHSCRIPT, WEIGHTS, Architecture, load_model
from analysis.replay import Replay, replay
from trainables.data.datasets import from_image_files, medmnist_file
from trainables.errors import UserError
from trainables.tracking.names import TAG_SEARCH, TAG_TRIAL_RUN
from trainables.tracking.searched import searched_keys
from trainables.training.metrics import classification_metrics, confusion, predictions, probabilities

FILES = (WEIGHTS, ARCHITECTURE, TORCHSCRIPT, "preprocessing.json", "decision.json", "config.json", "metrics.json",
         "model_card.md")
# How closely a replay of the best checkpoint must reproduce the trial's logged test metrics. Exact where the
# replay repeats the trial's arithmetic (CPU, same precision; AUC to 1e-6 for float summation order); within
# TOLERANCE where it cannot (a CUDA trial replayed elsewhere or on another GPU, a checkpoint that does not
# record its setting): accuracy within 1 point or 2 test images' worth, whichever is larger, AUC within 0.005.
# Wrong data or a wrong checkpoint moves them by far more.
EXACT = {"acc": 0.0, "auc": 1e-6}
TOLERANCE = {"acc": 0.01, "auc": 0.005}
TOLERANCE_IMAGES = 2
SHOWN_FLIPS = 20  # flipped test images listed by index in metrics.json


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Export the best trial of a search as a deployable model folder.")
    runs.add_common_args(parser)
    parser.add_argument("--out", required=True, help="folder to write (created; existing export files are replaced)")
    parser.add_argument("--target-sensitivity", type=float,
                        help="binary tasks: pick the threshold reaching this validation sensitivity (default: Youden's J)")
    parser.add_argument("--register", metavar="MODEL_NAME", help="also register the model in the MLflow Model Registry")
    parser.add_argument("--data-root", help="where the dataset lives now (default: the trial's data_root)")
    parser.add_argument("--checkpoint", help="the trial's checkpoint dir, when it moved from its logged location")
    parser.add_argument("--n-resamples", type=int, default=N_RESAMPLES, help="bootstrap resamples for the CIs")
    parser.add_argument("--seed", type=int, default=0, help="bootstrap seed")
    parser.add_argument("--ensemble", type=int, default=1, metavar="K",
                        help="consider averaging the top K trials (calibrated); shipped only if validation says so")
    parser.add_argument("--tta", action="store_true",
                        help="consider horizontal-flip test-time augmentation; shipped only if validation says so")
    return parser


# --- fitted on validation only ---------------------------------------------------------------------

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


# --- the exported files -----------------------------------------------------------------------------

def architecture(rep: Replay) -> Architecture:
    """The constructor call that rebuilds the trial's network (model.json)."""
    return Architecture(name=rep.config["model"], num_classes=rep.dataset.num_classes, in_chans=rep.dataset.channels,
                        img_size=int(rep.dataset.dev.images.shape[1]), drop_rate=rep.config.get("drop_rate"),
                        drop_path_rate=rep.config.get("drop_path_rate"), attn_drop_rate=rep.config.get("attn_drop_rate"),
                        stem=rep.stem)


def save_model(model: torch.nn.Module, spec: Architecture, out: Path) -> torch.jit.ScriptModule:
    """model.json + float32 safetensors weights (what analysis.predict loads), and a traced TorchScript module
    for other runtimes and the Model Registry (normalised (N, C, H, W) float32 in, logits out)."""
    save_weights(model, spec, out)
    return save_torchscript(model, spec, out)


def save_weights(model: torch.nn.Module, spec: Architecture, folder: Path) -> None:
    """model.json + model.safetensors: what analysis.predict.load_model rebuilds the network from."""
    model = model.eval()
    (folder / ARCHITECTURE).write_text(spec.model_dump_json(indent=2))
    save_file({k: v.detach().contiguous() for k, v in model.state_dict().items()}, str(folder / WEIGHTS),
              metadata={"format": FORMAT})


def save_torchscript(model: torch.nn.Module, spec: Architecture, out: Path) -> torch.jit.ScriptModule:
    """model.ts, traced (normalised (N, C, H, W) float32 in, logits out), loaded back for the registry."""
    model = model.eval()
    example = torch.zeros(2, spec.in_chans, spec.img_size, spec.img_size)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit's deprecation notice; TorchScript is an extra
        torch.jit.trace(model, example).save(str(out / TORCHSCRIPT))
        return torch.jit.load(str(out / TORCHSCRIPT), map_location="cpu")


def save_ensemble(choice: Choice, out: Path) -> torch.jit.ScriptModule:
    """The chosen ensemble: members/<label>/ (model.json + model.safetensors each, as a single export), the
    manifest (ensemble.json: members, their temperatures, TTA) and one traced module averaging them (model.ts)."""
    shutil.rmtree(out / MEMBERS, ignore_errors=True)
    for name in (ARCHITECTURE, WEIGHTS):  # a single model's files from an earlier export would shadow nothing, but mislead
        (out / name).unlink(missing_ok=True)
    shipped = []
    for member, rep, temperature in zip(choice.members[:choice.chosen_members], choice.reps, choice.temperatures):
        folder = out / MEMBERS / re.sub(r"[^A-Za-z0-9_.-]", "_", member.label)
        folder.mkdir(parents=True)
        save_weights(rep.model, architecture(rep), folder)
        shipped.append({"label": member.label, "run_id": member.run_id, "path": folder.relative_to(out).as_posix(),
                        "temperature": temperature, "validation_score": member.score})
    write_manifest(choice, out, shipped)
    return save_torchscript(choice.module(), architecture(choice.reps[0]), out)


def write_manifest(choice: Choice, out: Path, shipped: list[dict]) -> None:
    """ensemble.json: which variant was chosen on validation and why; with `network: ensemble` also what
    analysis.predict builds (members, temperatures, tta). `network: single` ships model.json as without --ensemble."""
    (out / ENSEMBLE).write_text(json.dumps({"format": FORMAT, **choice.record(), "members": shipped}, indent=2))


def preprocessing(state: dict, rep: Replay, out: Path) -> dict:
    """preprocessing.json: how an image file becomes the model's input, as the trial prepared its images.
    A per-pixel mean (`normalize: mean_image`) goes to mean_image.safetensors next to it."""
    meta, channels, norm = state["dataset"], rep.dataset.channels, rep.normalization
    mean = norm.mean.mean(dim=(1, 2)).expand(channels) if norm.mean.shape[0] == 1 else norm.mean.mean(dim=(1, 2))
    std = norm.std.flatten().expand(channels) if norm.std.numel() == 1 else norm.std.flatten()
    prep = {"format": FORMAT, "task": rep.dataset.task, "class_names": list(rep.dataset.class_names),
            "image_size": int(meta["image_size"]), "channels": channels, "mode": "L" if channels == 1 else "RGB",
            "resize": resize_text(rep.config["dataset"], int(meta["image_size"])),
            "scale": 255.0, "normalize": norm.name, "mean": [float(v) for v in mean], "std": [float(v) for v in std],
            "input": "float32 (N, C, H, W): (pixel / scale - mean) / std", "output": "logits (N, num_classes)",
            "architecture": ARCHITECTURE, "weights": WEIGHTS, "torchscript": TORCHSCRIPT}
    if norm.mean.shape[1:] != (1, 1):  # per-pixel mean: the per-channel `mean` above is only its average
        save_file({"mean_image": norm.mean.contiguous()}, str(out / MEAN_IMAGE), metadata={"format": FORMAT})
        prep |= {"mean_image": MEAN_IMAGE, "input": "float32 (N, C, H, W): (pixel / scale - mean_image) / std, "
                 f"mean_image the (C, H, W) tensor in {MEAN_IMAGE}"}
    return prep


def resize_text(spec: str, size: int) -> str:
    """How the training images of dataset `spec` came to `size` px, and what analysis.predict does to a new image."""
    if from_image_files(spec):
        return ("bilinear, to image_size x image_size, aspect ratio not kept (trainables.data.image_cache), as the "
                "training images were; analysis.predict does the same")
    return (f"none in training: the MedMNIST file {medmnist_file(spec, size, Path()).name} holds the images at {size} x "
            f"{size} px as MedMNIST published them; analysis.predict resizes a new image to image_size x image_size "
            "(bilinear, aspect ratio not kept), which need not match MedMNIST's own resizing")


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


def register(out: Path, module, tracking_uri: str, trial, search: str, model_name: str, metrics: dict):
    """Log the TorchScript module as an MLflow model under the winning trial's run and register it."""
    import mlflow
    from mlflow.models import infer_signature

    mlflow.set_tracking_uri(tracking_uri)
    prep = json.loads((out / "preprocessing.json").read_text())
    example = np.zeros((1, prep["channels"], prep["image_size"], prep["image_size"]), np.float32)
    with torch.no_grad():
        signature = infer_signature(example, module(torch.from_numpy(example)).numpy())
    # mlflow.pytorch warns that "pickle" format can run code on load; a ScriptModule is written by torch.jit.save
    logging.getLogger("mlflow.pytorch").setLevel(logging.ERROR)
    with warnings.catch_warnings(), mlflow.start_run(run_id=trial.info.run_id):
        warnings.simplefilter("ignore")
        try:
            info = mlflow.pytorch.log_model(
                module, name="exported_model", registered_model_name=model_name, signature=signature,
                serialization_format="pickle",  # for a ScriptModule this means torch.jit.save (pt2 is for eager models)
                extra_files=[str(out / f) for f in ("preprocessing.json", "decision.json", "metrics.json", "model_card.md",
                                                    ENSEMBLE) if (out / f).exists()],
                pip_requirements=[f"torch=={torch.__version__.split('+')[0]}"], await_registration_for=60)
        except mlflow.exceptions.MlflowException as error:
            raise UserError(f"Could not register {model_name!r} at {tracking_uri} ({str(error).splitlines()[0][:160]}); "
                            "the Model Registry needs a database-backed store (sqlite:///..., a tracking server)") from error
    client = mlflow.MlflowClient(tracking_uri)
    version = info.registered_model_version
    for key, value in {TAG_SEARCH: search, TAG_TRIAL_RUN: trial.info.run_id,
                       "test_acc": f"{metrics['test']['argmax']['acc']['value']:.4f}",
                       "test_auc": f"{metrics['test']['argmax']['auc']['value']:.4f}"}.items():
        client.set_model_version_tag(model_name, str(version), key, value)
    return version


# --- the model card ---------------------------------------------------------------------------------

def _repro_text(repro: dict) -> str:
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


def _change_text(change: dict) -> str:
    if change["same_setting"]:
        return (f"none: the trial evaluated in {change['from']}, the exported model's own arithmetic "
                f"({change['flips']} of {change['n']} test predictions flip)")
    metrics = change["metrics"]
    moved = ", ".join(f"{k} {metrics[k]['difference']:+.4f}" for k in ("acc", "auc") if k in metrics)
    labels = f" ({change['label_flips']} label decisions)" if "label_flips" in change else ""
    return (f"{change['flips']} of {change['n']} test predictions flip{labels} between {change['from']} and the "
            f"exported float32 model; metric change (exported - replayed): {moved}; largest logit difference "
            f"{change['max_abs_logit_difference']:.2g}")

def _ensemble_text(metrics: dict) -> str:
    """The card's paragraph on the --ensemble / --tta choice (empty without one)."""
    ensemble = metrics.get("ensemble")
    if ensemble is None:
        return ""
    choice = ensemble["choice"]
    rows = [[name, f"{v['value']:.4f}" + (" (stand-in)" if v.get("stand_in") else ""),
             "n/a" if v.get("gap_to_best") is None else f"{v['gap_to_best']:+.4f}",
             "n/a" if v.get("se_of_gap") is None else f"{v['se_of_gap']:.4f}", v["passes"],
             f"{ensemble['test_after_choice'][name]['auc']:.4f}", f"{ensemble['test_after_choice'][name]['acc']:.4f}"]
            for name, v in choice["variants"].items()]
    members = ", ".join(f"`{m['label']}`" for m in ensemble["members"])
    return (f"Shipped variant: **{ensemble['variant']}** (members {members}{', horizontal-flip TTA' if ensemble['tta'] else ''}), "
            f"chosen by the {choice['rule']}: {choice['reason']}. Each member's probabilities are calibrated at its own "
            "temperature (ensemble.json) before averaging, then the average once more (see Calibration). "
            "Test columns were computed after the choice, never used for it.\n\n"
            + _table(["variant", f"{'out-of-fold' if ensemble.get('members_are') == 'folds' else 'validation'} "
                      f"{choice['metric']}", "gap to best", "SE of gap", "passes/image",
                      "test AUC", "test acc"], rows) + "\n\n" + "".join(f"- {line}\n" for line in ensemble["skipped"])
            + ("\n" if ensemble["skipped"] else ""))


def _scaled_text(decision: dict) -> str:
    """What the temperature divides: the network's logits, or an ensemble's output (after its members' own)."""
    if decision["temperature_divides"] == "logits":
        return "logits are"
    return f"{decision['temperature_divides']}, each member already at its own temperature (ensemble.json), is"


def _mean_image_file(prep: dict) -> str:
    return f", `{prep['mean_image']}` (the per-pixel mean)" if "mean_image" in prep else ""


def _values(values: list) -> str:
    return ", ".join(f"{v:.4g}" for v in values)


def _table(headers: list, rows: list) -> str:
    lines = ["| " + " | ".join(map(str, headers)) + " |", "|" + "---|" * len(headers)]
    return "\n".join(lines + ["| " + " | ".join(map(str, row)) + " |" for row in rows])


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
                                  + _table(["true \\ predicted", *names], [[n, *row] for n, row in zip(names, test[key])]))
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

{_table(['split', 'images', 'per class'], split_rows)}

## Test metrics

95 % percentile bootstrap intervals over test images ({metrics['bootstrap']['n_resamples']} resamples,
seed {metrics['bootstrap']['seed']}); computed with the exported float32 model (`model.safetensors`).

{_table(headers, rows)}

{_ensemble_text(metrics)}Reproduction check, the best checkpoint vs the trial's logged test metrics: {_repro_text(repro)}.

Precision change: {_change_text(metrics['precision_change'])}.

## Decision threshold

{('Threshold ' + format(decision['threshold'], '.4f') + ' on the calibrated probability of `' + decision['positive_class']
  + '`, chosen by ' + decision['threshold_rule'] + '.') if decision['threshold'] is not None
 else 'Not a binary task: the predicted class is the argmax (multi-label: probability >= 0.5 per label).'}

## Calibration

Temperature scaling: {_scaled_text(decision)} divided by T = {decision['temperature']:.4f}, fitted on
{decision.get('fitted_on', 'the validation split')} by minimising the negative log-likelihood. Expected calibration
error ({ECE_BINS} equal-width bins, top label):

{_table(['split', 'ECE before', 'ECE after', 'NLL before', 'NLL after'],
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
`config.json` (the trial config), `metrics.json` (every number above).
Predict: `python -m analysis.predict --model <this folder> IMAGE...`.
"""


# --- the command ------------------------------------------------------------------------------------

def export(args) -> int:
    started = time.perf_counter()
    if args.target_sensitivity is not None and not 0 < args.target_sensitivity <= 1:
        raise UserError(f"--target-sensitivity {args.target_sensitivity} is not a sensitivity; give a value in (0, 1], e.g. 0.95")
    if args.ensemble < 1:
        raise UserError(f"--ensemble {args.ensemble} is not a number of models; give K >= 1 (e.g. --ensemble 3)")
    client = runs.connect(args.tracking_uri)
    parent = runs.get_search(client, args.search)
    space = runs.search_space(client, parent)
    trial = runs.winner(client, parent)
    state = runs.checkpoint_state(trial, args.checkpoint)
    rep = replay(state, args.data_root)
    task, names = rep.dataset.task, rep.dataset.class_names
    if args.target_sensitivity is not None and task != "binary":
        raise UserError(f"--target-sensitivity needs a binary task ({rep.config['dataset']} is {task}); leave it out")
    choice = None
    if args.ensemble > 1 or args.tta:  # chosen on validation only, before any test image is scored
        choice = choose_for_search(client, parent, space, args.ensemble, args.tta, args.data_root, args.seed, state,
                                   n_resamples=min(args.n_resamples, N_RESAMPLES_CHOICE))
        print("\n".join(choice.lines()))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    prep = preprocessing(state, rep, out)
    (out / "preprocessing.json").write_text(json.dumps(prep, indent=2))  # load_model reads it for an ensemble
    if choice is not None and choice.network == "ensemble":
        module = save_ensemble(choice, out)
        oof = choice.threshold_data()  # a cross-validated winner's fold models: out-of-fold, not a shared split
        val_logits, val_labels = oof[:2] if oof else rep.logits(choice.module(), rep.val)  # log-probabilities
        # one more temperature, on the ensemble's output (the members were calibrated one by one before averaging)
        decision = fit_decision(val_logits, val_labels, task, names, args.target_sensitivity)
        decision["fitted_on"] = oof[2] if oof else \
            f"the validation split ({len(val_labels)} images), the ensemble's probabilities"
        decision["temperature_divides"] = "the ensemble's output (the log of its members' mean probability)"
    else:
        shutil.rmtree(out / MEMBERS, ignore_errors=True)
        val_logits, val_labels = decision_data(state, rep)  # validation (or out-of-fold) only: threshold, temperature
        decision = fit_decision(val_logits, val_labels, task, names, args.target_sensitivity)
        decision["temperature_divides"] = "logits"
        decision["fitted_on"] = (f"out-of-fold predictions of the {len(state['folds'])} fold models ({len(val_labels)} "
                                 "development images)" if "oof" in state
                                 else f"the validation split ({len(val_labels)} images)")
        module = save_model(rep.model, architecture(rep), out)
        if choice is None:
            (out / ENSEMBLE).unlink(missing_ok=True)
        else:
            first = choice.members[0]
            write_manifest(choice, out, [{"label": first.label, "run_id": first.run_id, "path": ".",
                                          "temperature": decision["temperature"], "validation_score": first.score}])
    shipped = load_model(out)  # the exported model exactly as analysis.predict loads it
    scored = score_test(shipped, rep, decision, args.n_resamples, args.seed)  # test: scored, never fitted on
    # the winner alone, float32 (what a single export ships), for the reproduction and precision checks
    winner_logits = rep.logits(rep.model, rep.test)[0] if choice is not None and choice.network == "ensemble" \
        else scored["logits"]
    if rep.fp32_is_trial:  # the exported model runs on the trial's own setting: one pass is both
        trial_logits = winner_logits
    else:
        trial_logits, _ = rep.trial_logits(rep.test)
    replayed = classification_metrics(task, scored["labels"], probabilities(task, trial_logits), names)

    key, _ = runs.selection(parent, space)
    logged = trial.data.metrics
    metrics = {
        "format": FORMAT, "search": parent.data.tags.get(TAG_SEARCH), "search_run_id": parent.info.run_id,
        "trial_id": runs.trial_label(trial), "trial_run_id": trial.info.run_id, "dataset": rep.config["dataset"],
        "selection": {"metric": key, "value": logged.get(key, float("nan"))},
        "best_epoch": state.get("best_epoch"), "searched": searched_values(searched_keys(space), rep.config, trial),
        "splits": split_summary(rep, int(state.get("best_fold", 0))),
        "test": {k: v for k, v in scored.items() if k not in ("logits", "labels")},
        "reproduced": reproduction(replayed, logged, rep, scored["n"]),
        "precision_change": precision_change(trial_logits, winner_logits, scored["labels"], rep, logged),
        "calibration": {"val": calibration_report(val_logits, val_labels, task, decision["temperature"]),
                        "test": calibration_report(scored["logits"], scored["labels"], task, decision["temperature"])},
        "bootstrap": {"n_resamples": args.n_resamples, "confidence": 0.95, "method": "percentile", "seed": args.seed},
    }
    if choice is not None:  # after the choice: every variant's test figures, reported, never used to choose
        metrics["ensemble"] = {**json.loads((out / ENSEMBLE).read_text()), "test_after_choice": figures_after_choice(choice)}
    (out / "decision.json").write_text(json.dumps(decision, indent=2))
    (out / "config.json").write_text(json.dumps(rep.config, indent=2, default=str))
    metrics["export_seconds"] = round(time.perf_counter() - started, 2)
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    (out / "model_card.md").write_text(model_card(metrics, prep, decision, rep.config))
    print_summary(out, metrics, decision)
    if not metrics["reproduced"]["ok"]:
        mismatch = [k for k, v in metrics["reproduced"]["metrics"].items() if v["match"] is False]
        print(f"error: the best checkpoint replayed on {rep.replayed} does not reproduce the trial's logged test "
              f"{', '.join(mismatch)} (different data or a different checkpoint?); see {out}/metrics.json"
              + ("; not registered" if args.register else ""), file=sys.stderr)
        return 1
    if args.register:
        version = register(out, module, client.tracking_uri, trial, metrics["search"], args.register, metrics)
        print(f"registered: {args.register} version {version} (MLflow Model Registry at {client.tracking_uri})")
    return 0


def print_summary(out: Path, metrics: dict, decision: dict) -> None:
    test, repro = metrics["test"], metrics["reproduced"]
    print(f"winner: trial {metrics['trial_id']} (run {metrics['trial_run_id']}), "
          f"{metrics['selection']['metric']} {metrics['selection']['value']:.4f}")
    shipped = f", {metrics['ensemble']['variant']}" if "ensemble" in metrics else ""
    print(f"test (argmax{shipped}):   " + "  ".join(f"{k} {format_ci(v)}" for k, v in test["argmax"].items()))
    if "threshold" in test:
        print(f"test (threshold {decision['threshold']:.4f}): "
              + "  ".join(f"{k} {format_ci(v)}" for k, v in test["threshold"].items()))
    print(f"temperature {decision['temperature']:.4f}: test ECE {metrics['calibration']['test']['ece_before']:.4f} -> "
          f"{metrics['calibration']['test']['ece_after']:.4f}")
    print(f"reproduces the logged test metrics: {_repro_text(repro)}")
    print(f"precision change: {_change_text(metrics['precision_change'])}")
    ensemble = metrics.get("ensemble")
    if ensemble is not None:
        print(figures_line(ensemble["test_after_choice"], ensemble["variant"]))
    files = FILES if ensemble is None else (*FILES, ENSEMBLE) if ensemble["network"] == "single" else \
        (ENSEMBLE, f"{MEMBERS}/", *FILES[2:])
    print(f"wrote {out}/ ({', '.join(files)}) in {metrics['export_seconds']:.1f}s")


def main(argv=None) -> int:
    args = get_args_parser().parse_args(argv)
    return runs.run_cli(lambda: export(args), args.debug)


if __name__ == "__main__":
    sys.exit(main())

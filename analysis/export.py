"""Export the winner of a search: weights, TorchScript, preprocessing, threshold, temperature, model card.

    python -m analysis.export --search smoke-20261121-101500 --out exported/
    python -m analysis.export --search NAME --out DIR --target-sensitivity 0.95 --register pneumonia-cnn

The winner is the trial tune.py picked on validation. The threshold and the temperature are fitted on
that trial's validation split (rebuilt from its checkpoint config); the test split is only scored, once,
through the exported TorchScript module, so the card's test numbers are the shipped model's and match
the trial's logged test metrics.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

from analysis import runs
from analysis.bootstrap import N_RESAMPLES, format_ci, metrics_with_ci
from analysis.calibration import (ECE_BINS, calibrated, choose_threshold, expected_calibration_error, fit_temperature,
                                  nll)
from analysis.replay import Replay, logits_of, replay
from trainables.errors import UserError
from trainables.metrics import classification_metrics, confusion, probabilities

FORMAT = "medtune-export-v1"
FILES = ("model.safetensors", "model.ts", "preprocessing.json", "decision.json", "config.json", "metrics.json",
         "model_card.md")


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
    return parser


# --- fitted on validation only ---------------------------------------------------------------------

def fit_decision(val_logits: np.ndarray, val_labels: np.ndarray, task: str, class_names,
                 target_sensitivity: float | None = None) -> dict:
    """Temperature (all tasks) and, for binary tasks, the threshold on the calibrated positive probability."""
    temperature = fit_temperature(val_logits, val_labels, task)
    decision = {"temperature": temperature, "threshold": None, "positive_class": None, "threshold_rule": None}
    if task == "binary":
        threshold, rule = choose_threshold(val_labels, calibrated(val_logits, task, temperature)[:, 1], target_sensitivity)
        decision.update(threshold=threshold, positive_class=class_names[1], threshold_rule=rule)
    return decision


def calibration_report(logits: np.ndarray, labels: np.ndarray, task: str, temperature: float) -> dict:
    before, after = probabilities(task, logits), calibrated(logits, task, temperature)
    return {"ece_before": expected_calibration_error(labels, before, task),
            "ece_after": expected_calibration_error(labels, after, task),
            "nll_before": nll(logits, labels, task), "nll_after": nll(logits, labels, task, temperature)}


# --- the exported files -----------------------------------------------------------------------------

def save_model(model: torch.nn.Module, channels: int, size: int, out: Path) -> torch.jit.ScriptModule:
    """safetensors weights + a traced TorchScript module (normalised (N, C, H, W) float32 in, logits out)."""
    model = model.eval()
    save_file({k: v.detach().contiguous() for k, v in model.state_dict().items()}, str(out / "model.safetensors"),
              metadata={"format": FORMAT})
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit's deprecation notice; TorchScript is what we ship
        torch.jit.trace(model, torch.zeros(2, channels, size, size)).save(str(out / "model.ts"))
        return torch.jit.load(str(out / "model.ts"), map_location="cpu")  # score what was written


def preprocessing(state: dict, rep: Replay) -> dict:
    meta, channels = state["dataset"], rep.dataset.channels
    return {"format": FORMAT, "task": rep.dataset.task, "class_names": list(rep.dataset.class_names),
            "image_size": int(meta["image_size"]), "channels": channels, "mode": "L" if channels == 1 else "RGB",
            "resize": "bilinear, to image_size x image_size, aspect ratio not kept (trainables.image_cache)",
            "scale": 255.0, "mean": [float(meta["mean"])] * channels, "std": [float(meta["std"])] * channels,
            "input": "float32 (N, C, H, W): (pixel / scale - mean) / std", "output": "logits (N, num_classes)",
            "model": "model.ts", "weights": "model.safetensors"}


def score_test(module, rep: Replay, decision: dict, n_resamples: int, seed: int) -> dict:
    """Test metrics of the exported module: at the argmax rule (the trial's) and at the chosen threshold."""
    task, names = rep.dataset.task, rep.dataset.class_names
    logits, labels = logits_of(module, rep.test)
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


def reproduction(scored: dict, logged: dict) -> dict:
    """The exported module's test acc/AUC next to the trial's logged ones (acc must be equal, AUC to 1e-6)."""
    check = {}
    for key, tolerance in (("acc", 0.0), ("auc", 1e-6)):
        mine, theirs = scored["metrics"].get(key), logged.get(f"test_{key}")
        check[key] = {"exported": mine, "logged": theirs,
                      "match": None if theirs is None else bool(abs(mine - theirs) <= tolerance)}
    return check


def split_summary(rep: Replay) -> dict:
    def counts(labels):
        if labels.ndim == 2:
            return {n: int(c) for n, c in zip(rep.dataset.class_names, labels.sum(axis=0))}
        return {n: int((labels == i).sum()) for i, n in enumerate(rep.dataset.class_names)}

    dev = rep.dataset.dev
    return {"train": {"n": int(len(rep.train_index)), "per_class": counts(dev.labels[rep.train_index])},
            "val": {"n": int(len(rep.val_index)), "per_class": counts(dev.labels[rep.val_index])},
            "test": {"n": int(len(rep.test)), "per_class": counts(rep.test.labels)},
            "split_ratio": rep.config["split_ratio"], "seed": rep.config["seed"],
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
                extra_files=[str(out / f) for f in ("preprocessing.json", "decision.json", "metrics.json", "model_card.md")],
                pip_requirements=[f"torch=={torch.__version__.split('+')[0]}"], await_registration_for=60)
        except mlflow.exceptions.MlflowException as error:
            raise UserError(f"Could not register {model_name!r} at {tracking_uri} ({str(error).splitlines()[0][:160]}); "
                            "the Model Registry needs a database-backed store (sqlite:///..., a tracking server)") from None
    client = mlflow.MlflowClient(tracking_uri)
    version = info.registered_model_version
    for key, value in {"medtune.search": search, "medtune.trial_run_id": trial.info.run_id,
                       "test_acc": f"{metrics['test']['argmax']['acc']['value']:.4f}",
                       "test_auc": f"{metrics['test']['argmax']['auc']['value']:.4f}"}.items():
        client.set_model_version_tag(model_name, str(version), key, value)
    return version


# --- the model card ---------------------------------------------------------------------------------

def _repro_text(repro: dict) -> str:
    def one(key, check):
        if check["logged"] is None:
            return f"{key} {check['exported']:.6f} (nothing logged to compare)"
        verdict = "equal" if check["exported"] == check["logged"] else "match" if check["match"] else "MISMATCH"
        return f"{key} {check['exported']:.6f} vs logged {check['logged']:.6f} ({verdict})"

    return "; ".join(one(k, v) for k, v in repro.items())

def _table(headers: list, rows: list) -> str:
    lines = ["| " + " | ".join(map(str, headers)) + " |", "|" + "---|" * len(headers)]
    return "\n".join(lines + ["| " + " | ".join(map(str, row)) + " |" for row in rows])


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
    ratio = splits["split_ratio"]
    how_split = ("the dataset's official train/validation split" if ratio is None else
                 f"a re-partition of the development pool, {ratio:.0%} train / {1 - ratio:.0%} validation "
                 f"(stratified by label{', grouped by patient' if splits['patient_grouped'] else ''}, seed {splits['seed']})")
    confusions = []
    if prep["task"] != "multilabel":
        for key, title in (("confusion_argmax", "argmax rule"), ("confusion_threshold", "chosen threshold")):
            if key in test:
                confusions.append(f"Test, {title} (rows: true class, columns: predicted class):\n\n"
                                  + _table(["true \\ predicted", *names], [[n, *row] for n, row in zip(names, test[key])]))
    repro = metrics["reproduced"]
    searched = ", ".join(f"{k}={config.get(k)}" for k in metrics["searched"]) or "(nothing searched)"
    return f"""# Model card: {prep['task']} classifier for {metrics['dataset']} ({config['model']})

Exported from search `{metrics['search']}`, trial `{metrics['trial_id']}` (MLflow run `{metrics['trial_run_id']}`),
chosen on validation: {metrics['selection']['metric']} = {metrics['selection']['value']:.4f} (best epoch
{metrics['best_epoch']} of {config['epochs']}). Searched values: {searched}.

## Data and splits

- Dataset `{metrics['dataset']}`, task {prep['task']}, classes: {', '.join(names)}.
- Images: {prep['image_size']} x {prep['image_size']} px, {prep['channels']} channel(s) ({prep['mode']}),
  scaled as (pixel / 255 - {prep['mean'][0]}) / {prep['std'][0]} (see `preprocessing.json`).
- Train/validation: {how_split}. Test: the dataset's fixed test split, never used to select the epoch,
  the trial, the threshold or the temperature.

{_table(['split', 'images', 'per class'], split_rows)}

## Test metrics

95 % percentile bootstrap intervals over test images ({metrics['bootstrap']['n_resamples']} resamples,
seed {metrics['bootstrap']['seed']}); computed with the exported TorchScript module.

{_table(headers, rows)}

Reproduction check, exported module vs the trial's logged test metrics: {_repro_text(repro)}.

## Decision threshold

{('Threshold ' + format(decision['threshold'], '.4f') + ' on the calibrated probability of `' + decision['positive_class']
  + '`, chosen by ' + decision['threshold_rule'] + '.') if decision['threshold'] is not None
 else 'Not a binary task: the predicted class is the argmax (multi-label: probability >= 0.5 per label).'}

## Calibration

Temperature scaling: logits are divided by T = {decision['temperature']:.4f}, fitted on the validation split by
minimising the negative log-likelihood. Expected calibration error ({ECE_BINS} equal-width bins, top label):

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

`model.ts` (TorchScript: normalised float32 (N, C, H, W) -> logits), `model.safetensors` (state dict of
`{config['model']}`), `preprocessing.json`, `decision.json` (temperature, threshold), `config.json` (the trial
config), `metrics.json` (every number above). Predict: `python -m analysis.predict --model <this folder> IMAGE...`.
"""


# --- the command ------------------------------------------------------------------------------------

def export(args) -> int:
    started = time.perf_counter()
    if args.target_sensitivity is not None and not 0 < args.target_sensitivity <= 1:
        raise UserError(f"--target-sensitivity {args.target_sensitivity} is not a sensitivity; give a value in (0, 1], e.g. 0.95")
    client = runs.connect(args.tracking_uri)
    parent = runs.get_search(client, args.search)
    space = runs.search_space(client, parent)
    trial = runs.winner(client, parent)
    state = runs.checkpoint_state(trial, args.checkpoint)
    rep = replay(state, args.data_root)
    task, names = rep.dataset.task, rep.dataset.class_names
    if args.target_sensitivity is not None and task != "binary":
        raise UserError(f"--target-sensitivity needs a binary task ({rep.config['dataset']} is {task}); leave it out")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    val_logits, val_labels = logits_of(rep.model, rep.val)  # validation only: threshold and temperature
    decision = fit_decision(val_logits, val_labels, task, names, args.target_sensitivity)
    prep = preprocessing(state, rep)
    module = save_model(rep.model, prep["channels"], prep["image_size"], out)
    scored = score_test(module, rep, decision, args.n_resamples, args.seed)  # the one read of the test split

    key, _ = runs.selection(parent, space)
    metrics = {
        "format": FORMAT, "search": parent.data.tags.get("medtune.search"), "search_run_id": parent.info.run_id,
        "trial_id": runs.trial_label(trial), "trial_run_id": trial.info.run_id, "dataset": rep.config["dataset"],
        "selection": {"metric": key, "value": trial.data.metrics.get(key, float("nan"))},
        "best_epoch": state.get("best_epoch"), "searched": runs.searched_keys(space), "splits": split_summary(rep),
        "test": {k: v for k, v in scored.items() if k not in ("logits", "labels")},
        "reproduced": reproduction(scored, trial.data.metrics),
        "calibration": {"val": calibration_report(val_logits, val_labels, task, decision["temperature"]),
                        "test": calibration_report(scored["logits"], scored["labels"], task, decision["temperature"])},
        "bootstrap": {"n_resamples": args.n_resamples, "confidence": 0.95, "method": "percentile", "seed": args.seed},
    }
    (out / "preprocessing.json").write_text(json.dumps(prep, indent=2))
    (out / "decision.json").write_text(json.dumps(decision, indent=2))
    (out / "config.json").write_text(json.dumps(rep.config, indent=2, default=str))
    metrics["export_seconds"] = round(time.perf_counter() - started, 2)
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    (out / "model_card.md").write_text(model_card(metrics, prep, decision, rep.config))
    print_summary(out, metrics, decision)
    if args.register:
        version = register(out, module, client.tracking_uri, trial, metrics["search"], args.register, metrics)
        print(f"registered: {args.register} version {version} (MLflow Model Registry at {client.tracking_uri})")
    mismatch = [k for k, v in metrics["reproduced"].items() if v["match"] is False]
    if mismatch:
        print(f"warning: the exported model does not reproduce the logged test {', '.join(mismatch)} "
              "(trial trained on GPU/bf16, or different data?); see metrics.json", file=sys.stderr)
        return 1
    return 0


def print_summary(out: Path, metrics: dict, decision: dict) -> None:
    test, repro = metrics["test"], metrics["reproduced"]
    print(f"winner: trial {metrics['trial_id']} (run {metrics['trial_run_id']}), "
          f"{metrics['selection']['metric']} {metrics['selection']['value']:.4f}")
    print("test (argmax):   " + "  ".join(f"{k} {format_ci(v)}" for k, v in test["argmax"].items()))
    if "threshold" in test:
        print(f"test (threshold {decision['threshold']:.4f}): "
              + "  ".join(f"{k} {format_ci(v)}" for k, v in test["threshold"].items()))
    print(f"temperature {decision['temperature']:.4f}: test ECE {metrics['calibration']['test']['ece_before']:.4f} -> "
          f"{metrics['calibration']['test']['ece_after']:.4f}")
    print(f"reproduces the logged test metrics: {_repro_text(repro)}")
    print(f"wrote {out}/ ({', '.join(FILES)}) in {metrics['export_seconds']:.1f}s")


def main(argv=None) -> int:
    args = get_args_parser().parse_args(argv)
    return runs.run_cli(lambda: export(args), args.debug)


if __name__ == "__main__":
    sys.exit(main())

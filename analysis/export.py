"""Export the winner of a search: weights, TorchScript, ONNX, preprocessing, threshold, temperature, model card.

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

By default (analysis.handover, rule `select`) an ensemble of at most `--ensemble K` (5) trials is selected from
the search's kept validation predictions and ships unless, on a held-back half of the validation split, it is
worse than the single winner by more than one SE; either way the export prints why. `--ensemble 1` ships the
winner alone; `--ensemble-rule topk` is the older rule (analysis.ensemble: the winner, flip TTA and the top-K
average, the cheapest variant within one SE of the best). An ensemble ships as one network (ensemble.json +
members/); test is scored only after the choice. A cross-validated winner's ensemble is its K fold models, TTA
chosen on out-of-fold predictions, its threshold fitted on them (analysis.ensemble.decide_folds says why).

This module is the command's flow only. What is fitted and scored: analysis.scoring; the folder's files:
analysis.model_files; the replay checks: analysis.reproduction; the card's text: analysis.model_card;
--register: analysis.model_registry; model.onnx and its check against the PyTorch model on validation (with the
`export` extra installed; a file that does not match fails the export): analysis.onnx_model.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

from analysis import model_registry, robustness, runs, scoring
from analysis.bootstrap import N_RESAMPLES, format_ci
from analysis.calibration import calibrated
from analysis.ensemble import N_RESAMPLES as N_RESAMPLES_CHOICE
from analysis.ensemble import figures_after_choice, figures_line
from analysis.ensemble_model import ENSEMBLE, MEMBERS
from analysis.handover import DEFAULT_MEMBERS, RULES, choose_handover, record_on_search
from analysis.model_card import model_card
from analysis.model_files import FILES, architecture, preprocessing, save_ensemble, save_model, write_manifest
from analysis.onnx_model import ONNX_FILE, export_onnx, onnx_text
from analysis.predict import FORMAT, load_model
from analysis.replay import replay
from analysis.reproduction import change_text, precision_change, reproduction, reproduction_text
from analysis.subgroups import subgroup_report
from analysis.subgroups import summary_line as subgroup_line
from analysis.summary import publish
from trainables.errors import UserError
from trainables.tracking.names import TAG_SEARCH
from trainables.tracking.resilient import ResilientClient
from trainables.tracking.searched import searched_keys
from trainables.training.metrics import classification_metrics, probabilities


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Export the best trial of a search as a deployable model folder.")
    runs.add_common_args(parser)
    parser.add_argument("--out", required=True, help="folder to write (created; existing export files are replaced)")
    parser.add_argument("--target-sensitivity", type=float,
                        help="binary tasks: pick the threshold reaching this validation sensitivity (default: Youden's J)")
    parser.add_argument("--register", metavar="MODEL_NAME",
                        help="also register the served model (MLflow pyfunc: image bytes in) in the Model Registry")
    parser.add_argument("--robustness-images", type=int, default=robustness.MAX_IMAGES, metavar="N",
                        help=f"corrupt at most N test images, a seeded stratified sample (default "
                             f"{robustness.MAX_IMAGES}; 0: all): 31 passes over them")
    parser.add_argument("--alias", default=model_registry.ALIAS,
                        help=f"the registry alias the new version gets (default {model_registry.ALIAS})")
    parser.add_argument("--data-root", help="where the dataset lives now (default: the trial's data_root)")
    parser.add_argument("--checkpoint", help="the trial's checkpoint dir, when it moved from its logged location")
    parser.add_argument("--n-resamples", type=int, default=N_RESAMPLES, help="bootstrap resamples for the CIs")
    parser.add_argument("--seed", type=int, default=0, help="bootstrap seed")
    parser.add_argument("--ensemble", type=int, default=DEFAULT_MEMBERS, metavar="K",
                        help="at most K trials in the ensemble (default %(default)s; 1: the winner alone); with the "
                             "default rule selected from every trial's validation predictions, shipped unless the "
                             "held-back half of validation finds it clearly worse than the winner")
    parser.add_argument("--ensemble-rule", choices=RULES, default="select",
                        help="select (default): ensemble selection, weights and the rule above; topk: the top K "
                             "averaged, shipped by the one-SE rule (the cheapest variant within one SE of the best)")
    parser.add_argument("--tta", action="store_true",
                        help="consider horizontal-flip test-time augmentation; shipped only if validation says so")
    return parser


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
        choice = choose_handover(client, parent, space, args.ensemble, args.tta, args.data_root, args.seed, state,
                                 n_resamples=min(args.n_resamples, N_RESAMPLES_CHOICE), rule=args.ensemble_rule,
                                 winner_rep=rep)
        print("\n".join(choice.lines()))
    else:
        print("chosen: single -- --ensemble 1 asks for the winner alone (no ensemble was considered)")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    prep = preprocessing(state, rep, out)
    (out / "preprocessing.json").write_text(json.dumps(prep, indent=2))  # load_model reads it for an ensemble
    if choice is not None and choice.network == "ensemble":
        save_ensemble(choice, out)
        oof = choice.threshold_data()  # a cross-validated winner's fold models: out-of-fold, not a shared split
        val_logits, val_labels = oof[:2] if oof else rep.logits(choice.module(), rep.val)  # log-probabilities
        # one more temperature, on the ensemble's output (the members were calibrated one by one before averaging)
        decision = scoring.fit_decision(val_logits, val_labels, task, names, args.target_sensitivity)
        decision["fitted_on"] = oof[2] if oof else \
            f"the validation split ({len(val_labels)} images), the ensemble's probabilities"
        decision["temperature_divides"] = "the ensemble's output (the log of its members' mean probability)"
    else:
        shutil.rmtree(out / MEMBERS, ignore_errors=True)
        val_logits, val_labels = scoring.decision_data(state, rep)  # validation (or out-of-fold) only: threshold, temperature
        decision = scoring.fit_decision(val_logits, val_labels, task, names, args.target_sensitivity)
        decision["temperature_divides"] = "logits"
        decision["fitted_on"] = (f"out-of-fold predictions of the {len(state['folds'])} fold models ({len(val_labels)} "
                                 "development images)" if "oof" in state
                                 else f"the validation split ({len(val_labels)} images)")
        save_model(rep.model, architecture(rep), out)
        if choice is None:
            (out / ENSEMBLE).unlink(missing_ok=True)
        else:
            first = choice.members[0]
            write_manifest(choice, out, [{"label": first.label, "run_id": first.run_id, "path": ".",
                                          "temperature": decision["temperature"], "validation_score": first.score}])
    shipped = load_model(out)  # the exported model exactly as analysis.predict loads it
    scored = scoring.score_test(shipped, rep, decision, args.n_resamples, args.seed)  # test: scored, never fitted on
    # the winner alone, float32 (what a single export ships), for the reproduction and precision checks
    winner_logits = rep.logits(rep.model, rep.test)[0] if choice is not None and choice.network == "ensemble" \
        else scored["logits"]
    if rep.fp32_is_trial:  # the exported model runs on the trial's own setting: one pass is both
        trial_logits = winner_logits
    else:
        trial_logits, _ = rep.trial_logits(rep.test)
    replayed = classification_metrics(task, scored["labels"], probabilities(task, trial_logits), names)

    # model.onnx: the shipped network with its calibration, checked against it on validation (skipped without the extra)
    onnx = export_onnx(shipped, prep, decision, out, rep.val, rep.normalization)

    key, _ = runs.selection(parent, space)
    logged = trial.data.metrics
    metrics = {
        "format": FORMAT, "search": parent.data.tags.get(TAG_SEARCH), "search_run_id": parent.info.run_id,
        "trial_id": runs.trial_label(trial), "trial_run_id": trial.info.run_id, "dataset": rep.config["dataset"],
        "selection": {"metric": key, "value": logged.get(key, float("nan"))},
        "best_epoch": state.get("best_epoch"), "searched": scoring.searched_values(searched_keys(space), rep.config, trial),
        "splits": scoring.split_summary(rep, int(state.get("best_fold", 0))),
        "test": {k: v for k, v in scored.items() if k not in ("logits", "labels")},
        "reproduced": reproduction(replayed, logged, rep, scored["n"]),
        "precision_change": precision_change(trial_logits, winner_logits, scored["labels"], rep, logged),
        "calibration": {"val": scoring.calibration_report(val_logits, val_labels, task, decision["temperature"]),
                        "test": scoring.calibration_report(scored["logits"], scored["labels"], task, decision["temperature"])},
        "bootstrap": {"n_resamples": args.n_resamples, "confidence": 0.95, "method": "percentile", "seed": args.seed},
        "onnx": onnx,
        # reported, never used to choose: per subgroup (analysis.subgroups) and under corruptions (analysis.robustness)
        "subgroups": subgroup_report(task, names, scored["labels"], calibrated(scored["logits"], task, decision["temperature"]),
                                     decision["threshold"], rep.test.attributes, args.n_resamples, args.seed,
                                     "the exported model's calibrated probabilities at its decision rule"),
        "robustness": robustness.robustness_report(lambda images: rep.logits(shipped, images)[0], rep.test, task,
                                                   decision, args.seed, args.robustness_images),
    }
    robustness.write_plot(metrics["robustness"], out)
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
    if not onnx.get("ok", True):  # skipped (no extra) is fine; written but wrong, or not writable, is not
        print(f"error: {ONNX_FILE} {onnx_text(onnx)}; the PyTorch files in {out}/ are complete, see metrics.json"
              + ("; not registered" if args.register else ""), file=sys.stderr)
        return 1
    if choice is not None:  # the search's description shows what was handed over, members and weights
        record_on_search(client, parent.info.run_id, choice)
        publish(ResilientClient(client.tracking_uri), parent.info.run_id, report=False)
    if args.register:
        version = model_registry.register(out, prep, client.tracking_uri, trial, metrics["search"], args.register,
                                          metrics, args.alias)
        print(f"registered: {args.register} version {version}, alias {args.alias} (MLflow Model Registry at "
              f"{client.tracking_uri}); serve it with: mlflow models serve -m 'models:/{args.register}@{args.alias}' "
              "--env-manager local")
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
    print(f"reproduces the logged test metrics: {reproduction_text(repro)}")
    print(f"precision change: {change_text(metrics['precision_change'])}")
    print(f"subgroups: {subgroup_line(metrics['subgroups'])}")
    print(f"robustness: {robustness.summary_text(metrics['robustness'])}")
    ensemble = metrics.get("ensemble")
    if ensemble is not None:
        print(figures_line(ensemble["test_after_choice"], ensemble["variant"]))
    files = FILES if ensemble is None else (*FILES, ENSEMBLE) if ensemble["network"] == "single" else \
        (ENSEMBLE, f"{MEMBERS}/", *FILES[2:])
    print(f"{ONNX_FILE}: {onnx_text(metrics['onnx'])}")
    files = (*files, *metrics["onnx"].get("files", []))
    print(f"wrote {out}/ ({', '.join(files)}) in {metrics['export_seconds']:.1f}s")


def main(argv=None) -> int:
    args = get_args_parser().parse_args(argv)
    return runs.run_cli(lambda: export(args), args.debug)


if __name__ == "__main__":
    sys.exit(main())

"""Quality: what a 30-minute CPU search hands over, at 28 px on PneumoniaMNIST and BreastMNIST, over 3 search seeds,
beside all seven MedMNIST v2 baselines (Yang et al., Scientific Data 2023, 10:41, Table 3; test AUC / ACC).

Fixed in advance and committed before any of its test numbers was seen: the space and its 30-minute budget
(`bench/quality_space.yaml`, selection metric val_loss, see there why), the seeds, and the variants scored:

    single          the trial tune.py returns (best validation log loss among trials with finished epochs)
    single+tta      the same model, averaged with its horizontally flipped input
    ensemble        the calibrated mean of the top 3 compatible trials by validation
    ensemble+tta    the same with flip TTA
    shipped         what `analysis.export --ensemble 3 --tta` ships: the cheapest of the four within one
                    paired-bootstrap SE of the best on the validation split (analysis/ensemble.py)

Each variant is scored on the fixed test split once per seed, after the choice; none is chosen among on test.
Accuracy at the argmax rule (0.5 for binary), as the paper. Per seed: point value and a 2,000-resample percentile
bootstrap 95 % CI over test images; per dataset: mean +- sd over seeds, and for each published row whether it lies
inside our CI (in how many seeds). Whole run: 2 datasets x 3 seeds x (30 min + replay) ~ 3.3 h on 2 cores.

    python bench/quality.py --data-root <medmnist folder> [--datasets breastmnist] [--seeds 0 1 2] [--budget 30m]
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import mlflow  # noqa: E402
import yaml  # noqa: E402

from analysis import runs  # noqa: E402
from analysis.bootstrap import format_ci, metrics_with_ci  # noqa: E402
from analysis.calibration import calibrated  # noqa: E402
from analysis.ensemble import VARIANTS, choose_for_search  # noqa: E402
from bench.common import base_parser, machine_line, run_tune  # noqa: E402

# MedMNIST v2, Table 3 (test AUC, ACC); None where no source we could read gives the figure (see BENCHMARKS.md 4)
PUBLISHED = {
    "pneumoniamnist": {"ResNet-18 (28)": (0.944, 0.854), "ResNet-18 (224)": (0.956, 0.864),
                       "ResNet-50 (28)": (0.948, 0.854), "ResNet-50 (224)": (0.962, 0.884),
                       "auto-sklearn": (0.942, 0.855), "AutoKeras": (0.947, 0.878),
                       "Google AutoML Vision": (0.991, 0.946)},
    "breastmnist": {"ResNet-18 (28)": (0.901, 0.863), "ResNet-18 (224)": (0.891, 0.833),
                    "ResNet-50 (28)": (0.857, 0.812), "ResNet-50 (224)": (0.866, 0.842),
                    "auto-sklearn": None, "AutoKeras": None, "Google AutoML Vision": None},
}
ENSEMBLE_SIZE = 3
SCORED = (*VARIANTS, "shipped")


def search(space: dict, dataset: str, seed: int, args) -> tuple[float, Path]:
    """One 30-minute search of the fixed space; returns (wall seconds, its folder)."""
    space = {**space, "dataset": dataset, "time_budget": args.budget or space["time_budget"]}
    space["fixed"] = {**space["fixed"], "device": args.device}
    if args.device == "cuda":  # Ray hides GPUs from trials that do not ask for one
        space["resources"] = {**space["resources"], "gpu": 0.5}
    return run_tune(space, "--data-root", args.data_root, "--seed", str(seed), "--no-report")


def trial_curves(client, parent) -> list[dict]:
    """Each trial's searched keys, outcome, validation loss and seconds per epoch: the raw material of the ablation,
    which is judged on validation only (and shows what each stem's epochs cost)."""
    out = []
    for run in runs.trials(client, parent):
        curve = {key: [m.value for m in sorted(client.get_metric_history(run.info.run_id, key), key=lambda m: m.step)]
                 for key in ("val_loss", "epoch_seconds")}
        out.append({"params": dict(run.data.params), "outcome": run.data.tags.get(runs.TAG_OUTCOME), **curve})
    return out


def score(workdir: Path, seed: int, args) -> dict:
    """Choose the shipped variant on validation, then score every declared variant on test (once each)."""
    client = mlflow.MlflowClient(f"sqlite:///{workdir / 'mlflow.db'}")
    parent = runs.get_search(client, "bench")
    choice = choose_for_search(client, parent, runs.search_space(client, parent), ENSEMBLE_SIZE, True, args.data_root,
                               seed=seed)
    rep = choice.reps[0]
    scores = {}
    for variant in VARIANTS:  # test is read here, after the choice, once per variant
        logits, labels = rep.logits(choice.module(variant), rep.test)
        scores[variant] = metrics_with_ci(rep.dataset.task, labels, calibrated(logits, rep.dataset.task, 1.0))
    scores["shipped"] = scores[choice.chosen]  # one of the four: not replayed a second time
    return {"trials": len(runs.trials(client, parent)), "chosen": choice.chosen, "members": len(choice.members),
            "validation": choice.decision, "curves": trial_curves(client, parent), "scores": scores}


def mean_sd(values: list[float]) -> str:
    if len(values) < 2:
        return f"{values[0]:.3f} (one seed, no sd)"
    return f"{statistics.mean(values):.3f} +- {statistics.stdev(values):.3f}"


def report(dataset: str, results: list[dict]) -> dict[str, str]:
    """Print one dataset's table; returns the shipped variant's mean +- sd per metric."""
    print(f"\n{dataset}: {len(results)} seeds; shipped variant per seed: {[r['chosen'] for r in results]}")
    for variant in SCORED:
        cells = []
        for metric in ("auc", "acc"):
            values = [r["scores"][variant][metric]["value"] for r in results]
            cis = ", ".join(format_ci(r["scores"][variant][metric]) for r in results)
            cells.append(f"{metric.upper()} {mean_sd(values)} (per seed {cis})")
        print(f"  {variant:13s} " + "; ".join(cells))
    shipped = {m: [r["scores"]["shipped"][m] for r in results] for m in ("auc", "acc")}
    for row, figures in PUBLISHED[dataset].items():
        if figures is None:
            print(f"  {row:22s} not found in a source we could read")
            continue
        marks = []
        for metric, value in zip(("auc", "acc"), figures):
            inside = sum(ci["low"] <= value <= ci["high"] for ci in shipped[metric])
            ours = statistics.mean(ci["value"] for ci in shipped[metric])
            place = "level with" if round(ours, 3) == value else "below" if ours > value else "above"
            marks.append(f"{metric.upper()} {value:.3f} ({place} our mean, inside our CI in {inside}/{len(results)} seeds)")
        print(f"  {row:22s} " + "; ".join(marks))
    return {m: mean_sd([ci["value"] for ci in shipped[m]]) for m in ("auc", "acc")}


def best_by(curve: list[float], epoch: int) -> float | None:
    """The best validation loss a trial had reached by `epoch` (its checkpoint keeps the best weights)."""
    return min(curve[:epoch]) if len(curve) >= epoch else None


def ablation(dataset: str, results: list[dict]) -> None:
    """What each piece adds, judged on validation only (test is never read here), from the searches themselves:
    stem (trials of each stem at equal epochs), longer training (the same trials at rungs 3, 9 and 15), ensemble and
    TTA (the validation log loss of each variant, against the single winner, with the paired SE)."""
    print(f"\n{dataset} ablation, validation log loss (lower is better), mean over {len(results)} seeds:")
    for stem in ("small", "imagenet"):
        curves = [[t["val_loss"] for t in r["curves"] if t["params"].get("stem") == stem] for r in results]
        counts = [len(c) for c in curves]
        at3 = [statistics.median(v) for c in curves if (v := [x for x in (best_by(t, 3) for t in c) if x is not None])]
        best = [min(min(t) for t in c if t) for c in curves if any(c)]
        seconds = [s for r in results for t in r["curves"] if t["params"].get("stem") == stem
                   for s in t.get("epoch_seconds", [])]  # results saved before epoch_seconds was kept: none
        cost = f"; median {statistics.median(seconds):.1f} s per epoch" if seconds else ""
        print(f"  stem {stem:8s}: trials per search {counts}; median at epoch 3 {statistics.mean(at3):.4f}; "
              f"best in search {statistics.mean(best):.4f}{cost}" if at3 and best else
              f"  stem {stem:8s}: no trial finished an epoch")
    full = [t["val_loss"] for r in results for t in r["curves"] if len(t["val_loss"]) >= 15]
    if full:
        rungs = {e: statistics.median(best_by(t, e) for t in full) for e in (3, 9, 15)}
        gain = statistics.median(best_by(t, 3) - best_by(t, 15) for t in full)
        print(f"  longer training, the {len(full)} trials that reached epoch 15: median {rungs[3]:.4f} at epoch 3, "
              f"{rungs[9]:.4f} at 9, {rungs[15]:.4f} at 15 (median gain 3 -> 15: {gain:.4f})")
    for r in results:  # the variants' validation scores, as analysis.ensemble's one-SE rule saw them
        table = r["validation"]["variants"]
        cells = ", ".join(f"{name} {row['value']:.4f} (gap {row['gap_to_best']:.4f}, SE {row['se_of_gap']:.4f})"
                          for name, row in table.items())
        print(f"  seed {r['seed']} variants: {cells}; best {r['validation']['best']}, shipped {r['chosen']}")
    print("  cross-validation: not in this space (a K-fold trial trains K models per epoch)")


def run_one(space: dict, dataset: str, seed: int, args) -> dict:
    """One search (or, with --score-folder, an existing one) and its scores, saved to --save as it finishes."""
    if args.score_folder:
        seconds, workdir = None, args.score_folder
    else:
        seconds, workdir = search(space, dataset, seed, args)
    result = {"dataset": dataset, "seed": seed, "seconds": seconds, "machine": machine_line(),
              **score(workdir, seed, args)}
    if args.save:
        args.save.mkdir(parents=True, exist_ok=True)
        (args.save / f"{dataset}_seed{seed}.json").write_text(json.dumps(result, indent=1))
    took = "time not recorded (scored an existing search)" if seconds is None else f"{seconds / 60:.1f} min"
    print(f"{dataset} seed {seed}: {result['trials']} trials in {took}, shipped {result['chosen']}, test AUC "
          f"{format_ci(result['scores']['shipped']['auc'])}, ACC {format_ci(result['scores']['shipped']['acc'])}",
          flush=True)
    return result


def main() -> None:
    parser = base_parser(__doc__.splitlines()[0])
    parser.add_argument("--space", type=Path, default=Path(__file__).with_name("quality_space.yaml"))
    parser.add_argument("--datasets", nargs="+", default=list(PUBLISHED), choices=list(PUBLISHED))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--budget", help="override the space's time budget (e.g. 5m for a quick check; not a figure)")
    parser.add_argument("--save", type=Path, help="write each search's result to DIR/<dataset>_seed<k>.json")
    parser.add_argument("--score-folder", type=Path,
                        help="score the search already in this bench folder (one dataset, one seed) instead of searching")
    parser.add_argument("--results", type=Path, nargs="+",
                        help="report these saved results instead of searching (a benchmark run in parts)")
    args = parser.parse_args()
    if args.score_folder and (len(args.datasets) != 1 or len(args.seeds) != 1):
        parser.error("--score-folder scores one search: pass one --datasets and one --seeds")
    print(machine_line(), f"| {args.space.name}, seeds {args.seeds}, budget {args.budget or 'as the space'}")
    started = time.time()
    results: dict[str, list[dict]] = {}
    if args.results:
        for path in args.results:
            saved = json.loads(path.read_text())
            results.setdefault(saved["dataset"], []).append(saved)
            print(f"{path.name}: {saved['machine']}")
    else:
        space = yaml.safe_load(args.space.read_text())
        for seed in args.seeds:  # seeds outermost: a drift in the machine's speed hits both datasets alike
            for dataset in args.datasets:
                results.setdefault(dataset, []).append(run_one(space, dataset, seed, args))
    summary = {dataset: report(dataset, sorted(rows, key=lambda r: r["seed"])) for dataset, rows in results.items()}
    for dataset, rows in results.items():
        ablation(dataset, rows)
    searched = [r["seconds"] for rows in results.values() for r in rows if r["seconds"] is not None]
    print(f"\nsearch time: {sum(searched) / 3600:.2f} h in {len(searched)} searches; this run {(time.time() - started) / 3600:.2f} h")
    print("shipped model, mean +- sd over seeds: " + "; ".join(
        f"{d} AUC {s['auc']}, ACC {s['acc']}" for d, s in summary.items()))


if __name__ == "__main__":
    main()

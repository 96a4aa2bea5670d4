"""Quality: what a 30-minute CPU search hands over, at 28 px on PneumoniaMNIST and BreastMNIST, over 3 search seeds,
beside the MedMNIST v2 baselines (Yang et al., Scientific Data 2023, 10:41, Table 3) and MedMNIST+'s 28 x 28 rows
(Doerrich et al., Sci. Rep. 2025, arXiv 2404.15786; test AUC / ACC).

Second version (issue 23), fixed and committed before any of its test numbers was seen: the space and its
30-minute budget (`bench/quality_space_v2.yaml`: the first space with ASHA's rungs in seconds), search seeds 3, 4
and 5 (the first version used 0-2, whose test numbers shaped this version's design), and four variants scored:

    single     the trial tune.py returns (best validation log loss among trials with finished epochs)
    top3       the calibrated, equally weighted mean of the top 3 compatible trials by validation (the first
               version's `ensemble`; analysis.ensemble)
    selected   ensemble selection (analysis.handover: greedy forward selection with replacement, 25 steps, at most
               5 members, on one half of the validation split, from the trials' kept validation predictions)
    shipped    what `analysis.export --search NAME --out DIR` ships by default: `selected` unless, on the other
               half of the validation split, it is worse than `single` by more than one paired-bootstrap SE

Each variant is scored on the fixed test split once per seed, after the validation choice; none is chosen among on
test. Accuracy at the argmax rule, as the papers. Per seed: point value and a 2,000-resample percentile bootstrap
95 % CI over test images; per dataset: mean +- sd over seeds, and for each published row whether it lies inside our
CI (in how many seeds). The ablation reads validation only: the variants on the held-back half of the validation
split, and where the training core-seconds went (per outcome and stem). Whole run: 2 datasets x 3 seeds x
(30 min + replay) ~ 3.2 h on 2 cores; `--save DIR` keeps each search's result, `--results` reports saved parts.

    python bench/quality.py --data-root <medmnist folder> [--datasets breastmnist] [--seeds 3 4 5] [--save DIR]

The first version (commit 22c68dd, `bench/quality_space.yaml`, seeds 0-2, variants single/+tta/ensemble/+tta and
the one-SE `shipped`) is reproduced from that commit; its figures stay in BENCHMARKS.md section 4.
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
from analysis.calibration import calibrated, fit_temperature  # noqa: E402
from analysis.ensemble import choose_for_search, scorer  # noqa: E402
from analysis.handover import DEFAULT_MEMBERS, candidates, choose_handover, kept_validation, select  # noqa: E402
from analysis.selection import halves, paired_se, safe_score, weighted  # noqa: E402
from bench.common import base_parser, machine_line, run_tune  # noqa: E402

# MedMNIST v2, Table 3 (test AUC, ACC); None where no source we could read gives the figure (see BENCHMARKS.md 4).
# MedMNIST+ (Doerrich et al.), the 28 x 28 columns, mean of 3 seeds, read from the authors' result tables
# (github.com/sdoerrich97/rethinking-model-prototyping-MedMNISTPlus, assets/benchmark_results_<dataset>.png): the
# strongest end-to-end row per metric and the strongest linear probe. Their models are ImageNet-pretrained and
# the 28 px image is zero-padded to 224 px, so the image content is 28 px but the input is not.
PUBLISHED = {
    "pneumoniamnist": {"ResNet-18 (28)": (0.944, 0.854), "ResNet-18 (224)": (0.956, 0.864),
                       "ResNet-50 (28)": (0.948, 0.854), "ResNet-50 (224)": (0.962, 0.884),
                       "auto-sklearn": (0.942, 0.855), "AutoKeras": (0.947, 0.878),
                       "Google AutoML Vision": (0.991, 0.946),
                       "MedMNIST+ VGG16 end-to-end": (0.970, 0.848), "MedMNIST+ AlexNet end-to-end": (0.959, 0.851),
                       "MedMNIST+ DINO ViT-B/16 linear probe": (0.973, 0.866)},
    "breastmnist": {"ResNet-18 (28)": (0.901, 0.863), "ResNet-18 (224)": (0.891, 0.833),
                    "ResNet-50 (28)": (0.857, 0.812), "ResNet-50 (224)": (0.866, 0.842),
                    "auto-sklearn": None, "AutoKeras": None, "Google AutoML Vision": None,
                    "MedMNIST+ AlexNet end-to-end": (0.891, 0.865),
                    "MedMNIST+ DINO ViT-B/16 linear probe": (0.868, 0.833)},
}
TOP_K = 3  # the top3 variant
SCORED = ("single", "top3", "selected", "shipped")


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


def validation_ablation(client, parent, space: dict, seed: int) -> dict:
    """single, top3 and selected on the held-back half of the validation split (the half that chose nothing),
    from the trials' kept validation predictions; temperatures fitted on the selection half, as analysis.handover
    fits them. Test is not read."""
    winner = runs.winner(client, parent)
    kept = kept_validation(client, winner)
    if kept is None:
        return {}
    found, _ = candidates(client, parent, space, winner, kept)
    key, mode = runs.selection(parent, space)
    decision = select(found, key, mode, DEFAULT_MEMBERS, seed)
    task, labels = kept["task"], kept["labels"]
    pick, check = halves(labels, seed)
    score, shown = scorer(key, task)
    probs = []
    for candidate in found:
        logits = candidate.kept["logits"]
        probs.append(calibrated(logits, task, fit_temperature(logits[pick], labels[pick], task))[check])
    top = min(TOP_K, len(found))
    variants = {"single": probs[0], "top3": weighted(probs[:top], [1 / top] * top),
                "selected": weighted(probs, decision["weights"])}
    out = {"metric": shown, "mode": mode, "candidates": len(found), "n_check": int(len(check)),
           "members": int(sum(w > 0 for w in decision["weights"])), "variants": {}}
    for name, p in variants.items():
        row = {"value": safe_score(score, labels[check], p)}
        if name != "single":  # the paired SE of the gap to the single winner, on the same images
            row["se_vs_single"] = paired_se(labels[check], variants["single"], p, score, 2000, seed)
        out["variants"][name] = row
    return out


def score(workdir: Path, seed: int, args) -> dict:
    """Choose on validation (the export's default rule), then score every declared variant on test (once each)."""
    client = mlflow.MlflowClient(f"sqlite:///{workdir / 'mlflow.db'}")
    parent = runs.get_search(client, "bench")
    space = runs.search_space(client, parent)
    shipped = choose_handover(client, parent, space, DEFAULT_MEMBERS, False, args.data_root, seed=seed)
    top3 = choose_for_search(client, parent, space, TOP_K, False, args.data_root, seed=seed)
    rep = shipped.reps[0]
    networks = {"single": shipped.module("single"), "top3": top3.module("ensemble"),
                "selected": shipped.module("ensemble")}
    scores = {}
    for variant, network in networks.items():  # test is read here, after the choice, once per variant
        logits, labels = rep.logits(network, rep.test)
        scores[variant] = metrics_with_ci(rep.dataset.task, labels, calibrated(logits, rep.dataset.task, 1.0))
    scores["shipped"] = scores["single" if shipped.chosen == "single" else "selected"]  # not replayed twice
    return {"trials": len(runs.trials(client, parent)), "chosen": shipped.chosen,
            "members": shipped.chosen_members, "weights": shipped.decision["weights"],
            "validation": shipped.decision, "ablation": validation_ablation(client, parent, space, seed),
            "curves": trial_curves(client, parent), "scores": scores}


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
    width = max(map(len, PUBLISHED[dataset]))
    for row, figures in PUBLISHED[dataset].items():
        if figures is None:
            print(f"  {row:{width}s} not found in a source we could read")
            continue
        marks = []
        for metric, value in zip(("auc", "acc"), figures):
            inside = sum(ci["low"] <= value <= ci["high"] for ci in shipped[metric])
            ours = statistics.mean(ci["value"] for ci in shipped[metric])
            place = "level with" if round(ours, 3) == value else "below" if ours > value else "above"
            marks.append(f"{metric.upper()} {value:.3f} ({place} our mean, inside our CI in {inside}/{len(results)} seeds)")
        print(f"  {row:{width}s} " + "; ".join(marks))
    return {m: mean_sd([ci["value"] for ci in shipped[m]]) for m in ("auc", "acc")}


def ablation(dataset: str, results: list[dict]) -> None:
    """What each piece adds, judged on validation only (test is never read here): the variants on the held-back
    half of the validation split; per stem, the trials finished and the best validation loss; where the training
    core-seconds went (trials that completed their epochs, against those stopped by ASHA or cut by the budget)."""
    print(f"\n{dataset} ablation, validation only, {len(results)} seeds:")
    for r in results:
        a = r.get("ablation") or {}
        if not a:
            print(f"  seed {r['seed']}: the winner kept no validation predictions")
            continue
        cells = ", ".join(f"{name} {row['value']:.4f}" + (f" (vs single {row['value'] - a['variants']['single']['value']:+.4f}, "
                          f"SE {row['se_vs_single']:.4f})" if "se_vs_single" in row else "")
                          for name, row in a["variants"].items())
        print(f"  seed {r['seed']} held-back half ({a['n_check']} images, {a['metric']}, {a['candidates']} candidates, "
              f"{a['members']} selected): {cells}; shipped {r['chosen']}")
    for stem in ("small", "imagenet"):
        trials = [[t for t in r["curves"] if t["params"].get("stem") == stem] for r in results]
        finished = [sum(t["outcome"] == "completed" for t in c) for c in trials]
        best = [min((min(t["val_loss"]) for t in c if t["val_loss"]), default=float("nan")) for c in trials]
        seconds = [sum(sum(t.get("epoch_seconds", [])) for t in c) for c in trials]
        print(f"  stem {stem:8s}: trials per search {[len(c) for c in trials]}, completed {finished}, best validation "
              f"loss {[round(b, 4) for b in best]}, training core-seconds {[round(s) for s in seconds]}")
    for r in results:
        spent = {}
        for t in r["curves"]:
            spent[t["outcome"]] = spent.get(t["outcome"], 0.0) + sum(t.get("epoch_seconds", []))
        total = sum(spent.values()) or float("nan")
        print(f"  seed {r['seed']} training core-seconds by outcome: " + ", ".join(
            f"{outcome} {value:.0f} ({100 * value / total:.0f} %)" for outcome, value in sorted(spent.items())))


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
    parser.add_argument("--space", type=Path, default=Path(__file__).with_name("quality_space_v2.yaml"))
    parser.add_argument("--datasets", nargs="+", default=list(PUBLISHED), choices=list(PUBLISHED))
    parser.add_argument("--seeds", type=int, nargs="+", default=[3, 4, 5])
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

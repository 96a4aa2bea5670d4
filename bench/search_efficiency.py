"""Search efficiency on PneumoniaMNIST: epochs a method spends until its result is within one standard error of the
full grid's best validation AUC, as a fraction of the grid's epochs. Target: TPE + ASHA <= 1/4 of the grid.

The grid is trained for real once through Ray Tune (`grid_search`) and its per-epoch validation curves are kept
(`bench/results/grid_curves.json.gz`, committed, so anyone can rerun the replays). Every method then runs in Ray Tune
with tune.py's own searcher and scheduler (`search_spaces.tuner.make_searcher` / `make_scheduler`: the same TPE
start-up count, seed handling and ASHA settings a user's search gets), each trial replaying its config's recorded
curve (a tabular benchmark, as in HPOBench), so every method sees identical training outcomes. Methods:

    TPE + ASHA, random + ASHA          what the target is about
    TPE (no ASHA), random (no ASHA)    controls: does early stopping do the work, does TPE beat random?
    grid in random order               control: an unordered grid also reaches the target early

Two criteria, each as epochs spent until it holds: "best seen" (any reported epoch of any trial, including trials
ASHA later stops) and "returned" (the trial tune.py would hand over: the best of the trials that trained to the
end). The tolerance is the Hanley-McNeil standard error of the grid's best AUC on this validation split's class
counts. Ratio = median over seeds / grid epochs, with a bootstrap 95 % CI over seeds; a seed that never reaches the
target counts as the grid's epochs + 1 (so a median at that value reads "not reached").

    python bench/search_efficiency.py --data-root <medmnist folder> [--seeds 30] [--device cuda]
"""

from __future__ import annotations

import gzip
import json
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import ray  # noqa: E402
from ray import tune  # noqa: E402
from ray.tune.search import BasicVariantGenerator  # noqa: E402

from bench.common import base_parser, machine_line  # noqa: E402
from search_spaces import SearchSpace  # noqa: E402
from search_spaces.tuner import make_scheduler, make_searcher  # noqa: E402
from trainables.data.datasets import load_dataset  # noqa: E402
from trainables.data.splits import train_val_indices  # noqa: E402
from trainables.training.epochs import iterate_epochs  # noqa: E402

GRID = {"lr": [3e-4, 1e-3, 3e-3, 1e-2, 3e-2], "batch_size": [64, 256], "loss_weighting": ["none", "inverse"],
        "warmup_frac": [0.0, 0.2]}
CURVES = Path(__file__).with_name("results") / "grid_curves.json.gz"
METHODS = ("tpe+asha", "random+asha", "tpe", "random", "grid_random_order")


def key(config: dict) -> str:
    return json.dumps({k: config[k] for k in GRID}, sort_keys=True)


def grid_trainable(config, data):
    for epoch in iterate_epochs(config, data):
        tune.report({"val_auc": epoch.metrics["val_auc"], "val_loss": epoch.metrics["val_loss"]})


def record_grid(args) -> dict:
    """Train every grid config for every epoch (the grid's cost) and keep each validation curve."""
    data = load_dataset("pneumoniamnist", image_size=28, data_root=args.data_root)
    _, val_idx = train_val_indices(data, None, 0)
    val_labels = data.dev.labels[val_idx]
    fixed = {"model": args.model, "epochs": args.epochs, "seed": 0, "device": args.device, "data_root": args.data_root,
             "stem": "imagenet"}  # the stem the recorded grid curves (bench/results) were trained with
    space = {**fixed, **{k: tune.grid_search(v) for k, v in GRID.items()}}
    gpu = 0.5 if args.device == "cuda" else 0
    tuner = tune.Tuner(tune.with_resources(tune.with_parameters(grid_trainable, data=data), {"cpu": 1, "gpu": gpu}),
                       param_space=space, run_config=tune.RunConfig(verbose=0, storage_path="/tmp/medtune-bench-grid"),
                       tune_config=tune.TuneConfig(max_concurrent_trials=args.concurrent))
    curves = {key(r.config): {"val_auc": list(r.metrics_dataframe["val_auc"]),
                              "val_loss": list(r.metrics_dataframe["val_loss"])} for r in tuner.fit()}
    return {"model": args.model, "epochs": args.epochs, "grid": GRID, "val_positives": int((val_labels == 1).sum()),
            "val_negatives": int((val_labels == 0).sum()), "curves": curves}


def auc_standard_error(auc: float, positives: int, negatives: int) -> float:
    """Hanley & McNeil (1982): the standard error of an AUC estimated on `positives` + `negatives` images."""
    q1, q2 = auc / (2 - auc), 2 * auc * auc / (1 + auc)
    variance = (auc * (1 - auc) + (positives - 1) * (q1 - auc * auc) + (negatives - 1) * (q2 - auc * auc))
    return math.sqrt(variance / (positives * negatives))


def replay(config, curves):
    best = float("-inf")
    for value in curves[key(config)]:
        best = max(best, value)
        tune.report({"val_auc": value, "best_val_auc": best})


class EpochLedger(tune.Callback):
    """After every reported epoch (arrival order): the best AUC seen so far, and the best of the trials that have
    trained all `max_t` epochs so far (what tune.py would return if the search ended there)."""

    def __init__(self, max_t: int):
        self.max_t, self.seen, self.returned = max_t, [], []
        self._trial_best: dict[str, float] = {}

    def on_trial_result(self, iteration, trials, trial, result, **info):
        best = max(self._trial_best.get(trial.trial_id, float("-inf")), result["val_auc"])
        self._trial_best[trial.trial_id] = best
        self.seen.append(max(self.seen[-1] if self.seen else float("-inf"), best))
        finished = best if result["training_iteration"] >= self.max_t else float("-inf")
        self.returned.append(max(self.returned[-1] if self.returned else float("-inf"), finished))


def bench_space(curves: dict, args, scheduler: str) -> SearchSpace:
    """The space as tune.py would build it from YAML: the grid's values as choices, ASHA grace 1, reduction 3."""
    return SearchSpace(name="bench", source=Path(__file__), description="search efficiency", dataset="pneumoniamnist",
                       num_samples=len(curves), max_concurrent=args.concurrent, max_t=args.epochs, grace_period=1,
                       reduction_factor=3, scheduler=scheduler, params={k: {"choice": v} for k, v in GRID.items()})


def run_method(method: str, curves: dict, args, seed: int) -> EpochLedger:
    space = bench_space(curves, args, "asha" if method.endswith("+asha") else "fifo")
    if method.startswith("tpe"):
        searcher = make_searcher(space, seed)
    elif method == "grid_random_order":
        order = np.random.default_rng(seed).permutation(sorted(curves))
        searcher = BasicVariantGenerator(points_to_evaluate=[json.loads(k) for k in order], random_state=seed)
    else:
        searcher = BasicVariantGenerator(random_state=seed)
    ledger = EpochLedger(args.epochs)
    tuner = tune.Tuner(
        tune.with_parameters(replay, curves={k: c["val_auc"] for k, c in curves.items()}),
        param_space={k: tune.choice(v) for k, v in GRID.items()},
        tune_config=tune.TuneConfig(search_alg=searcher, scheduler=make_scheduler(space), num_samples=len(curves),
                                    max_concurrent_trials=args.concurrent, reuse_actors=True),
        run_config=tune.RunConfig(verbose=0, callbacks=[ledger], storage_path="/tmp/medtune-bench-replay"),
    )
    tuner.fit()
    return ledger


def epochs_to(values: list[float], target: float, never: int) -> int:
    return next((spent for spent, best in enumerate(values, start=1) if best >= target), never)


def median_ci(values: list[int], seed: int = 0, resamples: int = 2000) -> tuple[float, float, float]:
    """Median over seeds and its percentile-bootstrap 95 % CI (resampling seeds)."""
    data = np.asarray(values, dtype=float)
    draws = np.random.default_rng(seed).choice(data, size=(resamples, len(data)), replace=True)
    medians = np.median(draws, axis=1)
    return float(np.median(data)), float(np.quantile(medians, 0.025)), float(np.quantile(medians, 0.975))


def main() -> None:
    parser = base_parser(__doc__.splitlines()[0])
    parser.add_argument("--model", default="simple_cnn")
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--concurrent", type=int, default=2)
    parser.add_argument("--seeds", type=int, default=30)
    parser.add_argument("--curves", type=Path, default=CURVES, help="recorded grid curves (trained and written when missing)")
    args = parser.parse_args()
    print(machine_line())
    ray.init(include_dashboard=False, log_to_driver=False, logging_level="ERROR")
    if args.curves.exists():
        recorded = json.loads(gzip.decompress(args.curves.read_bytes()))
        args.model, args.epochs = recorded["model"], recorded["epochs"]
    else:
        recorded = record_grid(args)
        args.curves.parent.mkdir(parents=True, exist_ok=True)
        args.curves.write_bytes(gzip.compress(json.dumps(recorded).encode()))
    curves = recorded["curves"]
    grid_epochs = sum(len(c["val_auc"]) for c in curves.values())
    grid_best = max(max(c["val_auc"]) for c in curves.values())
    tolerance = auc_standard_error(grid_best, recorded["val_positives"], recorded["val_negatives"])
    target = grid_best - tolerance
    print(f"grid: {len(curves)} configs x {args.epochs} epochs of {args.model} = {grid_epochs} epochs; best val AUC "
          f"{grid_best:.4f}; tolerance 1 SE (Hanley-McNeil, {recorded['val_positives']}+{recorded['val_negatives']} "
          f"validation images) = {tolerance:.4f}; target {target:.4f}")
    spent = {(m, c): [] for m in METHODS for c in ("seen", "returned")}
    for seed in range(args.seeds):  # interleaved: every method once per seed
        for method in METHODS:
            ledger = run_method(method, curves, args, seed)
            spent[method, "seen"].append(epochs_to(ledger.seen, target, grid_epochs + 1))
            spent[method, "returned"].append(epochs_to(ledger.returned, target, grid_epochs + 1))
    ratios = {}
    for method in METHODS:
        for criterion in ("seen", "returned"):
            values = spent[method, criterion]
            median, low, high = median_ci(values)
            ratios[method, criterion] = (median / grid_epochs, low / grid_epochs, high / grid_epochs)
            reached = sum(v <= grid_epochs for v in values)
            print(f"{method:18s} {criterion:8s}: median {median:.0f} epochs [{low:.0f}, {high:.0f}], reached {reached}/"
                  f"{len(values)}; / grid = {median / grid_epochs:.3f} [{low / grid_epochs:.3f}, {high / grid_epochs:.3f}]")
    print("per seed:", json.dumps({f"{m} {c}": v for (m, c), v in spent.items()}))
    ratio, low, high = ratios["tpe+asha", "returned"]
    print(f"TPE + ASHA epochs to target (returned trial) / grid epochs = {ratio:.3f} [{low:.3f}, {high:.3f}]")


if __name__ == "__main__":
    main()

"""Search efficiency on PneumoniaMNIST: epochs a method spends until its best validation AUC is within 0.005
of the full grid's best. Full grid (every config, every epoch) vs ASHA + TPE vs random + ASHA.
Target: ASHA + TPE needs <= 1/4 of the grid's epochs.

The grid is trained for real once through Ray Tune (grid_search) and its per-epoch validation curves are
kept; the searches then run in Ray Tune with the real ASHA scheduler and samplers over the same grid
values, each trial replaying its config's recorded curve (a tabular benchmark, as in HPOBench), so every
method is compared on identical training outcomes and repeated over several seeds for a median.

    python bench/search_efficiency.py --data-root <medmnist folder> [--curves grid_curves.json]
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import ray  # noqa: E402
from optuna.samplers import TPESampler  # noqa: E402
from ray import tune  # noqa: E402
from ray.tune.schedulers import ASHAScheduler  # noqa: E402
from ray.tune.search import BasicVariantGenerator  # noqa: E402
from ray.tune.search.optuna import OptunaSearch  # noqa: E402

from bench.common import base_parser, machine_line  # noqa: E402
from trainables.datasets import load_dataset  # noqa: E402
from trainables.train import iterate_epochs  # noqa: E402

GRID = {"lr": [3e-4, 1e-3, 3e-3, 1e-2, 3e-2], "batch_size": [64, 256], "loss_weighting": ["none", "inverse"],
        "warmup_frac": [0.0, 0.2]}
TOLERANCE = 0.005


def key(config: dict) -> str:
    return json.dumps({k: config[k] for k in GRID}, sort_keys=True)


def grid_trainable(config, data):
    for epoch in iterate_epochs(config, data):
        tune.report({"val_auc": epoch.metrics["val_auc"]})


def record_grid(args) -> dict[str, list[float]]:
    """Train every grid config for every epoch (the grid's cost) and keep each validation curve."""
    data = load_dataset("pneumoniamnist", image_size=28, data_root=args.data_root)
    fixed = {"model": args.model, "epochs": args.epochs, "seed": 0, "device": args.device, "data_root": args.data_root}
    space = {**fixed, **{k: tune.grid_search(v) for k, v in GRID.items()}}
    tuner = tune.Tuner(tune.with_resources(tune.with_parameters(grid_trainable, data=data), {"cpu": 1}),
                       param_space=space, run_config=tune.RunConfig(verbose=0, storage_path="/tmp/medtune-bench-grid"),
                       tune_config=tune.TuneConfig(max_concurrent_trials=args.concurrent))
    return {key(r.config): list(r.metrics_dataframe["val_auc"]) for r in tuner.fit()}


def replay(config, curves):
    best = float("-inf")
    for value in curves[key(config)]:
        best = max(best, value)
        tune.report({"val_auc": value, "best_val_auc": best})


class EpochLedger(tune.Callback):
    """Every reported epoch in arrival order, with the best validation AUC seen so far."""

    def __init__(self):
        self.best_so_far: list[float] = []

    def on_trial_result(self, iteration, trials, trial, result, **info):
        previous = self.best_so_far[-1] if self.best_so_far else float("-inf")
        self.best_so_far.append(max(previous, result["val_auc"]))


def epochs_to_target(curves, args, method: str, seed: int, target: float) -> int | None:
    ledger = EpochLedger()
    searcher = OptunaSearch(metric="best_val_auc", mode="max",
                            sampler=TPESampler(seed=seed, n_startup_trials=max(2, len(curves) // 8))) \
        if method == "tpe" else BasicVariantGenerator(random_state=seed)
    tuner = tune.Tuner(
        tune.with_parameters(replay, curves=curves),
        param_space={k: tune.choice(v) for k, v in GRID.items()},
        tune_config=tune.TuneConfig(search_alg=searcher, num_samples=len(curves), max_concurrent_trials=args.concurrent,
                                    scheduler=ASHAScheduler(metric="val_auc", mode="max", max_t=args.epochs,
                                                            grace_period=1, reduction_factor=3)),
        run_config=tune.RunConfig(verbose=0, callbacks=[ledger], storage_path="/tmp/medtune-bench-replay"),
    )
    tuner.fit()
    for spent, best in enumerate(ledger.best_so_far, start=1):
        if best >= target:
            return spent
    return None


def main() -> None:
    parser = base_parser(__doc__.splitlines()[0])
    parser.add_argument("--model", default="simple_cnn")
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--concurrent", type=int, default=2)
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--curves", type=Path, help="JSON of recorded grid curves (written when missing)")
    args = parser.parse_args()
    print(machine_line())
    ray.init(include_dashboard=False, log_to_driver=False, logging_level="ERROR")
    if args.curves and args.curves.exists():
        curves = json.loads(args.curves.read_text())
    else:
        curves = record_grid(args)
        if args.curves:
            args.curves.write_text(json.dumps(curves, indent=1))
    grid_epochs = sum(len(c) for c in curves.values())
    grid_best = max(max(c) for c in curves.values())
    target = grid_best - TOLERANCE
    print(f"grid: {len(curves)} configs x {args.epochs} epochs = {grid_epochs} epochs, best val AUC {grid_best:.4f}")
    medians = {}
    for method in ("tpe", "random"):
        spent = [epochs_to_target(curves, args, method, seed, target) for seed in range(args.seeds)]
        reached = [s for s in spent if s is not None]
        medians[method] = statistics.median([s if s is not None else grid_epochs for s in spent])
        print(f"{method} + ASHA: epochs to within {TOLERANCE} of the grid's best, per seed: {spent} "
              f"(median {medians[method]:.0f}, reached {len(reached)}/{len(spent)})")
    print(f"random + ASHA / grid = {medians['random'] / grid_epochs:.3f}")
    print(f"TPE + ASHA / grid = {medians['tpe'] / grid_epochs:.3f}")


if __name__ == "__main__":
    main()

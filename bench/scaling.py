"""Scaling on one machine: trials per hour of the same trials run (a) one at a time on 1 CPU, (b) N at a time on 1 CPU
each, (c) one at a time on N CPUs (N threads): is it better to run more trials or to give each trial more threads?

Each figure is the whole tune.py command (Ray start-up, data hand-off, MLflow included), repeated with the three
setups interleaved (a, b, c, a, b, c, ...); medians and ranges are printed, the b/a ratio on the last line.

    python bench/scaling.py --data-root <medmnist folder> [--concurrent 2 --trials 4 --repeats 5 --device cuda]
"""

from __future__ import annotations

import os
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import base_parser, interleaved, machine_line, run_tune, spread  # noqa: E402


def trials_per_hour(args, concurrent: int, cpus: int) -> float:
    space = {"description": "scaling benchmark", "dataset": "pneumoniamnist", "num_samples": args.trials,
             "max_concurrent": concurrent, "scheduler": {"max_t": args.epochs, "grace_period": args.epochs},
             "resources": {"cpu": cpus, "gpu": 1 / concurrent if args.device == "cuda" else 0},
             "fixed": {"model": args.model, "batch_size": 128, "lr": 1e-3, "device": args.device,
                       "stem": "imagenet"}}  # the stem BENCHMARKS.md's figures were measured with
    seconds, _ = run_tune(space, "--data-root", args.data_root)
    return args.trials * 3600 / seconds


def main() -> None:
    parser = base_parser(__doc__.splitlines()[0])
    parser.add_argument("--concurrent", type=int, default=os.cpu_count())
    parser.add_argument("--trials", type=int, default=4)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--model", default="resnet18")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    n = args.concurrent
    print(machine_line(), f"| {args.trials} trials of {args.model}, {args.epochs} epochs, {args.repeats} interleaved repeats")
    setups = {"1 at a time, 1 CPU": lambda: trials_per_hour(args, 1, 1),
              f"{n} at a time, 1 CPU each": lambda: trials_per_hour(args, n, 1),
              f"1 at a time, {n} CPUs": lambda: trials_per_hour(args, 1, n)}
    rates = interleaved(setups, args.repeats)
    for name, values in rates.items():
        print(f"{name}: {spread(values, 'trials/h')}")
    one, many, threaded = rates.values()
    print(f"{n} 1-CPU trials at a time / one {n}-CPU trial: {spread([m / t for m, t in zip(many, threaded)], digits=2)}")
    ratios = [m / o for m, o in zip(many, one)]
    print(f"ratio {n} concurrent / 1 = {statistics.median(ratios):.2f} (range {min(ratios):.2f}-{max(ratios):.2f})")


if __name__ == "__main__":
    main()

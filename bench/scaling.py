"""Scaling: trials per hour with N concurrent trials vs 1 on this machine (same trials, 1 CPU each).

    python bench/scaling.py --data-root <medmnist folder> [--concurrent 2 --trials 4]
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import base_parser, machine_line, run_tune  # noqa: E402


def trials_per_hour(args, concurrent: int) -> float:
    space = {"description": "scaling benchmark", "dataset": "pneumoniamnist", "num_samples": args.trials,
             "max_concurrent": concurrent, "scheduler": {"max_t": args.epochs, "grace_period": args.epochs},
             "resources": {"cpu": 1, "gpu": 1 / concurrent if args.device == "cuda" else 0},
             "fixed": {"model": args.model, "batch_size": 128, "lr": 1e-3, "device": args.device}}
    seconds, _ = run_tune(space, "--data-root", args.data_root)
    return args.trials * 3600 / seconds


def main() -> None:
    parser = base_parser(__doc__.splitlines()[0])
    parser.add_argument("--concurrent", type=int, default=os.cpu_count())
    parser.add_argument("--trials", type=int, default=4)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--model", default="resnet18")
    args = parser.parse_args()
    print(machine_line())
    one = trials_per_hour(args, 1)
    many = trials_per_hour(args, args.concurrent)
    print(f"1 at a time: {one:.0f} trials/h; {args.concurrent} at a time: {many:.0f} trials/h "
          f"({args.trials} trials of {args.model}, {args.epochs} epochs, whole tune.py run incl. start-up)")
    print(f"ratio {args.concurrent} concurrent / 1 = {many / one:.2f}")


if __name__ == "__main__":
    main()

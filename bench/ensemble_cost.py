"""Inference cost of the export variants (single, single+tta, ensemble, ensemble+tta) of a finished search: test
images per second through each variant's one network (what analysis.predict and model.ts run), float32 on the CPU.

    python bench/ensemble_cost.py --search smoke-20261121-101500 --ensemble 5 --threads 1

The variants are built exactly as `analysis.export --ensemble K --tta` builds them (analysis.handover: by default
the ensemble selected on validation, with its weights; `--ensemble-rule topk` the top K equally weighted); timing
repeats interleave the variants and print median and range.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from analysis import runs  # noqa: E402
from analysis.handover import DEFAULT_MEMBERS, RULES, choose_handover  # noqa: E402
from bench.common import base_parser, interleaved, machine_line, spread  # noqa: E402


def main() -> None:
    parser = base_parser(__doc__.splitlines()[0])
    parser.add_argument("--search", required=True, help="search name or parent run id")
    parser.add_argument("--tracking-uri", help="MLflow tracking URI (default ./mlflow.db)")
    parser.add_argument("--ensemble", type=int, default=DEFAULT_MEMBERS, help="at most K members in the ensemble")
    parser.add_argument("--ensemble-rule", choices=RULES, default="select", help="as analysis.export's")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch", type=int, default=256, help="images per forward call")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(machine_line())
    client = runs.connect(args.tracking_uri)
    parent = runs.get_search(client, args.search)
    choice = choose_handover(client, parent, runs.search_space(client, parent), args.ensemble, True, args.data_root,
                             rule=args.ensemble_rule)
    rep = choice.reps[0]
    images = rep.normalization(torch.from_numpy(rep.test.images[:]).permute(0, 3, 1, 2))
    variants = ("single", "single+tta", "ensemble", "ensemble+tta")  # all four, whichever the rule shipped
    modules = {variant: choice.module(variant) for variant in variants}
    passes = {variant: len(choice.in_variant(variant)) * (2 if variant.endswith("+tta") else 1) for variant in variants}

    def timed(module):
        def run() -> float:
            start = time.perf_counter()
            with torch.inference_mode():
                for begin in range(0, len(images), args.batch):
                    module(images[begin:begin + args.batch])
            return len(images) / (time.perf_counter() - start)
        return run

    rates = interleaved({v: timed(m) for v, m in modules.items()}, args.repeats)
    print(f"{len(choice.in_variant('ensemble'))} ensemble members (rule {args.ensemble_rule}), {len(images)} test images, "
          f"batch {args.batch}, {args.threads} thread(s); shipped: {choice.chosen}")
    for variant, values in rates.items():
        print(f"{variant:13s} {passes[variant]} pass(es)/image  {spread(values, 'images/s')}")


if __name__ == "__main__":
    main()

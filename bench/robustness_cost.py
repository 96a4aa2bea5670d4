"""What the export's robustness table costs: analysis.robustness.robustness_report for one ResNet-18 with the
ImageNet stem on PneumoniaMNIST's 624 test images (28 px), as the export runs it (float32, the CPU). The weights
are freshly initialised: the cost is the same as a trained model's, the AUCs mean nothing.

    python bench/robustness_cost.py [--data-root $MEDTUNE_DATA_ROOT] [--repeats 5] [--model resnet18] [--size 28]

Prints each repeat's wall seconds and CPU seconds (every thread of the process, so on a busy machine CPU / threads
is what the wall time would be on a quiet one) and their medians; the issue's budget is one minute on 2 cores.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from analysis.replay import logits_of  # noqa: E402
from analysis.robustness import robustness_report  # noqa: E402
from bench.common import base_parser, machine_line, spread  # noqa: E402
from trainables.config import resolve_config  # noqa: E402
from trainables.data.datasets import load_dataset  # noqa: E402
from trainables.data.normalization import HALF  # noqa: E402
from trainables.training.split_run import build_model  # noqa: E402


def main() -> None:
    parser = base_parser(__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--model", default="resnet18")
    parser.add_argument("--size", type=int, default=28)
    args = parser.parse_args()
    print(machine_line())
    data = load_dataset("pneumoniamnist", image_size=args.size, data_root=args.data_root)
    torch.manual_seed(0)
    model = build_model(resolve_config({"model": args.model, "stem": "imagenet"}), data).eval()
    decision = {"temperature": 1.0, "threshold": 0.5}
    seconds, cpu = [], []
    for _ in range(args.repeats):
        started = time.process_time()
        report = robustness_report(lambda images: logits_of(model, images, HALF)[0], data.test, data.task, decision)
        seconds.append(report["seconds"])
        cpu.append(time.process_time() - started)
        print(f"{report['seconds']:.1f} s wall, {cpu[-1]:.1f} s CPU", flush=True)
    print(f"robustness table, {args.model} (ImageNet stem) at {args.size} px, {len(data.test)} test images, "
          f"{torch.get_num_threads()} threads: wall {spread(seconds, 's', 1)}; CPU {spread(cpu, 's', 1)}")


if __name__ == "__main__":
    main()

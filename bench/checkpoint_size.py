"""Checkpoint bytes on disk per trial, after a real search: finished trials and ASHA-stopped ones apart.

    python bench/checkpoint_size.py --data-root <medmnist folder> [--repo <another checkout>]

Runs the shipped `smoke` space (ResNet-18, PneumoniaMNIST 28 px, 3 epochs, ASHA) with the tune.py of `--repo`
(default: this checkout), so two commits are compared with the same command, then sums each trial folder's
`checkpoint_*` directories. Sizes are deterministic for a given model: one run per commit is enough.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import base_parser, machine_line  # noqa: E402


def trial_sizes(results: Path, max_t: int) -> dict[str, list[float]]:
    """{"finished": [MB, ...], "stopped": [...]} from the trial folders Ray left under `results`."""
    sizes: dict[str, list[float]] = {"finished": [], "stopped": []}
    for trial in sorted(results.glob("trial_*")):
        lines = (trial / "result.json").read_text().strip().splitlines()
        epochs = json.loads(lines[-1])["training_iteration"] if lines else 0
        size = sum(f.stat().st_size for d in trial.glob("checkpoint_*") for f in d.rglob("*") if f.is_file())
        sizes["finished" if epochs >= max_t else "stopped"].append(size / 1e6)
    return sizes


def main() -> int:
    parser = base_parser(__doc__.splitlines()[0])
    parser.add_argument("--repo", default=str(Path(__file__).resolve().parents[1]), help="checkout whose tune.py runs")
    parser.add_argument("--num-samples", type=int, default=4)
    args = parser.parse_args()
    print(machine_line(), f"| tune.py of {args.repo}")
    workdir = Path(tempfile.mkdtemp(prefix="medtune-ckpt-"))
    subprocess.run([sys.executable, str(Path(args.repo) / "tune.py"), "--space", "smoke", "--num-samples",
                    str(args.num_samples), "--storage", str(workdir / "results"), "--data-root", args.data_root,
                    "--tracking-uri", f"sqlite:///{workdir / 'mlflow.db'}", "--name", "ckpt",
                    *(["--gpus-per-trial", "0.5", "--set", "device=cuda"] if args.device == "cuda" else [])],
                   cwd=workdir, check=True, stdout=subprocess.DEVNULL)
    sizes = trial_sizes(workdir / "results" / "ckpt", max_t=3)
    for kind, values in sizes.items():
        if values:
            print(f"{kind}: {len(values)} trials, median {statistics.median(values):.1f} MB per trial "
                  f"(range {min(values):.1f}-{max(values):.1f})")
    everything = [v for values in sizes.values() for v in values]
    print(f"checkpoint MB per finished trial = {statistics.median(sizes['finished']):.1f}" if sizes["finished"]
          else f"no finished trial; median over all {statistics.median(everything):.1f} MB")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Trials per hour on a real local Ray cluster with two nodes vs one node (same resources per node).

    python bench/cluster_scaling.py [--trials 6] [--epochs 2] [--cpus-per-node 1] [--repeats 5] [--data-root DIR]
                                    [--device cuda]

Each run starts its own cluster with tests/local_cluster.py (`ray start --head` + `ray start --address`, token
auth on, every node `--num-cpus=N`), then runs tune.py against it with --address, storage on a shared
directory and MLflow in a local SQLite file: the same path a real cluster takes. The search is a fixed
config (simple_cnn on PneumoniaMNIST 28 px) repeated --trials times with ASHA's grace period = max_t, so
every trial trains the same epochs and only the number of nodes changes.

Trials per hour = trials / search time, the search time running from the first trial's start line to the
last trial's end line that tune.py prints (the driver's data loading and Ray start-up are reported apart).
On a 2-core machine, two 1-CPU nodes vs one 1-CPU node is the honest comparison; the driver (Tune loop,
MLflow callback) shares those cores too. One-node and two-node runs alternate (--repeats each); the median ratio
and its range are on the last line. With --device cuda every node offers its GPUs and each trial asks for one.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(REPO))

from local_cluster import LocalCluster  # noqa: E402

from bench.common import base_parser, interleaved, machine_line, spread  # noqa: E402

SPACE = """\
description: cluster scaling benchmark - one fixed config repeated, no early stopping
dataset: pneumoniamnist
num_samples: {trials}
max_concurrent: {concurrent}
max_failures: 0
scheduler: {{max_t: {epochs}, grace_period: {epochs}, reduction_factor: 2}}
resources: {{cpu: {cpus}, gpu: {gpus}}}
fixed: {{model: simple_cnn, image_size: 28, batch_size: 256, optimizer: sgd, lr: 0.1, schedule: constant, device: {device}}}
"""
START = re.compile(r"^\[(\w+)\] start\b")
END = re.compile(r"^\[(\w+)\] (completed|stopped early by ASHA|FAILED)")


def run(nodes: int, args, work: Path) -> dict:
    """Start a `nodes`-node cluster, run the search on it, return its timings."""
    space = work / f"scaling_{nodes}.yaml"
    space.write_text(SPACE.format(trials=args.trials, concurrent=max(2, nodes), epochs=args.epochs,
                                  cpus=args.cpus_per_node, gpus=1 if args.device == "cuda" else 0,
                                  device=args.device))
    began = time.monotonic()
    with LocalCluster(nodes=nodes, cpus_per_node=args.cpus_per_node, log_dir=work / f"ray-logs-{nodes}",
                      gpus_per_node=1 if args.device == "cuda" else 0) as cluster:
        cluster_up = time.monotonic() - began
        command = [sys.executable, str(REPO / "tune.py"), "--space", str(space), "--name", f"scaling-{nodes}",
                   "--address", cluster.address, "--storage", str(work / "shared"),
                   "--tracking-uri", f"sqlite:///{work / 'mlflow.db'}", "--seed", "0"]
        if args.data_root:
            command += ["--data-root", args.data_root]
        driver_began = time.monotonic()
        first_start = last_end = None
        started, ended, output = set(), set(), []
        with subprocess.Popen(command, cwd=work, env=cluster.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True) as driver:
            for line in driver.stdout:
                now = time.monotonic()
                output.append(line)
                if START.match(line):
                    started.add(START.match(line).group(1))
                    first_start = first_start or now
                elif END.match(line):
                    ended.add(END.match(line).group(1))
                    last_end = now
        driver_seconds = time.monotonic() - driver_began
    if driver.returncode != 0 or len(ended) != args.trials:
        raise SystemExit(f"{nodes}-node search failed (exit {driver.returncode}):\n{''.join(output)[-3000:]}")
    search = last_end - first_start
    return {"nodes": nodes, "cluster_up_s": cluster_up, "driver_s": driver_seconds, "search_s": search,
            "before_first_trial_s": first_start - driver_began, "trials_per_hour": args.trials / search * 3600}


def main() -> None:
    parser = base_parser(__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=6, help="trials per search (default 6)")
    parser.add_argument("--epochs", type=int, default=2, help="epochs per trial (default 2)")
    parser.add_argument("--cpus-per-node", type=int, default=1, help="CPUs of each node = CPUs per trial (default 1)")
    parser.add_argument("--repeats", type=int, default=5, help="runs of each cluster size, alternating")
    args = parser.parse_args()
    print(machine_line(), f"| {args.trials} trials x {args.epochs} epochs, simple_cnn on PneumoniaMNIST 28 px, "
          f"{args.cpus_per_node} CPU per node and per trial, {args.device}, {args.repeats} interleaved repeats")
    results: dict[int, list[dict]] = {1: [], 2: []}
    with tempfile.TemporaryDirectory(prefix="medtune-scaling-") as tmp:
        def once(nodes: int) -> float:
            work = Path(tmp) / f"run-{nodes}-{len(results[nodes])}"
            work.mkdir()
            results[nodes].append(run(nodes, args, work))
            return results[nodes][-1]["trials_per_hour"]

        rates = interleaved({"1 node": lambda: once(1), "2 nodes": lambda: once(2)}, args.repeats)
    for nodes, runs in results.items():
        for key in ("cluster_up_s", "before_first_trial_s", "search_s"):
            print(f"{nodes} node(s), {key}: {spread([r[key] for r in runs], 's', digits=1)}")
        print(f"{nodes} node(s): {spread([r['trials_per_hour'] for r in runs], 'trials/h')}")
    print(f"load average {os.getloadavg()[0]:.1f} at end")
    ratios = [two / one for one, two in zip(rates["1 node"], rates["2 nodes"])]
    print(f"two nodes vs one: trials per hour ratio {spread(ratios, digits=2)}")


if __name__ == "__main__":
    main()

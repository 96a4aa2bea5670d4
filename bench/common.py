"""What every benchmark shares: the first line it prints (machine, date, commit, load), interleaved repeats and
their median and range, and the tune.py run the search benchmarks time."""

from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
import yaml

REPO = Path(__file__).resolve().parents[1]


def base_parser(description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--data-root", default=os.environ.get("MEDTUNE_DATA_ROOT"), help="MedMNIST folder")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"), help="take the figures on a GPU too")
    return parser


def machine_line() -> str:
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout.strip()
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO, capture_output=True,
                           text=True).stdout.strip()
    load = ", ".join(f"{value:.2f}" for value in os.getloadavg())
    return (f"# {dt.date.today()} commit {commit or '?'}{' + uncommitted changes' if dirty else ''} | "
            f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, {gpu} | torch {torch.__version__} | "
            f"load average at start {load}")


def interleaved(runs: dict[str, Callable[[], float]], repeats: int) -> dict[str, list[float]]:
    """Each run `repeats` times in turn (A, B, A, B, ...), so a drift in the machine's speed hits every side alike."""
    results: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(repeats):
        for name, run in runs.items():
            results[name].append(run())
    return results


def spread(values: list[float], unit: str = "", digits: int = 0) -> str:
    """'median X (range lo-hi) unit' - how every repeated figure is printed."""
    f = f"{{:,.{digits}f}}"
    return (f"median {f.format(statistics.median(values))} (range {f.format(min(values))}-{f.format(max(values))})"
            f"{' ' + unit if unit else ''}")


def run_tune(space: dict, *args: str, workdir: Path | None = None) -> tuple[float, Path]:
    """Run tune.py on `space` in a scratch folder; returns (wall seconds, the folder)."""
    workdir = workdir or Path(tempfile.mkdtemp(prefix="medtune-bench-"))
    path = workdir / "bench_space.yaml"
    path.write_text(yaml.safe_dump(space, sort_keys=False))
    started = time.perf_counter()
    subprocess.run([sys.executable, str(REPO / "tune.py"), "--space", str(path), "--storage", str(workdir / "results"),
                    "--tracking-uri", f"sqlite:///{workdir / 'mlflow.db'}", "--name", "bench", *args],
                   cwd=workdir, check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - started, workdir

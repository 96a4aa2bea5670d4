"""What every benchmark prints first (machine, date, commit) and the one-trial search it shares."""

from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import subprocess
import sys
import tempfile
import time
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
    return (f"# {dt.date.today()} commit {commit or '?'} | {platform.processor() or platform.machine()}, "
            f"{os.cpu_count()} CPUs, {gpu} | torch {torch.__version__}")


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

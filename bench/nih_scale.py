"""NIH scale: the data path of a search on a generated NIH ChestX-ray14 (bench/nih_fixture.py) at 224 px.

    python bench/nih_fixture.py --out /data/nih_synthetic                          # once: 112,120 PNGs at 256 px
    python bench/nih_scale.py --data /data/nih_synthetic --cache-dir /data/cache --workdir /tmp/nih-run
    python bench/nih_scale.py --data /data/nih_synthetic --csv Data_Entry_30k.csv ...   # the first 30,000 rows

Measures, in this order:
1. the cache build: images decoded at 224 px per second, in all and per core (with tqdm's bar: rate and ETA), and
   decoding alone on one core (the bound a build is measured against); skipped when the cache exists;
2. what every trial pays to open the dataset by path (table, file listing, the cache found), the train/validation
   split and the leak report, on the driver as tune.py makes them;
3. a model's own need: the peak anonymous memory of a bare PyTorch process training the same model on random
   batches of the same shape, then scoring batches of the same size without autograd, as a trial evaluates (nothing
   of medtune);
4. a search through tune.py: `--trials` trials of `--model`, 1 epoch, all in parallel (1 CPU each): the peak
   anonymous memory (RssAnon; USS beside it) of the driver and of each trial, sampled from /proc every 2 seconds,
   the time from tune.py's start to the first trial's first batch (bench/first_batch/sitecustomize.py, on
   PYTHONPATH for this run only, notes when a trial's first epoch asks for its first batch), each trial's epoch time.
Targets (issue 25): driver < 2 GB, each trial < the model's need + 1 GB, first batch < 2 min once the cache exists.
Memory is read from /proc (Linux): RssAnon is anonymous memory only; the memory-mapped cache is file pages, shared
by every process of the node, and is not counted. USS also counts file pages mapped by one process alone.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import yaml  # noqa: E402

from bench.common import REPO, machine_line  # noqa: E402

GB = 1024 ** 3
TRIAL_TITLE = "ray::ImplicitFunc"  # Ray's process title for a function trainable's trial


def proc_memory(pid: int) -> dict[str, int]:
    """{"anon": RssAnon, "uss": Private_Clean + Private_Dirty} in bytes; {} when the process is gone."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
        rollup = Path(f"/proc/{pid}/smaps_rollup").read_text()
    except OSError:
        return {}

    def field(text: str, name: str) -> int:
        line = next((line for line in text.splitlines() if line.startswith(name + ":")), f"{name}: 0 kB")
        return int(line.split()[1]) * 1024

    return {"anon": field(status, "RssAnon"),
            "uss": field(rollup, "Private_Clean") + field(rollup, "Private_Dirty")}


def descendants(root: int) -> dict[int, str]:
    """{pid: command line} of every process below `root` (Ray's raylet and its workers are children of tune.py)."""
    parent, command = {}, {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            parent[int(entry.name)] = int(stat.rsplit(")", 1)[1].split()[1])
            command[int(entry.name)] = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
    found, frontier = {}, [root]
    while frontier:
        pid = frontier.pop()
        for child, ppid in parent.items():
            if ppid == pid and child not in found:
                found[child] = command.get(child, "")
                frontier.append(child)
    return found


class PeakMemory:
    """Samples the driver and every trial process each `interval` seconds in a thread; keeps each one's peak."""

    def __init__(self, driver: int, interval: float = 2.0):
        self.driver, self.interval, self.peaks = driver, interval, {}
        self.titles: dict[int, str] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.is_set():
            watched = {self.driver: "driver"}
            watched |= {pid: "trial" for pid, cmd in descendants(self.driver).items() if cmd.startswith(TRIAL_TITLE)}
            for pid, role in watched.items():
                memory = proc_memory(pid)
                if memory:
                    self.titles[pid] = role
                    peak = self.peaks.setdefault(pid, {"anon": 0, "uss": 0})
                    for key, value in memory.items():
                        peak[key] = max(peak[key], value)
            self._stop.wait(self.interval)


def build_cache(spec: str, size: int) -> dict:
    """Load the dataset (building its cache when absent), then time decoding alone on one core."""
    from trainables.data import image_cache
    from trainables.data.datasets import load_dataset

    started = time.perf_counter()
    dataset = load_dataset.__wrapped__(spec, image_size=size)
    seconds = time.perf_counter() - started
    files = dataset.dev_files[:400]
    one_core = time.perf_counter()
    for file in files:
        image_cache.decode_image(file, size, "L")
    per_core = len(files) / (time.perf_counter() - one_core)
    threads = min(8, os.cpu_count() or 1)  # image_cache._build's pool
    return {"images": len(dataset.dev) + len(dataset.test), "decoded": dataset.decoded_images, "seconds": seconds,
            "threads": threads, "decode_one_core": per_core, "cache_file": dataset.cache_file,
            "cache_bytes": os.path.getsize(dataset.cache_file)}


def driver_steps(spec: str, size: int) -> dict:
    """What tune.py's driver does before Ray starts, once the cache exists: open, split, leak report; and its memory."""
    from trainables.data.datasets import load_dataset
    from trainables.data.leaks import leak_report
    from trainables.data.splits import train_val_indices

    timings = {}
    started = time.perf_counter()
    dataset = load_dataset.__wrapped__(spec, image_size=size)
    timings["open_seconds"] = time.perf_counter() - started
    started = time.perf_counter()
    train_idx, val_idx = train_val_indices(dataset, None, 0)
    timings["split_seconds"] = time.perf_counter() - started
    started = time.perf_counter()
    report = leak_report(dataset, train_idx, val_idx)
    timings["leak_seconds"] = time.perf_counter() - started
    timings["sizes"] = report["leak_detail"]["sizes"]
    timings["leaks"] = {k: v for k, v in report.items() if k.startswith("leak_group")}
    timings["anon_after"] = proc_memory(os.getpid())["anon"]
    return timings


MODEL_NEED = """
import resource, sys, torch
sys.path.insert(0, {repo!r})
from trainables.models import create_model
torch.set_num_threads(1)
model = create_model({model!r}, num_classes=14, in_chans=1, img_size={size})
optimizer = torch.optim.Adam(model.parameters())
for _ in range(5):
    images = torch.randint(0, 256, ({batch}, 1, {size}, {size}), dtype=torch.uint8).float() / 255
    loss = torch.nn.functional.binary_cross_entropy_with_logits(model(images), torch.zeros({batch}, 14))
    optimizer.zero_grad(); loss.backward(); optimizer.step()
model.eval()
with torch.no_grad():  # a trial scores validation and test in batches of its own batch size (SplitRun.eval_batch)
    for _ in range(2 if {evaluate} else 0):
        model(torch.randint(0, 256, ({batch}, 1, {size}, {size}), dtype=torch.uint8).float() / 255)
"""


def model_need(model: str, size: int, batch: int, evaluate: bool) -> int:
    """Peak anonymous memory (sampled every 0.2 s) of a bare PyTorch process that does what a trial's model does:
    training steps at `batch`, then (`evaluate`) forward passes without autograd at the same batch, as a trial scores."""
    peak = {"anon": 0}
    script = MODEL_NEED.format(repo=str(REPO), model=model, size=size, batch=batch, evaluate=evaluate)
    process = subprocess.Popen([sys.executable, "-c", script])
    while process.poll() is None:
        peak["anon"] = max(peak["anon"], proc_memory(process.pid).get("anon", 0))
        time.sleep(0.2)
    return peak["anon"]


def run_search(spec: str, size: int, args) -> dict:
    """tune.py with `--trials` trials of 1 epoch at once; peak memory of the driver and each trial, first batch."""
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    space = {"description": "NIH scale benchmark", "dataset": spec, "metric": "val_auc", "num_samples": args.trials,
             "max_concurrent": args.trials, "scheduler": {"kind": "fifo", "max_t": 1},
             "resources": {"cpu": 1, "gpu": 0},
             "fixed": {"model": args.model, "image_size": size, "batch_size": args.batch_size},
             "params": {"lr": {"loguniform": [1.0e-4, 1.0e-2]}},
             **({"time_budget": args.time_budget} if args.time_budget else {})}
    (workdir / "space.yaml").write_text(yaml.safe_dump(space, sort_keys=False))
    name = f"nih-scale-{int(time.time())}"
    command = [sys.executable, str(REPO / "tune.py"), "--space", str(workdir / "space.yaml"), "--storage",
               str(workdir / "results"), "--tracking-uri", f"sqlite:///{workdir / 'mlflow.db'}", "--name", name,
               "--no-report"]
    print("$ " + " ".join(command), flush=True)
    marks = workdir / f"{name}-first-batch"
    marks.mkdir()
    env = {**os.environ, "MEDTUNE_BENCH_FIRST_BATCH": str(marks),
           "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO / "bench" / "first_batch"), str(REPO),
                                                       os.environ.get("PYTHONPATH")]))}
    started = time.time()
    process = subprocess.Popen(command, cwd=workdir, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               env=env)
    with PeakMemory(process.pid) as memory:
        for line in process.stdout:
            print(f"  [{time.time() - started:6.0f}s] {line.rstrip()}", flush=True)
        process.wait()
    wall = time.time() - started
    first_results = []
    for result_file in sorted((workdir / "results" / name).glob("trial_*/result.json")):
        lines = result_file.read_text().splitlines()
        if not lines:  # cut by --time-budget before its first epoch ended
            continue
        first = json.loads(lines[0])
        first_results.append({"epoch_seconds": first["epoch_seconds"], "train_images": first.get("train_images")})
    first_batches = sorted(float(mark.read_text()) - started for mark in marks.iterdir())
    return {"returncode": process.returncode, "wall": wall, "trials": first_results, "first_batches": first_batches,
            "driver": memory.peaks.get(process.pid, {}),
            "trial_peaks": [peak for pid, peak in memory.peaks.items() if memory.titles.get(pid) == "trial"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True, help="the generated release (bench/nih_fixture.py)")
    parser.add_argument("--csv", help="label table in --data to read instead of Data_Entry_2017_v2020.csv (a cut)")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--cache-dir", type=Path, required=True, help="image cache ($MEDTUNE_CACHE_DIR) for the run")
    parser.add_argument("--workdir", required=True, help="scratch folder for the search's storage and MLflow")
    parser.add_argument("--model", default="simple_cnn")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--trials", type=int, default=2)
    parser.add_argument("--time-budget", type=float,
                        help="seconds: end the search then (trials cut mid-epoch: memory and first batch are measured, "
                             "the epoch is not, and the model's need is measured without the evaluation pass)")
    args = parser.parse_args()
    if not (args.data / (args.csv or "Data_Entry_2017_v2020.csv")).is_file():
        raise SystemExit(f"error: no {args.csv or 'Data_Entry_2017_v2020.csv'} in {args.data}; "
                         "write the data with bench/nih_fixture.py first")
    os.environ["MEDTUNE_CACHE_DIR"] = str(args.cache_dir)  # tune.py and its trials inherit it
    spec = f"nih_chestxray14:{args.data.resolve()}" + (f"?csv={args.csv}" if args.csv else "")
    size = args.image_size
    print(machine_line() + f" | {spec} at {size} px, {args.trials} x {args.model} batch {args.batch_size}", flush=True)

    build = build_cache(spec, size)
    if build["decoded"]:
        print(f"cache build: {build['decoded']:,} images in {build['seconds']:.0f} s = "
              f"{build['decoded'] / build['seconds']:,.0f} img/s with {build['threads']} threads on {os.cpu_count()} "
              f"cores ({build['decoded'] / build['seconds'] / (os.cpu_count() or 1):,.0f} img/s per core); decoding "
              f"alone on one core {build['decode_one_core']:,.0f} img/s; cache {build['cache_bytes'] / GB:.2f} GiB",
              flush=True)
    else:
        print(f"cache found ({build['images']:,} images, {build['cache_bytes'] / GB:.2f} GiB): build not measured; "
              f"decoding alone on one core {build['decode_one_core']:,.0f} img/s", flush=True)
    steps = driver_steps(spec, size)
    print(f"driver: open by path {steps['open_seconds']:.1f} s, split {steps['split_seconds']:.1f} s, leak report "
          f"{steps['leak_seconds']:.1f} s ({steps['sizes']}, {steps['leaks']}); RssAnon after "
          f"{steps['anon_after'] / GB:.2f} GiB", flush=True)
    need = model_need(args.model, size, args.batch_size, evaluate=not args.time_budget)
    scored = "no evaluation (cut before it)" if args.time_budget else f"eval batch {args.batch_size}"
    print(f"model need: {args.model} at {size} px, train batch {args.batch_size}, {scored}, bare PyTorch: RssAnon "
          f"{need / GB:.2f} GiB", flush=True)

    search = run_search(spec, size, args)
    driver, trials = search["driver"], search["trial_peaks"]
    first = min(search["first_batches"], default=float("nan"))
    print(f"search: exit {search['returncode']}, {search['wall']:.0f} s; epochs "
          + ", ".join(f"{t['epoch_seconds']:.0f} s ({t['train_images']:,} train images)" for t in search["trials"])
          + "; first batches at " + ", ".join(f"{s:.0f} s" for s in search["first_batches"]) + " after tune.py started")
    print(f"driver peak: RssAnon {driver.get('anon', 0) / GB:.2f} GiB, USS {driver.get('uss', 0) / GB:.2f} GiB "
          f"(target < 2 GiB)")
    for number, peak in enumerate(trials, 1):
        print(f"trial {number} peak: RssAnon {peak['anon'] / GB:.2f} GiB, USS {peak['uss'] / GB:.2f} GiB "
              f"(target < model need + 1 = {need / GB + 1:.2f} GiB)")
    worst = max((p["anon"] for p in trials), default=0)
    print(f"headline: driver {driver.get('anon', 0) / GB:.2f} GiB, worst trial {worst / GB:.2f} GiB "
          f"(need {need / GB:.2f}), first batch {first:.0f} s after tune.py started, "
          f"{'met' if driver.get('anon', 0) < 2 * GB and worst < need + GB and first < 120 else 'missed'}")


if __name__ == "__main__":
    main()

"""Platform overhead: one trial inside tune.py (Ray Tune + MLflow + checkpoints) vs a bare PyTorch loop on the same
model, data, batch size, threads, precision and memory format. Target: steady-state ratio >= 0.95.

One counting rule on both sides: images actually trained (whole batches: both drop the last partial batch).
Two figures, each a ratio medtune/bare of images per second:
- steady state: the epochs between the first and the last (epochs 2 .. N-1), clocked from the end of epoch 1 to the
  end of epoch N-1: training, validation, and on medtune's side the report, the checkpoint and MLflow logging.
  The first epoch (warm-up) and the last (test scoring, figures) are outside this clock on both sides.
- end to end: the whole command, from starting the process to its exit (Python start, imports, data loading; on
  medtune's side also Ray's start-up, the actor, the object store, MLflow), over all N epochs' trained images.
  Both sides score the test split once at the end.
Repeats are interleaved (bare, medtune, bare, ...); each figure is the median with its range.

    python bench/platform_overhead.py --data-root <medmnist folder> [--repeats 5 --epochs 4 --device cuda]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import mlflow  # noqa: E402
import torch  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402

from bench.common import base_parser, interleaved, machine_line, run_tune, spread  # noqa: E402
from trainables.data.datasets import load_dataset  # noqa: E402
from trainables.data.splits import train_val_indices  # noqa: E402
from trainables.models import create_model  # noqa: E402
from trainables.training.split_run import ArrayDataset, eval_loader, pick_device, use_bf16  # noqa: E402


def bare_loop(args) -> dict:
    """The textbook PyTorch loop (train, then validation under inference_mode, each epoch; test once at the end),
    with the trial's bf16 autocast and channels_last where the trial would use them (CUDA)."""
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    data = load_dataset(args.dataset, image_size=args.image_size, data_root=args.data_root)
    train_idx, val_idx = train_val_indices(data, None, 0)
    train = DataLoader(ArrayDataset(data.dev.subset(train_idx)), batch_size=args.batch_size, shuffle=True, drop_last=True)
    device = pick_device(args.device)
    val, test = eval_loader(data.dev.subset(val_idx), 512, device), eval_loader(data.test, 512, device)
    amp = use_bf16("auto", device)
    model = create_model(args.model, num_classes=data.num_classes, in_chans=data.channels, img_size=args.image_size).to(device)
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    criterion = torch.nn.CrossEntropyLoss()
    epoch_ends = []
    for _ in range(args.epochs):
        model.train()
        for images, labels in train:
            optimizer.zero_grad()
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
                loss = criterion(model(images.to(device)), labels.to(device))
            loss.backward()
            optimizer.step()
        model.eval()
        with torch.inference_mode(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            for images, _ in val:
                model(images.to(device))
        if device.type == "cuda":
            torch.cuda.synchronize()
        epoch_ends.append(time.time())
    with torch.inference_mode(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
        for images, _ in test:
            model(images.to(device))
    return {"epoch_ends": epoch_ends, "images_per_epoch": len(train) * args.batch_size}


def rates(images_per_epoch: int, epoch_ends: list[float], wall: float, epochs: int) -> dict[str, float]:
    """The two figures from one run, by the one counting rule."""
    steady = (len(epoch_ends) - 2) * images_per_epoch / (epoch_ends[-2] - epoch_ends[0])
    return {"steady": steady, "end_to_end": epochs * images_per_epoch / wall}


def bare_run(args) -> dict[str, float]:
    """The bare loop in its own process, so its end-to-end clock covers what tune.py's does (start to exit)."""
    started = time.perf_counter()
    command = [sys.executable, __file__, "--bare-once", "--data-root", args.data_root, "--dataset", args.dataset,
               "--model", args.model, "--image-size", str(args.image_size), "--batch-size", str(args.batch_size),
               "--epochs", str(args.epochs), "--threads", str(args.threads), "--device", args.device]
    out = subprocess.run(command, check=True, capture_output=True, text=True).stdout
    wall = time.perf_counter() - started
    result = json.loads(out.strip().splitlines()[-1])
    return rates(result["images_per_epoch"], result["epoch_ends"], wall, args.epochs)


def medtune_run(args) -> dict[str, float]:
    """The same trial through tune.py; its epochs' ends are the driver's MLflow timestamps of each epoch's report
    (after the checkpoint is written), the end-to-end clock the whole tune.py command."""
    space = {"description": "overhead benchmark", "dataset": args.dataset, "num_samples": 1, "max_concurrent": 1,
             "scheduler": {"max_t": args.epochs, "grace_period": args.epochs},
             "resources": {"cpu": args.threads, "gpu": 1 if args.device == "cuda" else 0},
             "fixed": {"model": args.model, "image_size": args.image_size, "batch_size": args.batch_size,
                       "optimizer": "adam", "lr": 1e-3, "schedule": "constant", "device": args.device,
                       "stem": "imagenet"}}  # the stem BENCHMARKS.md's figures were measured with
    wall, workdir = run_tune(space, "--data-root", args.data_root)
    client = mlflow.MlflowClient(f"sqlite:///{workdir / 'mlflow.db'}")
    run = next(r for r in client.search_runs([e.experiment_id for e in client.search_experiments()])
               if r.data.tags.get("medtune.role") == "trial")
    history = sorted(client.get_metric_history(run.info.run_id, "epoch"), key=lambda m: m.step)
    images_per_epoch = int(run.data.metrics["train_images"]) // args.batch_size * args.batch_size  # drop_last
    return rates(images_per_epoch, [m.timestamp / 1000 for m in history], wall, args.epochs)


def main() -> None:
    parser = base_parser(__doc__.splitlines()[0])
    parser.add_argument("--dataset", default="pneumoniamnist")
    parser.add_argument("--model", default="resnet18")
    parser.add_argument("--image-size", type=int, default=28)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--epochs", type=int, default=4, help=">= 3: the steady-state clock needs epochs 2 .. N-1")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads of both runs (Ray: cpus per trial)")
    parser.add_argument("--repeats", type=int, default=5, help="interleaved runs of each side")
    parser.add_argument("--bare-once", action="store_true", help=argparse.SUPPRESS)  # internal: one bare run, as JSON
    args = parser.parse_args()
    if args.epochs < 3:
        parser.error("--epochs must be at least 3 (the steady-state clock runs from the end of epoch 1 to N-1)")
    if args.bare_once:
        print(json.dumps(bare_loop(args)))
        return
    print(machine_line(), f"| {args.model}, {args.dataset} {args.image_size} px, batch {args.batch_size}, "
          f"{args.epochs} epochs, {args.threads} thread(s), {args.device}, {args.repeats} interleaved repeats")
    runs = interleaved({"bare": lambda: bare_run(args), "medtune": lambda: medtune_run(args)}, args.repeats)
    ratios = {}
    for figure in ("steady", "end_to_end"):
        bare = [r[figure] for r in runs["bare"]]
        ours = [r[figure] for r in runs["medtune"]]
        ratios[figure] = [o / b for o, b in zip(ours, bare)]  # pairwise: each medtune run over the bare run before it
        print(f"{figure}: bare PyTorch loop {spread(bare, 'img/s')}; medtune trial {spread(ours, 'img/s')}; "
              f"ratio medtune/bare {spread(ratios[figure], digits=3)}")
    print(f"ratio medtune/bare, end to end = {spread(ratios['end_to_end'], digits=3)}")
    print(f"ratio medtune/bare, steady state = {spread(ratios['steady'], digits=3)}")


if __name__ == "__main__":
    main()

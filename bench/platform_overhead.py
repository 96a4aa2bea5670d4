"""Platform overhead: images/s of one trial inside Ray Tune + MLflow + checkpointing vs a bare PyTorch loop
on the same model, data, batch size and threads. Target: ratio >= 0.95.

    python bench/platform_overhead.py --data-root <medmnist folder> [--model resnet18 --epochs 3 --device cuda]
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import mlflow  # noqa: E402
import torch  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402

from bench.common import base_parser, machine_line, run_tune  # noqa: E402
from trainables.datasets import load_dataset  # noqa: E402
from trainables.models import create_model  # noqa: E402
from trainables.splits import train_val_indices  # noqa: E402
from trainables.train import ArrayDataset  # noqa: E402


def bare_loop(args) -> float:
    """The textbook PyTorch loop: train, then score validation without autograd, each epoch. Returns img/s."""
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    data = load_dataset(args.dataset, image_size=args.image_size, data_root=args.data_root)
    train_idx, val_idx = train_val_indices(data, None, 0)
    train = DataLoader(ArrayDataset(data.dev.subset(train_idx)), batch_size=args.batch_size, shuffle=True, drop_last=True)
    val = DataLoader(ArrayDataset(data.dev.subset(val_idx)), batch_size=512)
    device = torch.device(args.device)
    model = create_model(args.model, num_classes=data.num_classes, in_chans=data.channels, img_size=args.image_size).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    criterion = torch.nn.CrossEntropyLoss()
    started = time.perf_counter()
    for _ in range(args.epochs):
        model.train()
        for images, labels in train:
            optimizer.zero_grad()
            criterion(model(images.to(device)), labels.to(device)).backward()
            optimizer.step()
        model.eval()
        with torch.inference_mode():
            for images, _ in val:
                model(images.to(device))
    return args.epochs * len(train) * args.batch_size / (time.perf_counter() - started)


def medtune_trial(args) -> float:
    """The same trial through tune.py: Ray Tune, a checkpoint per epoch, MLflow on the driver. Returns img/s
    over the trial's whole wall time as MLflow saw it (start to end of its run)."""
    space = {"description": "overhead benchmark", "dataset": args.dataset, "num_samples": 1, "max_concurrent": 1,
             "scheduler": {"max_t": args.epochs, "grace_period": args.epochs},
             "resources": {"cpu": args.threads, "gpu": 1 if args.device == "cuda" else 0},
             "fixed": {"model": args.model, "image_size": args.image_size, "batch_size": args.batch_size,
                       "optimizer": "adam", "lr": 1e-3, "schedule": "constant", "device": args.device}}
    _, workdir = run_tune(space, "--data-root", args.data_root)
    client = mlflow.MlflowClient(f"sqlite:///{workdir / 'mlflow.db'}")
    run = next(r for r in client.search_runs([e.experiment_id for e in client.search_experiments()])
               if r.data.tags.get("medtune.role") == "trial")
    seconds = (run.info.end_time - run.info.start_time) / 1000
    return args.epochs * run.data.metrics["train_images"] // args.batch_size * args.batch_size / seconds


def main() -> None:
    parser = base_parser(__doc__.splitlines()[0])
    parser.add_argument("--dataset", default="pneumoniamnist")
    parser.add_argument("--model", default="resnet18")
    parser.add_argument("--image-size", type=int, default=28)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="CPU threads of both runs (Ray: cpus per trial)")
    args = parser.parse_args()
    print(machine_line())
    bare = bare_loop(args)
    ours = medtune_trial(args)
    print(f"bare PyTorch loop: {bare:.0f} img/s; medtune trial (Ray Tune + MLflow + checkpoints): {ours:.0f} img/s")
    print(f"ratio medtune/bare = {ours / bare:.3f}")


if __name__ == "__main__":
    main()

"""Augmentation throughput: images/s delivered to the model, augmentation and normalisation included, by the
per-sample CPU path (torchvision v2 in ArrayDataset + DataLoader, 0 workers) vs the batched path (Kornia on whole
batches, trainables/augment/batched.py), both on 1 thread. Target at 28 px on one CPU core: batched >= 10x the
per-sample path and >= 20k images/s.

    python bench/augment.py [--data-root $MEDTUNE_DATA_ROOT] [--device cuda] [--repeats 5]

Workloads: flip+rotation+jitter on every image; the minority-copy transforms (every delivered row a copy).
Images: PneumoniaMNIST's training images (resized once for 224 px), or noise without --data-root.
Repeats are interleaved (per-sample, batched, per-sample, ...); the last line is the 28 px flip+rotation+jitter ratio.
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch.utils.data import BatchSampler, DataLoader, RandomSampler, SubsetRandomSampler  # noqa: E402

from bench.common import base_parser, interleaved, machine_line, spread  # noqa: E402
from trainables.augment.batched import DeviceInputs, build_batch_augment  # noqa: E402
from trainables.augment.per_sample import build_minority_transform, build_train_transform  # noqa: E402
from trainables.config import DEFAULTS  # noqa: E402
from trainables.data.normalization import HALF  # noqa: E402
from trainables.data.registry import ImageSet  # noqa: E402
from trainables.training.split_run import ArrayDataset, BatchView, model_inputs  # noqa: E402

BATCH = 128
WORKLOADS = {"flip+rotation+jitter": dict(DEFAULTS, augment="hflip+rotation+jitter"),
             "minority copies": dict(DEFAULTS, augment="none", minority_aug_pct=100)}
# images per timed pass: enough for ~1 s of the slower path on one core
IMAGES = {("per-sample", 28): 1536, ("batched", 28): 16384, ("per-sample", 224): 256, ("batched", 224): 512}


def bench_images(data_root: str | None, size: int, count: int) -> ImageSet:
    """`count` uint8 (N, size, size, 1) training images: real ones when the data is there (why: jitter and
    blur cost the same on noise, but the figures should be of the images medtune trains on)."""
    path = Path(data_root or "") / "pneumoniamnist.npz"
    if data_root and path.exists():
        images = torch.from_numpy(np.load(path)["train_images"][:count]).unsqueeze(1)
    else:
        images = torch.randint(0, 256, (count, 1, 28, 28), dtype=torch.uint8)
    if size != images.shape[-1]:
        images = torch.nn.functional.interpolate(images.float(), size=(size, size), mode="bilinear").round().to(torch.uint8)
    return ImageSet(images.permute(0, 2, 3, 1).contiguous().numpy(), np.zeros(len(images), dtype=np.int64))


def dataset(images: ImageSet, config: dict, size: int, batched: bool) -> ArrayDataset:
    """Every row once, plus (minority workload) one copy of every row; only the copies are read then."""
    copies = np.arange(len(images)) if config["minority_aug_pct"] else None
    if batched:
        return ArrayDataset(images, None, copies, normalization=HALF)
    minority = build_minority_transform(config, size, 1) if copies is not None else None
    return ArrayDataset(images, build_train_transform(config, size, 1), copies, minority, normalization=HALF)


def rows(data: ArrayDataset) -> torch.utils.data.Sampler:
    """Shuffled rows to deliver: the copies only when there are any."""
    if len(data) > data.first_extra:
        return SubsetRandomSampler(range(data.first_extra, len(data)))
    return RandomSampler(data)


def per_sample_rate(data: ArrayDataset, device: torch.device) -> float:
    """Images/s of today's path: one torchvision call per image in the DataLoader."""
    loader = DataLoader(data, batch_size=BATCH, sampler=rows(data), num_workers=0)
    return _deliver(loader, device, None)


def batched_rate(data: ArrayDataset, config: dict, size: int, device: torch.device) -> float:
    """Images/s of the batched path: one index per batch, Kornia on `device`, normalised there."""
    loader = DataLoader(BatchView(data), batch_size=None, sampler=BatchSampler(rows(data), BATCH, drop_last=False))
    augment = build_batch_augment(config, size, 1, copies=len(data) > data.first_extra)
    return _deliver(loader, device, DeviceInputs(augment, HALF))


def _deliver(loader: DataLoader, device: torch.device, prepare) -> float:
    """Time one pass: every batch as the model would receive it on `device`."""
    started, seen = time.perf_counter(), 0
    for inputs, _ in loader:
        images = model_inputs(inputs, device, prepare)
        seen += len(images)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return seen / (time.perf_counter() - started)


def measure(data_root, size: int, name: str, device: torch.device, repeats: int) -> dict[str, list[float]]:
    """Interleaved repeats (per-sample, batched, per-sample, ...) after one untimed warm-up pass of each."""
    config = WORKLOADS[name]
    sample = dataset(bench_images(data_root, size, IMAGES[("per-sample", size)]), config, size, batched=False)
    batch = dataset(bench_images(data_root, size, IMAGES[("batched", size)]), config, size, batched=True)
    runs = {"per-sample": lambda: per_sample_rate(sample, device), "batched": lambda: batched_rate(batch, config, size, device)}
    for run in runs.values():
        run()
    return interleaved(runs, repeats)


def main() -> None:
    parser = base_parser(__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5, help="interleaved timed passes of each path")
    parser.add_argument("--sizes", type=int, nargs="+", default=[28, 224])
    args = parser.parse_args()
    torch.set_num_threads(1)
    device = torch.device(args.device)
    print(machine_line(), f"| {device}, 1 thread, batch {BATCH}, {args.repeats} interleaved repeats")
    ratios = {}
    for size in args.sizes:
        for name in WORKLOADS:
            rates = measure(args.data_root, size, name, device, args.repeats)
            ratios[(size, name)] = statistics.median(rates["batched"]) / statistics.median(rates["per-sample"])
            print(f"{size} px, {name}: per-sample {spread(rates['per-sample'], 'img/s')}; "
                  f"batched {spread(rates['batched'], 'img/s')}; batched/per-sample {ratios[(size, name)]:.1f}x", flush=True)
    key = (28, "flip+rotation+jitter") if (28, "flip+rotation+jitter") in ratios else next(iter(ratios))
    print(f"ratio batched/per-sample at {key[0]} px, {key[1]} = {ratios[key]:.1f}x")


if __name__ == "__main__":
    main()

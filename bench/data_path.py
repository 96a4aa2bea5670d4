"""Data path: one training epoch fed by the decode-once cache vs a per-image PIL ImageFolder DataLoader
(Kermany chest X-rays, 224 px JPEGs at 64 px, same model). Target: cache >= 5x faster.

Also prints the data path alone (images/s delivered, no model), which is what decides on a GPU, and the first
(untimed) pass of each path, which reads the files from disk when they are not in the OS page cache.

The PIL side is a careful user's loader: ImageFolder whose loader asks the JPEG decoder for a reduced grey image
(`Image.draft`), then resizes. Timed passes alternate (cache, PIL, cache, ...), --repeats each; medians and ranges.

    python bench/data_path.py --folder <kermany chest_xray folder> [--model resnet18 --repeats 5 --device cuda]
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from PIL import Image  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402
from torchvision import datasets as tv_datasets  # noqa: E402
from torchvision.transforms import v2  # noqa: E402

from bench.common import base_parser, interleaved, machine_line, spread  # noqa: E402
from trainables.data.datasets import load_dataset  # noqa: E402
from trainables.data.normalization import HALF  # noqa: E402
from trainables.models import create_model  # noqa: E402
from trainables.training.split_run import ArrayDataset  # noqa: E402


def draft_grey(size: int):
    """Open a JPEG decoding straight to grey at (about) `size` px: libjpeg's DCT scaling, not a full decode."""

    def load(path: str) -> Image.Image:
        with Image.open(path) as image:
            image.draft("L", (size, size))
            return image.convert("L")

    return load


def pil_loader(folder: Path, size: int, batch_size: int, workers: int) -> DataLoader:
    """What a careful notebook does: torchvision ImageFolder decoding and resizing every JPEG every epoch."""
    half = v2.Normalize(HALF.mean.flatten().tolist(), HALF.std.flatten().tolist())  # the trials' `half`
    transform = v2.Compose([v2.PILToTensor(), v2.Resize((size, size), antialias=True),
                            v2.ToDtype(torch.float32, scale=True), half])
    return DataLoader(tv_datasets.ImageFolder(folder / "train", transform=transform, loader=draft_grey(size)),
                      batch_size=batch_size, shuffle=True, num_workers=workers)


def cache_loader(folder: Path, size: int, batch_size: int, workers: int) -> DataLoader:
    data = load_dataset(f"imagefolder:{folder}", image_size=size)  # builds the cache on first use
    return DataLoader(ArrayDataset(data.dev), batch_size=batch_size, shuffle=True, num_workers=workers)


def epoch_seconds(loader: DataLoader, model, device) -> tuple[float, int]:
    optimizer = torch.optim.Adam(model.parameters()) if model is not None else None
    started, seen = time.perf_counter(), 0
    for images, labels in loader:
        if model is not None:
            optimizer.zero_grad()
            torch.nn.functional.cross_entropy(model(images.to(device)), labels.to(device)).backward()
            optimizer.step()
        seen += len(labels)
    return time.perf_counter() - started, seen


def trained_epoch(loader: DataLoader, args, device) -> float:
    """Seconds for one training epoch of a fresh model (same seed on both paths)."""
    torch.manual_seed(0)
    model = create_model(args.model, num_classes=2, in_chans=1, img_size=args.image_size).to(device)
    return epoch_seconds(loader, model, device)[0]


def main() -> None:
    parser = base_parser(__doc__.splitlines()[0])
    parser.add_argument("--folder", required=True, type=Path, help="Kermany chest_xray folder (train/, test/)")
    parser.add_argument("--model", default="resnet18")
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--workers", type=int, default=0, help="DataLoader workers for both paths")
    parser.add_argument("--repeats", type=int, default=5, help="timed passes of each path, alternating")
    args = parser.parse_args()
    print(machine_line(), f"| {args.image_size} px, batch {args.batch_size}, {args.workers} workers, {args.device}, "
          f"{args.repeats} interleaved repeats")
    device = torch.device(args.device)
    loaders = {"cache": cache_loader(args.folder, args.image_size, args.batch_size, args.workers),
               "PIL": pil_loader(args.folder, args.image_size, args.batch_size, args.workers)}
    for name, loader in loaders.items():  # untimed for the figures: afterwards the files are in the page cache
        seconds, seen = epoch_seconds(loader, None, device)
        print(f"first pass, {name}: {seen / seconds:.0f} img/s (cold if its files were not read recently)")
    images = len(loaders["cache"].dataset)
    delivered = interleaved({name: lambda loader=loader: images / epoch_seconds(loader, None, device)[0]
                             for name, loader in loaders.items()}, args.repeats)
    for name, rates in delivered.items():
        print(f"data path alone, {name}: {spread(rates, 'img/s')}")
    trained = interleaved({name: lambda loader=loader: trained_epoch(loader, args, device)
                           for name, loader in loaders.items()}, args.repeats)
    for name, seconds in trained.items():
        print(f"epoch with {args.model}, {name}: {spread(seconds, 's', digits=1)}")
    speedup = [p / c for c, p in zip(trained["cache"], trained["PIL"])]
    print(f"data path alone: cache/PIL = {statistics.median(delivered['cache']) / statistics.median(delivered['PIL']):.1f}x")
    print(f"epoch speed-up with {args.model}: cache/PIL = {spread(speedup, digits=2)}")


if __name__ == "__main__":
    main()

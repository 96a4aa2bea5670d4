"""Data path: one training epoch fed by the decode-once cache vs a per-image PIL ImageFolder DataLoader
(Kermany chest X-rays, 224 px JPEGs at 64 px, same model). Target: cache >= 5x faster.

Also prints the data path alone (images/s delivered, no model), which is what decides on a GPU.

    python bench/data_path.py --folder <kermany chest_xray folder> [--model resnet18 --device cuda]
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402
from torchvision import datasets as tv_datasets  # noqa: E402
from torchvision.transforms import v2  # noqa: E402

from bench.common import base_parser, machine_line  # noqa: E402
from trainables.datasets import load_dataset  # noqa: E402
from trainables.models import create_model  # noqa: E402
from trainables.train import MEAN, STD, ArrayDataset  # noqa: E402


def pil_loader(folder: Path, size: int, batch_size: int, workers: int) -> DataLoader:
    """What a notebook does: torchvision ImageFolder decoding and resizing every JPEG every epoch."""
    transform = v2.Compose([v2.PILToTensor(), v2.Grayscale(), v2.Resize((size, size), antialias=True),
                            v2.ToDtype(torch.float32, scale=True), v2.Normalize([MEAN], [STD])])
    return DataLoader(tv_datasets.ImageFolder(folder / "train", transform=transform), batch_size=batch_size,
                      shuffle=True, num_workers=workers)


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


def main() -> None:
    parser = base_parser(__doc__.splitlines()[0])
    parser.add_argument("--folder", required=True, type=Path, help="Kermany chest_xray folder (train/, test/)")
    parser.add_argument("--model", default="resnet18")
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--workers", type=int, default=0, help="DataLoader workers for both paths")
    args = parser.parse_args()
    print(machine_line())
    device = torch.device(args.device)
    loaders = {"cache": cache_loader(args.folder, args.image_size, args.batch_size, args.workers),
               "PIL": pil_loader(args.folder, args.image_size, args.batch_size, args.workers)}
    for loader in loaders.values():  # untimed pass: files in the OS page cache, so we time decoding, not the disk
        epoch_seconds(loader, None, device)
    delivered = {name: epoch_seconds(loader, None, device) for name, loader in loaders.items()}
    for name, (seconds, seen) in delivered.items():
        print(f"data path alone, {name}: {seen / seconds:.0f} img/s")
    trained = {}
    for name, loader in loaders.items():
        torch.manual_seed(0)
        model = create_model(args.model, num_classes=2, in_chans=1, img_size=args.image_size).to(device)
        trained[name], seen = epoch_seconds(loader, model, device)
        print(f"epoch with {args.model}, {name}: {trained[name]:.1f} s ({seen / trained[name]:.0f} img/s)")
    print(f"data path alone: cache/PIL = {delivered['PIL'][0] / delivered['cache'][0]:.1f}x")
    print(f"epoch speed-up with {args.model}: cache/PIL = {trained['PIL'] / trained['cache']:.2f}x")


if __name__ == "__main__":
    main()

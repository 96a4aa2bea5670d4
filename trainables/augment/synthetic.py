"""`synthetic_pct`: DCGAN-generated images of the minority classes, added to the training split only.

    synthetic = synthetic_training_images(train_set, config, dataset, device)   # None when synthetic_pct is 0

Each class smaller than the largest gets round(synthetic_pct % of its training images) generated images (the
rule of `minority_aug_pct`). The class-conditional DCGAN (trainables/augment/dcgan.py) learns from the trial's training
split alone: validation and test images never reach it. It is trained once per node and reused: the cache
($MEDTUNE_CACHE_DIR/gan, default ~/.cache/medtune/gan) is keyed by the dataset, the split (a hash of the
training images' bytes and labels, and the split_ratio / split_version / seed fields), the image size, the seed
and every GAN setting, so a different split or fold never reuses another's generator. Trials starting together
wait on a file lock for one builder; the file is written to a temp name and renamed, so a killed build leaves
nothing half-written.

Sizes: the GAN trains at `gan_image_size` (auto: 28 px for images of 28 px or less, else 64 px). Larger images
(128, 224 px) are shrunk to 64 px for the GAN and its images are up-sampled (bilinear) to the trial's size: they
carry 64 px detail only. Smaller ones are enlarged to 28 px and shrunk back.

Quality signal, computed once when the generator is built: a classifier two-sample test (C2ST, Lopez-Paz &
Oquab 2017). A logistic regression learns to tell training images from as many generated ones (same class mix),
scored by 5-fold held-out accuracy: 0.5 means it cannot tell them apart, 1.0 that every image gives itself away.
It is reported on pixels (`gan_c2st_acc`) and on 4x4 block means (`gan_c2st_coarse_acc`: layout and
brightness, without fine texture). Multi-label datasets are refused (the GAN is conditioned on one class).
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from filelock import FileLock
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import StratifiedKFold, cross_val_score
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from trainables.augment.dcgan import GanSettings, Generator, auto_epochs, generate, to_gan_scale, to_uint8, train_dcgan
from trainables.augment.per_sample import minority_counts
from trainables.data.image_cache import default_cache_dir
from trainables.data.registry import Dataset, ImageSet
from trainables.errors import UserError

GAN_FORMAT = 1  # part of the cache key: bump when the GAN, its training or the C2ST changes
C2ST_IMAGES = 2000  # at most this many real (and as many generated) images in the two-sample test
C2ST_BLOCK = 4  # side of the blocks averaged for the coarse two-sample test
SAMPLES_PER_CLASS = 8  # generated images per class in gan_samples.png


@dataclass(frozen=True)
class SyntheticImages:
    images: np.ndarray  # (N, H, W, C) uint8 at the trial's image size
    labels: np.ndarray  # (N,) class of each generated image
    metrics: dict  # synthetic_images, gan_train_seconds, gan_c2st_acc, gan_c2st_coarse_acc
    report: dict  # for figures.write_gan_figures: samples, sample_labels, history, summary


def check_synthetic_task(task: str, dataset: str) -> None:
    """A multi-label dataset has no single class to condition the GAN on: one line, before any compute."""
    if task == "multilabel":
        raise UserError(f"synthetic_pct needs single-label classes, but {dataset} is multi-label; "
                        "set synthetic_pct to 0 (minority_aug_pct or sampling balance multi-label data)")


def gan_settings(config: dict, train_count: int, image_size: int) -> GanSettings:
    """The config's GAN keys with `auto` resolved: 28 px for images <= 28 px, else 64; ~2000 generator steps."""
    size = config["gan_image_size"]
    size = (28 if image_size <= 28 else 64) if size == "auto" else int(size)
    batch = int(config["gan_batch_size"])
    epochs = config["gan_epochs"] or auto_epochs(train_count, min(batch, train_count))
    return GanSettings(image_size=size, epochs=int(epochs), width=int(config["gan_width"]),
                       latent_dim=int(config["gan_latent_dim"]), batch_size=batch, lr=float(config["gan_lr"]))


def gan_cache_key(train_set: ImageSet, config: dict, settings: GanSettings) -> str:
    """sha256 of the training images and labels, the split fields, the dataset, the image size, seed and settings."""
    fields = {"format": GAN_FORMAT, "dataset": config["dataset"], "image_size": config["image_size"],
              "split_ratio": config["split_ratio"], "split_version": config["split_version"], "seed": config["seed"],
              "gan": settings.as_dict(), "shape": list(train_set.images.shape)}
    digest = hashlib.sha256(json.dumps(fields, sort_keys=True).encode())
    digest.update(np.ascontiguousarray(train_set.images).data)
    digest.update(np.ascontiguousarray(train_set.labels, dtype=np.int64).data)
    return digest.hexdigest()[:32]


def load_or_train_generator(train_set: ImageSet, config: dict, num_classes: int, device: torch.device,
                            cache_dir: str | os.PathLike | None = None) -> tuple[Generator, dict, bool]:
    """(generator, its cached record without the weights, built now?): read from the node's cache, else trained on
    `train_set` (the training split), two-sample tested and saved once while other trials wait on the lock."""
    settings = gan_settings(config, len(train_set), int(train_set.images.shape[1]))
    root = Path(cache_dir) if cache_dir else default_cache_dir() / "gan"
    root.mkdir(parents=True, exist_ok=True)
    key = gan_cache_key(train_set, config, settings)
    path = root / f"{key}.pt"
    record, built = _read(path), False
    if record is None:
        with FileLock(str(root / f"{key}.lock")):
            record = _read(path)  # another trial may have built it while this one waited
            if record is None:
                _build(train_set, num_classes, settings, config["seed"], device, path, key)
                record, built = _read(path), True
    with torch.random.fork_rng(devices=[]):  # its random initialisation must not shift the trial's own draws
        generator = Generator(num_classes, int(record["channels"]), settings.image_size, settings.width,
                              settings.latent_dim)
    generator.load_state_dict(record.pop("generator"))
    verb = f"built in {record['train_seconds']:.1f} s" if built else "reusing"
    print(f"gan cache: {verb} generator ({settings.image_size} px, {settings.epochs} epochs) at {path}", flush=True)
    return generator.eval(), {**record, "path": str(path)}, built


def _read(path: Path) -> dict | None:
    """A finished cache file, or None when absent or unreadable (then it is built again)."""
    if not path.exists():
        return None
    try:
        record = torch.load(path, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, EOFError, pickle.UnpicklingError):
        return None
    return record if isinstance(record, dict) and record.get("format") == GAN_FORMAT else None


def _build(train_set: ImageSet, num_classes: int, settings: GanSettings, seed: int, device: torch.device,
           path: Path, key: str) -> None:
    started = time.perf_counter()
    generator, history = train_dcgan(train_set.images, train_set.labels, num_classes=num_classes, settings=settings,
                                     seed=seed, device=device)
    train_seconds = time.perf_counter() - started
    started = time.perf_counter()
    pixels, coarse = two_sample_test(train_set, generator, settings.image_size, seed)
    record = {"format": GAN_FORMAT, "key": key, "generator": generator.state_dict(), "settings": settings.as_dict(),
              "channels": int(train_set.images.shape[-1]), "num_classes": num_classes, "train_images": len(train_set),
              "history": history, "train_seconds": train_seconds, "c2st_acc": pixels, "c2st_coarse_acc": coarse,
              "c2st_seconds": time.perf_counter() - started, "device": str(device)}
    temp = path.with_name(f"{path.stem}.{os.getpid()}.tmp.pt")
    try:
        torch.save(record, temp)
        os.replace(temp, path)
    finally:
        temp.unlink(missing_ok=True)


def two_sample_test(train_set: ImageSet, generator: Generator, image_size: int, seed: int) -> tuple[float, float]:
    """(pixel, coarse) held-out accuracy of a classifier telling training images from generated ones of the
    same classes, at the GAN's size; 0.5 = indistinguishable."""
    rng = np.random.default_rng(seed)
    rows = np.sort(rng.choice(len(train_set), min(len(train_set), C2ST_IMAGES), replace=False))
    real = to_uint8(to_gan_scale(train_set.images[rows], image_size))
    fake = generate(generator, train_set.labels[rows], seed=seed + 2)
    return c2st_accuracy(real, fake, seed), c2st_accuracy(block_means(real), block_means(fake), seed)


def block_means(images: np.ndarray, block: int = C2ST_BLOCK) -> np.ndarray:
    """(N, S, S, C) -> (N, S/block, S/block, C) means of block x block pixels."""
    n, side, _, channels = images.shape
    cut = side // block * block
    blocks = images[:, :cut, :cut].reshape(n, cut // block, block, cut // block, block, channels)
    return blocks.mean(axis=(2, 4))


def c2st_accuracy(real: np.ndarray, fake: np.ndarray, seed: int) -> float:
    """Held-out (5-fold) accuracy of a standardised logistic regression telling `real` from `fake`."""
    features = np.concatenate([real, fake]).reshape(len(real) + len(fake), -1).astype(np.float32) / 255.0
    target = np.r_[np.zeros(len(real)), np.ones(len(fake))]
    folds = StratifiedKFold(n_splits=max(2, min(5, len(real), len(fake))), shuffle=True, random_state=seed)
    classifier = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000))
    return float(cross_val_score(classifier, features, target, cv=folds, scoring="accuracy").mean())


def synthetic_training_images(train_set: ImageSet, config: dict, dataset: Dataset,
                              device: torch.device) -> SyntheticImages | None:
    """The generated minority images for this trial's training split (None when `synthetic_pct` is 0)."""
    pct = float(config["synthetic_pct"])
    if pct <= 0:
        return None
    check_synthetic_task(dataset.task, dataset.name)
    if len(train_set) < 2:
        raise UserError(f"synthetic_pct: the training split has {len(train_set)} image; the GAN needs at least 2")
    counts = minority_counts(train_set.labels, pct)
    generator, record, built = load_or_train_generator(train_set, config, dataset.num_classes, device)
    size = int(train_set.images.shape[1])
    labels = np.repeat(np.array(list(counts), np.int64), list(counts.values())) if counts else np.empty(0, np.int64)
    images = generate(generator, labels, seed=config["seed"] + 3, image_size=size)
    if not len(images):
        images = np.empty((0, *train_set.images.shape[1:]), np.uint8)
    sample_labels = np.repeat(np.arange(dataset.num_classes), SAMPLES_PER_CLASS)
    metrics = {"synthetic_images": len(labels), "gan_train_seconds": record["train_seconds"],
               "gan_c2st_acc": record["c2st_acc"], "gan_c2st_coarse_acc": record["c2st_coarse_acc"]}
    summary = {**metrics, "built_by_this_trial": built, "cache_file": record["path"], "key": record["key"],
               "settings": record["settings"], "device": record["device"], "train_images": record["train_images"],
               "c2st_seconds": record["c2st_seconds"], "generated_per_class": {dataset.class_names[c]: n
                                                                               for c, n in counts.items()}}
    report = {"samples": generate(generator, sample_labels, seed=config["seed"] + 4), "sample_labels": sample_labels,
              "history": record["history"], "summary": summary}
    return SyntheticImages(images, labels, metrics, report)

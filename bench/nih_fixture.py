"""A generated NIH ChestX-ray14 in the official layout, for scale runs: nothing of it is real and none is committed.

    python bench/nih_fixture.py --out /data/nih_synthetic                  # 112,120 grey PNGs at 256 px
    python bench/nih_fixture.py --out /tmp/nih30k --count 30000 --size 256 --seed 0

Writes what the release has: `Data_Entry_2017_v2020.csv` (Image Index, Finding Labels separated by `|` with
"No Finding", Follow-up #, Patient ID, Patient Age, Patient Gender, View Position, OriginalImage[Width,Height],
OriginalImagePixelSpacing[x,y]), `images_001/images/` ... `images_012/images/` filled as the release's tarballs are
(4,999 images, then 10,000 each, the rest in the last; scaled with --count), and `train_val_list.txt` /
`test_list.txt`, split by patient. `nih_chestxray14:OUT` reads it.

Shapes as the real table (the constants below, counted on the 112,120-row `Data_Entry_2017_v2020.csv.gz` shipped in
the torchxrayvision 1.5.7 wheel): images per patient drawn from the real histogram, each finding's image count, the
share of "No Finding", the number of findings per abnormal image, the test split's share of images and its heavier
patients (2,797 of 30,805 patients hold 25,596 test images: test patients are drawn with weight sqrt(images)).

Pixels are synthetic but learnable: a smooth chest-like background, one Gaussian blob per finding at that finding's
own place (jittered), and noise. Images are written in parallel (one process per core, `--workers`).
"""

from __future__ import annotations

import argparse
import csv
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from trainables.data.folder_datasets import NIH_FINDINGS, NIH_NO_FINDING  # noqa: E402

# --- the real release's shape (Data_Entry_2017_v2020.csv, 112,120 rows, 30,805 patients) ---------------------
RELEASE_IMAGES = 112_120
FINDING_IMAGES = {"Infiltration": 19_894, "Effusion": 13_317, "Atelectasis": 11_559, "Nodule": 6_331, "Mass": 5_782,
                  "Pneumothorax": 5_302, "Consolidation": 4_667, "Pleural_Thickening": 3_385, "Cardiomegaly": 2_776,
                  "Emphysema": 2_516, "Edema": 2_303, "Fibrosis": 1_686, "Pneumonia": 1_431, "Hernia": 227}
NO_FINDING_IMAGES = 60_361
FINDINGS_PER_ABNORMAL_IMAGE = {1: 30_963, 2: 14_306, 3: 4_856, 4: 1_247, 5: 301, 6: 67, 7: 16, 8: 1, 9: 2}
# patients by their number of images: {images: patients}
IMAGES_PER_PATIENT = {
    1: 17503, 2: 4113, 3: 2100, 4: 1330, 5: 938, 6: 787, 7: 608, 8: 494, 9: 387, 10: 320, 11: 281, 12: 235, 13: 165,
    14: 181, 15: 121, 16: 120, 17: 91, 18: 77, 19: 77, 20: 74, 21: 68, 22: 39, 23: 50, 24: 51, 25: 45, 26: 35, 27: 38,
    28: 27, 29: 25, 30: 28, 31: 17, 32: 22, 33: 20, 34: 23, 35: 24, 36: 8, 37: 11, 38: 16, 39: 11, 40: 12, 41: 14,
    42: 11, 43: 6, 44: 8, 45: 6, 46: 10, 47: 5, 48: 7, 49: 9, 50: 6, 51: 11, 52: 7, 53: 5, 54: 7, 55: 10, 56: 7, 57: 2,
    58: 4, 59: 3, 60: 3, 61: 8, 62: 7, 63: 3, 64: 3, 65: 3, 66: 6, 67: 3, 68: 4, 69: 6, 70: 2, 71: 2, 73: 2, 74: 1,
    75: 1, 76: 2, 77: 2, 79: 1, 80: 2, 81: 3, 83: 1, 84: 2, 86: 3, 87: 1, 88: 1, 89: 1, 90: 2, 91: 1, 99: 1, 102: 1,
    108: 3, 109: 1, 111: 1, 114: 1, 116: 2, 117: 1, 119: 1, 130: 1, 137: 1, 143: 1, 157: 1, 158: 1, 173: 1, 184: 1}
TEST_IMAGES = 25_596  # test_list.txt of the release (2,797 patients); train_val_list.txt holds the other 86,524
FOLDER_IMAGES = (4_999, *[10_000] * 10, 7_121)  # images_001 ... images_012
PA_SHARE, MALE_SHARE = 67_310 / RELEASE_IMAGES, 63_340 / RELEASE_IMAGES
CSV_HEADER = ["Image Index", "Finding Labels", "Follow-up #", "Patient ID", "Patient Age", "Patient Gender",
              "View Position", "OriginalImage[Width", "Height]", "OriginalImagePixelSpacing[x", "y]"]


def patient_sizes(count: int, rng: np.random.Generator) -> np.ndarray:
    """Images per patient drawn from the real histogram until `count` images; the last patient is cut to fit."""
    sizes = np.array(list(IMAGES_PER_PATIENT), float)
    weights = np.array(list(IMAGES_PER_PATIENT.values()), float)
    drawn = rng.choice(sizes, size=count, p=weights / weights.sum()).astype(int)  # more than enough patients
    total = np.cumsum(drawn)
    last = int(np.searchsorted(total, count))
    drawn = drawn[:last + 1]
    drawn[-1] -= int(total[last] - count)
    return rng.permutation(drawn[drawn > 0])


def finding_weights(rng: np.random.Generator, rounds: int = 8, probe: int = 20_000) -> np.ndarray:
    """Draw weights (without replacement, k per image) whose marginals match FINDING_IMAGES among abnormal images:
    drawing k distinct findings flattens the frequencies, so the weights are calibrated on a probe sample."""
    target = np.array([FINDING_IMAGES[name] for name in NIH_FINDINGS], float)
    target /= target.sum()
    weights = target.copy()
    ks = np.array(list(FINDINGS_PER_ABNORMAL_IMAGE)), np.array(list(FINDINGS_PER_ABNORMAL_IMAGE.values()), float)
    for _ in range(rounds):
        counts = np.zeros(len(target))
        for k in rng.choice(ks[0], size=probe // 10, p=ks[1] / ks[1].sum()):
            counts[rng.choice(len(target), size=k, replace=False, p=weights / weights.sum())] += 1
        weights *= target / np.maximum(counts / counts.sum(), 1e-9)
    return weights / weights.sum()


def labels_table(count: int, rng: np.random.Generator) -> list[str]:
    """`Finding Labels` of `count` images: "No Finding" at the real share, else k findings (k as the real ones)."""
    weights = finding_weights(rng)
    ks, k_weights = np.array(list(FINDINGS_PER_ABNORMAL_IMAGE)), np.array(list(FINDINGS_PER_ABNORMAL_IMAGE.values()), float)
    normal = rng.random(count) < NO_FINDING_IMAGES / RELEASE_IMAGES
    k = rng.choice(ks, size=count, p=k_weights / k_weights.sum())
    out = []
    for row in range(count):
        if normal[row]:
            out.append(NIH_NO_FINDING)
            continue
        chosen = sorted(rng.choice(len(NIH_FINDINGS), size=int(k[row]), replace=False, p=weights))
        out.append("|".join(sorted(NIH_FINDINGS[j] for j in chosen)))  # the release sorts them by name
    return out


def test_patients(sizes: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Bool per patient: held out as test, drawn with weight sqrt(images) until the release's share of images."""
    keys = rng.random(len(sizes)) ** (1.0 / np.sqrt(sizes))  # weighted sampling without replacement (Efraimidis-Spirakis)
    order = np.argsort(-keys)
    enough = int(np.searchsorted(np.cumsum(sizes[order]), round(len(sizes) and sizes.sum() * TEST_IMAGES / RELEASE_IMAGES)))
    test = np.zeros(len(sizes), bool)
    test[order[:enough + 1]] = True
    return test


def folder_of(count: int) -> np.ndarray:
    """images_NNN index (1-based) of each row, the release's fill scaled to `count`."""
    bounds = np.round(np.cumsum(FOLDER_IMAGES) * count / RELEASE_IMAGES).astype(int)
    return np.searchsorted(bounds, np.arange(count), side="right") + 1


def blob_centres(size: int) -> np.ndarray:
    """(14, 2) pixel centres, one per finding, spread over the lung fields (fixed: the pattern to learn)."""
    grid = np.random.default_rng(1234).permutation([(x, y) for x in (0.25, 0.42, 0.58, 0.75) for y in (0.25, 0.45, 0.65, 0.8)])
    return grid[:len(NIH_FINDINGS)] * size


def draw_image(size: int, findings: str, seed: int) -> np.ndarray:
    """One uint8 (size, size) image: background + a blob per finding + noise."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:size, 0:size] / size
    image = 90 + 60 * np.exp(-((x - 0.5) ** 2 / 0.18 + (y - 0.5) ** 2 / 0.3)) + rng.normal(0, 6) + 20 * y
    centres, radius = blob_centres(size), size / 14
    for name in findings.split("|"):
        if name in NIH_FINDINGS:
            cx, cy = centres[NIH_FINDINGS.index(name)] + rng.normal(0, size / 40, 2)
            image += 45 * np.exp(-((x * size - cx) ** 2 + (y * size - cy) ** 2) / (2 * radius ** 2))
    image += rng.normal(0, 10, (size, size))
    return np.clip(image, 0, 255).astype(np.uint8)


def write_images(job: tuple[list[str], list[str], int, int]) -> int:
    paths, findings, size, seed = job
    for offset, (path, labels) in enumerate(zip(paths, findings)):
        Image.fromarray(draw_image(size, labels, seed + offset)).save(path, compress_level=1)
    return len(paths)


def check_args(args) -> None:
    if args.count < 2 or args.size < 8:
        raise SystemExit("error: --count must be >= 2 and --size >= 8")
    if args.out.exists() and any(args.out.iterdir()):
        raise SystemExit(f"error: {args.out} is not empty; give a new --out folder")


@dataclass
class Release:
    """Every row of the generated release, decided before any pixel (so the table can be written first)."""

    names: list[str]
    findings: list[str]
    patient: np.ndarray
    follow_up: np.ndarray
    test: np.ndarray  # bool per image
    paths: list[str]
    columns: dict  # per image: age, gender, view


def plan_release(out: Path, count: int, seed: int) -> Release:
    rng = np.random.default_rng(seed)
    sizes = patient_sizes(count, rng)
    patient = np.repeat(np.arange(1, len(sizes) + 1), sizes)
    follow_up = np.concatenate([np.arange(n) for n in sizes])
    test = np.repeat(test_patients(sizes, rng), sizes)
    findings = labels_table(count, rng)
    names = [f"{p:08d}_{f:03d}.png" for p, f in zip(patient, follow_up)]
    paths = [str(out / f"images_{d:03d}" / "images" / n) for d, n in zip(folder_of(count), names)]
    age = np.clip(rng.normal(46.6, 16.6, len(sizes)), 1, 95).astype(int)
    male, pa = rng.random(len(sizes)) < MALE_SHARE, rng.random(count) < PA_SHARE
    columns = {"age": age[patient - 1] + follow_up // 12, "gender": np.where(male[patient - 1], "M", "F"),
               "view": np.where(pa, "PA", "AP")}
    return Release(names, findings, patient, follow_up, test, paths, columns)


def write_table(release: Release, out: Path) -> None:
    """Data_Entry_2017_v2020.csv, test_list.txt and train_val_list.txt."""
    with open(out / "Data_Entry_2017_v2020.csv", "w", newline="") as file:
        writer = csv.writer(file)
        writer.writerow(CSV_HEADER)
        for row, name in enumerate(release.names):
            writer.writerow([name, release.findings[row], release.follow_up[row], release.patient[row],
                             release.columns["age"][row], release.columns["gender"][row], release.columns["view"][row],
                             2500, 2048, 0.168, 0.168])
    (out / "test_list.txt").write_text("".join(f"{n}\n" for n, t in zip(release.names, release.test) if t))
    (out / "train_val_list.txt").write_text("".join(f"{n}\n" for n, t in zip(release.names, release.test) if not t))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="new folder to write the release into")
    parser.add_argument("--count", type=int, default=RELEASE_IMAGES, help="images (default: the release's 112,120)")
    parser.add_argument("--size", type=int, default=256, help="pixels per side (default 256)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="processes (default: every core)")
    args = parser.parse_args()
    check_args(args)
    release = plan_release(args.out, args.count, args.seed)
    for folder in sorted({Path(path).parent for path in release.paths}):
        folder.mkdir(parents=True, exist_ok=True)
    write_table(release, args.out)

    started = time.perf_counter()
    chunk = 500
    jobs = [(release.paths[i:i + chunk], release.findings[i:i + chunk], args.size, args.seed * 10_000_019 + i)
            for i in range(0, args.count, chunk)]
    with ProcessPoolExecutor(args.workers) as pool, tqdm(total=args.count, unit="img", desc="writing PNGs") as bar:
        for done in pool.map(write_images, jobs):
            bar.update(done)
    seconds = time.perf_counter() - started
    test_patients_count = len(np.unique(release.patient[release.test]))
    print(f"wrote {args.count:,} images of {release.patient.max():,} patients at {args.size} px to {args.out} in "
          f"{seconds:.0f} s ({args.count / seconds:,.0f} img/s, {args.workers} processes); test "
          f"{int(release.test.sum()):,} images of {test_patients_count:,} patients")


if __name__ == "__main__":
    main()

"""Trials get their data by path, not through Ray's object store: a search's datasets reach a trial as small
references, and the trial's images are read-only memory maps of the node's cache. In-process, no Ray: ~3 s."""

import pickle
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from search_spaces import parse_space
from search_spaces.preflight import dataset_refs, load_datasets
from trainables.data.datasets import load_dataset
from trainables.data.registry import RowView

SIZE = 128  # 80 images x 128 x 128 x 1 = 1.3 MB decoded


def space_on(spec: str, sizes: list[int]):
    return parse_space({"description": "trial data", "dataset": spec, "metric": "val_auc", "num_samples": 1,
                        "fixed": {"model": "simple_cnn"}, "params": {"image_size": {"choice": sizes}}}, Path("test.yaml"))


@pytest.fixture
def folder(tmp_path, monkeypatch):
    """An imagefolder of 2 x 40 grey PNGs in a relative path, the image cache in its own folder."""
    monkeypatch.setenv("MEDTUNE_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)
    rng = np.random.default_rng(0)
    for name in ("normal", "abnormal"):
        (tmp_path / "xrays" / name).mkdir(parents=True)
        for i in range(40):
            Image.fromarray(rng.integers(0, 256, (160, 160), dtype=np.uint8)).save(tmp_path / "xrays" / name / f"{i}.png")
    return tmp_path


def test_a_trial_gets_a_small_reference_and_opens_read_only_memory_maps(folder, tmp_path, monkeypatch):
    space = space_on("imagefolder:xrays", [SIZE, SIZE // 2])  # relative to the driver's working directory
    datasets = load_datasets(space)  # the driver: decodes into the cache, checks, reports leaks
    images_bytes = sum(d.dev.images.base.nbytes for d in datasets.values())
    refs = dataset_refs(space, datasets)
    sent = pickle.dumps(refs)
    assert images_bytes > 1_000_000 and len(sent) < 1_000_000 and len(sent) < images_bytes / 100

    load_dataset.cache_clear()  # as in a trial's own process, which runs in its own folder
    monkeypatch.chdir(tmp_path / "cache")
    for key, ref in pickle.loads(sent).items():
        opened, checked = ref.open(), datasets[key]
        assert opened.decoded_images == 0 and opened.cache_file == checked.cache_file  # found, not rebuilt
        for part in (opened.dev, opened.test, opened.dev.subset(np.arange(0, len(opened.dev), 2))):
            assert isinstance(part.images, RowView) and isinstance(part.images.base, np.memmap)
            assert str(part.images.base.filename) == checked.cache_file and not part.images.base.flags.writeable
        assert opened.dev_files == tuple(str(tmp_path / f) for f in checked.dev_files)  # the same rows, the same order
        assert np.array_equal(opened.dev.labels, checked.dev.labels)
        assert np.array_equal(opened.test.images[:], np.asarray(checked.test.images))  # the same test split


def test_a_node_whose_files_differ_fails_the_trial_with_the_reason(folder):
    space = space_on("imagefolder:xrays", [32])
    (ref,) = dataset_refs(space, load_datasets(space)).values()
    (folder / "xrays" / "normal" / "0.png").unlink()  # this "node" lacks a file the driver checked
    load_dataset.cache_clear()
    with pytest.raises(RuntimeError, match="give every node the same data at the same path"):
        ref.open()


def test_medmnist_images_are_memory_mapped_too(medmnist_root, tmp_path, monkeypatch):
    """The npz is decompressed once into the cache; the arrays are the official ones, in the official order."""
    monkeypatch.setenv("MEDTUNE_CACHE_DIR", str(tmp_path))
    load_dataset.cache_clear()
    data = load_dataset("breastmnist", image_size=28, data_root=str(medmnist_root))
    assert isinstance(data.dev.images.base, np.memmap) and not data.dev.images.base.flags.writeable
    with np.load(medmnist_root / "breastmnist.npz") as npz:
        assert np.array_equal(np.asarray(data.dev.images)[..., 0], np.concatenate([npz["train_images"], npz["val_images"]]))
        assert np.array_equal(np.asarray(data.test.images)[..., 0], npz["test_images"])

import zipfile

import medmnist
import numpy as np
import pytest

from trainables.data.datasets import load_dataset
from trainables.errors import UserError


def test_missing_medmnist_file_without_network_says_where_to_put_it(tmp_path, monkeypatch):
    def offline(*args, **kwargs):
        raise ConnectionError("no network")

    monkeypatch.setattr(medmnist, "BreastMNIST", offline)
    with pytest.raises(UserError, match=rf"breastmnist_64.npz is not in {tmp_path}.*--data-root") as error:
        load_dataset.__wrapped__("breastmnist", image_size=64, data_root=str(tmp_path))
    assert isinstance(error.value.__cause__, ConnectionError)  # shown under --debug


def test_unknown_dataset_lists_valid_names():
    with pytest.raises(UserError, match="Unknown dataset 'pneumonia'; valid names: .*pneumoniamnist"):
        load_dataset.__wrapped__("pneumonia", image_size=28)


@pytest.mark.integration
def test_official_splits_and_metadata(medmnist_root):
    data = load_dataset("breastmnist", image_size=28, data_root=str(medmnist_root))
    assert data.task == "binary" and data.channels == 1 and data.dev.images.dtype == np.uint8
    assert (int((~data.official_val).sum()), int(data.official_val.sum()), len(data.test)) == (546, 78, 156)
    assert data.class_names == ("malignant", "normal, benign")


@pytest.mark.integration
def test_truncated_npz_is_one_line_naming_the_file_and_the_fix(medmnist_root, tmp_path):
    whole = (medmnist_root / "pneumoniamnist.npz").read_bytes()
    (tmp_path / "pneumoniamnist.npz").write_bytes(whole[: len(whole) // 2])  # an interrupted download
    with pytest.raises(UserError) as error:
        load_dataset.__wrapped__("pneumoniamnist", image_size=28, data_root=str(tmp_path))
    message = str(error.value)
    assert "\n" not in message and str(tmp_path / "pneumoniamnist.npz") in message
    assert "delete it and download it again, or put the official pneumoniamnist.npz there" in message
    assert isinstance(error.value.__cause__, zipfile.BadZipFile)  # chained: --debug shows the cause


def test_npz_with_other_arrays_names_the_missing_one(tmp_path):
    np.savez(tmp_path / "breastmnist.npz", images=np.zeros((2, 28, 28), np.uint8), labels=np.zeros((2, 1)))
    with pytest.raises(UserError, match=r"breastmnist.npz is not a MedMNIST file: it has no 'train_images' array "
                                        r"\(it has images, labels\); delete it and download it again"):
        load_dataset.__wrapped__("breastmnist", image_size=28, data_root=str(tmp_path))

import medmnist
import numpy as np
import pytest

from trainables.datasets import load_dataset
from trainables.errors import UserError


def test_missing_medmnist_file_without_network_says_where_to_put_it(tmp_path, monkeypatch):
    def offline(*args, **kwargs):
        raise ConnectionError("no network")

    monkeypatch.setattr(medmnist, "BreastMNIST", offline)
    with pytest.raises(UserError, match=rf"breastmnist_64.npz is not in {tmp_path}.*--data-root"):
        load_dataset.__wrapped__("breastmnist", image_size=64, data_root=str(tmp_path))


def test_unknown_dataset_lists_valid_names():
    with pytest.raises(UserError, match="Unknown dataset 'pneumonia'; valid names: .*pneumoniamnist"):
        load_dataset.__wrapped__("pneumonia", image_size=28)


@pytest.mark.integration
def test_official_splits_and_metadata(medmnist_root):
    data = load_dataset("breastmnist", image_size=28, data_root=str(medmnist_root))
    assert data.task == "binary" and data.channels == 1 and data.dev.images.dtype == np.uint8
    assert (int((~data.official_val).sum()), int(data.official_val.sum()), len(data.test)) == (546, 78, 156)
    assert data.class_names == ("malignant", "normal, benign")

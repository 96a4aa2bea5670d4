from pathlib import Path

import pytest

import tune
from search_spaces import load_space, shipped_spaces
from trainables.errors import UserError

REPO = Path(__file__).resolve().parents[1]
SHIPPED = ["smoke", "resnetd_depth", "pneumonia_resnet18", "medmnist_resnet", "chestxray14_multilabel",
           "architecture_zoo", "medmnist_baseline"]


@pytest.mark.parametrize("name", SHIPPED)
def test_every_shipped_space_validates_and_builds_a_tune_space(name):
    space = load_space(name)
    param_space = space.param_space()
    assert param_space["dataset"] == space.dataset and param_space["epochs"] == space.max_t
    assert space.description and space.metric.startswith("val_")


def test_resnetd_depth_covers_the_study_grid():
    space = load_space("resnetd_depth")
    assert space.values_of("model") == [f"resnet{d}d" for d in (18, 34, 50, 101, 152, 200)]
    assert space.values_of("split_ratio") == [0.9, 0.8, 0.7]
    assert space.values_of("minority_aug_pct") == [0, 10, 20, 30]
    assert space.values_of("loss_weighting") == ["none", "inverse", "effective"]
    assert space.params["warmup_frac"] == {"uniform": [0.0, 0.2]} and "loguniform" in space.params["lr"]


def test_list_spaces_prints_one_line_per_space(capsys):
    assert tune.main(["--list-spaces"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert [line.split()[0] for line in lines] == sorted(shipped_spaces())
    assert set(SHIPPED) <= set(shipped_spaces())


BAD = {
    "unknown top-level key": ("dataset: pneumoniamnist\ndescription: x\nsamples: 3\n", "samples: unknown key"),
    "unknown config key": ("dataset: pneumoniamnist\ndescription: x\nparams:\n  learning_rate: {uniform: [0, 1]}\n",
                           "params.learning_rate: unknown config key"),
    "empty range": ("dataset: pneumoniamnist\ndescription: x\nparams:\n  lr: {loguniform: [1.0e-2, 1.0e-4]}\n",
                    "params.lr: loguniform range"),
    "bad model": ("dataset: pneumoniamnist\ndescription: x\nparams:\n  model: {choice: [resnet18, resnet19]}\n",
                  "Unknown model 'resnet19'"),
    "bad dataset": ("dataset: pneumomnist\ndescription: x\n", "Unknown dataset 'pneumomnist'"),
    "test metric": ("dataset: pneumoniamnist\ndescription: x\nmetric: test_auc\n", "metric: metric 'test_auc' must be a validation"),
    "bad choice value": ("dataset: pneumoniamnist\ndescription: x\nparams:\n  optimizer: {choice: [adam, lion]}\n",
                         "Invalid optimizer 'lion'"),
    "broken yaml": ("dataset: [pneumoniamnist\n", "not valid YAML"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_space_names_file_and_key(tmp_path, case):
    text, expected = BAD[case]
    path = tmp_path / "mine.yaml"
    path.write_text(text)
    with pytest.raises(UserError) as error:
        load_space(str(path))
    assert str(path) in str(error.value) and expected in str(error.value)
    assert "\n" not in str(error.value)

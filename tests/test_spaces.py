import json
import textwrap
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml
from ray.tune.schedulers import FIFOScheduler

import search_spaces
import tune
from analysis.summary import print_summary, rank_results
from search_spaces import load_space, parse_space, shipped_spaces
from search_spaces.tuner import ProgressLines, make_scheduler, make_searcher
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


def test_resnetd_depth_covers_the_study_grid_and_tries_its_protocol_first():
    space = load_space("resnetd_depth")
    assert space.values_of("model") == [f"resnet{d}d" for d in (18, 34, 50, 101, 152, 200)]
    assert space.values_of("split_ratio") == [0.9, 0.8, 0.7]
    assert space.values_of("minority_aug_pct") == [0, 10, 20, 30]
    assert space.values_of("loss_weighting") == ["none", "inverse", "effective"]
    arms = {(v["schedule"], v["warmup_frac"]) for v in space.variants.values()}
    assert arms == {("constant", 0.0), ("constant", 0.1), ("cosine", 0.0), ("cosine", 0.1)}  # the study's 4 arms
    assert make_searcher(space, seed=0)._points_to_evaluate == space.points_to_evaluate
    assert space.points_to_evaluate[0]["lr"] == 1e-3 and space.metric == "val_acc"


def test_every_study_space_states_its_protocol_or_gives_every_model_the_same_budget():
    for name in ("resnetd_depth", "pneumonia_resnet18", "medmnist_resnet", "chestxray14_multilabel"):
        assert load_space(name).points_to_evaluate, name
    zoo = load_space("architecture_zoo")
    assert zoo.scheduler == "fifo" and isinstance(make_scheduler(zoo), FIFOScheduler)
    assert zoo.variants["efficientnet_b0"]["drop_path_rate"] == 0.06
    assert zoo.variants["vit_patch8"]["attn_drop_rate"] == 0.3
    assert type(make_scheduler(load_space("smoke"))).__name__ == "AsyncHyperBandScheduler"


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
    "point outside its domain": ("dataset: pneumoniamnist\ndescription: x\nparams:\n  lr: {loguniform: [1.0e-4, 1.0e-2]}\n"
                                 "points_to_evaluate:\n  - {lr: 0.5}\n", "points_to_evaluate[0]: lr 0.5 is outside its domain"),
    "point missing a key": ("dataset: pneumoniamnist\ndescription: x\nparams:\n  lr: {loguniform: [1.0e-4, 1.0e-2]}\n"
                            "  batch_size: {choice: [32, 64]}\npoints_to_evaluate:\n  - {lr: 0.001}\n",
                            "points_to_evaluate[0]: give exactly the searched keys (lr, batch_size); missing batch_size"),
    "unknown scheduler": ("dataset: pneumoniamnist\ndescription: x\nscheduler: {kind: pbt}\n", "scheduler.kind"),
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


def test_a_variants_space_prints_the_winning_variant_in_progress_lines_and_summary(capsys):
    """architecture_zoo searches `variant` (the architecture) besides lr: the per-trial line, the end-of-search
    table and the best config all show it, as the leaderboard and the report do (one list of searched keys)."""
    space = load_space("architecture_zoo")
    assert space.searched_keys() == ["lr", "variant"]
    ProgressLines(space).on_trial_start(0, [], SimpleNamespace(trial_id="t1", config={"lr": 1e-3, "variant": "resnet18"}))
    assert "[t1] start lr=0.001 variant=resnet18" in capsys.readouterr().out

    def result(trial_id, variant, auc):
        return SimpleNamespace(error=None, config={"lr": 1e-3, "variant": variant}, metrics={
            "trial_id": trial_id, "training_iteration": space.max_t, "done": True, "best_val_auc": auc,
            "test_auc": auc - 0.01, "test_acc": 0.8})

    results = [result("t1", "resnet18", 0.90), result("t2", "densenet121", 0.95)]
    ranked = rank_results(results, space.metric, space.mode, space.max_t)
    print_summary(ranked, results, space.searched_keys(), space.metric, space.max_t)
    out = capsys.readouterr().out
    assert out.splitlines()[2].split() == ["trial", "lr", "variant", "epochs", "best_val_auc", "test_auc", "test_acc"]
    best = next(line for line in out.splitlines() if line.startswith("best config:"))
    assert json.loads(best.removeprefix("best config:")) == {"lr": 1e-3, "variant": "densenet121"}


def test_the_schema_example_in_the_docstring_is_a_valid_space():
    """The example block of search_spaces' docstring, parsed as a space file: what it documents is accepted."""
    block = textwrap.dedent("\n".join(line for line in search_spaces.__doc__.splitlines() if line.startswith("    ")))
    space = parse_space(yaml.safe_load(block), REPO / "example.yaml")
    assert space.variants and {"int", "choice", "loguniform", "uniform", "quniform"} == {
        kind for domain in space.params.values() for kind in domain}

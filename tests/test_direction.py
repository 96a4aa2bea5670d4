"""One rule for the direction a metric is selected in (trainables.tracking.ranking.selection_mode), at every entry:
a space file, --metric, `python -m trainables.train` and TrialConfig itself. In-process, no Ray: under a second."""

from pathlib import Path

import pytest

import trainables.train as train_cli
import tune
from search_spaces import parse_space
from trainables.config import resolve_config
from trainables.errors import UserError
from trainables.tracking.state import write_state

SPACE = {"description": "x", "dataset": "pneumoniamnist", "fixed": {"model": "simple_cnn"}}


@pytest.mark.parametrize("metric, mode", [("val_loss", "min"), ("val_hamming_loss", "min"), ("val_auc", "max"),
                                          ("val_balanced_acc", "max")])
def test_a_space_file_without_mode_selects_in_its_metric_direction(metric, mode):
    space = parse_space({**SPACE, "metric": metric}, Path("mine.yaml"))
    assert space.mode == mode and space.base_config()["mode"] == mode  # the searcher, ASHA and every trial
    assert parse_space(space.as_dict(), Path("mine.yaml")).mode == mode  # the state file's copy, read by a resume


def test_a_space_file_whose_mode_contradicts_its_metric_is_one_line_naming_the_key():
    with pytest.raises(UserError) as caught:
        parse_space({**SPACE, "metric": "val_loss", "mode": "max"}, Path("mine.yaml"))
    assert str(caught.value) == ("mine.yaml: mode: mode max contradicts metric val_loss, where lower is better; "
                                 "use mode min or leave mode out")


def test_trial_config_mode_defaults_to_the_metric_direction_and_refuses_a_contradiction():
    assert resolve_config({"metric": "val_loss"})["mode"] == "min"
    assert resolve_config({})["mode"] == "max"  # val_auc
    assert resolve_config({"metric": "val_loss", "mode": "min"})["mode"] == "min"
    with pytest.raises(UserError, match="^mode max contradicts metric val_loss, where lower is better"):
        resolve_config({"metric": "val_loss", "mode": "max"})


def test_the_training_cli_follows_the_metric_direction(monkeypatch, capsys):
    seen = []
    monkeypatch.setattr(train_cli, "train", lambda config, report: seen.append(config) or {})
    assert train_cli.main(["--set", "metric=val_loss", "model=simple_cnn"]) == 0
    assert seen[0]["mode"] == "min"  # each epoch's best is the lowest loss
    assert train_cli.main(["--set", "metric=val_loss", "mode=max"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "mode max contradicts metric val_loss" in err


def test_resume_refuses_a_search_saved_with_the_old_wrong_direction(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write_state("medtune_results", "old", {"space": {**SPACE, "metric": "val_loss", "mode": "max"},
                                           "space_name": "mine", "seed": 0, "tracking_uri": "sqlite:///x.db"})
    assert tune.main(["--resume", "old"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Search 'old' was started with mode max for metric val_loss" in err

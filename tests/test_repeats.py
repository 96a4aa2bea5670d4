"""No configuration runs twice: the searcher tune.py builds, driven directly (suggest / on_trial_complete) over a tiny
discrete space where repeats are forced, with a fake objective (no training, no Ray cluster)."""

from __future__ import annotations

from pathlib import Path

import pytest
from optuna.trial import TrialState

from search_spaces import parse_space
from search_spaces.searcher import REPEAT_OF
from search_spaces.tuner import make_searcher
from trainables.errors import UserError

# 2 x 2 x 2 = 8 configurations; TPE after 2 start-up trials
TINY = {"description": "repeats", "dataset": "pneumoniamnist", "metric": "val_auc", "num_samples": 6,
        "fixed": {"model": "simple_cnn"},
        "params": {"lr": {"choice": [0.01, 0.1]}, "batch_size": {"choice": [32, 64]},
                   "loss_weighting": {"choice": ["none", "inverse"]}}}


def score(config: dict) -> float:
    return config["lr"] * 10 + (config["batch_size"] == 32) * 0.1 + (config["loss_weighting"] == "inverse") * 0.01


def drive(searcher, trials: int, concurrent: int = 2) -> list:
    """`trials` suggestions, `concurrent` running at a time, each told its fake best_val_auc when it ends, as Ray's
    ConcurrencyLimiter and TuneController do. Returns the configurations that ran (stops at FINISHED)."""
    searcher.set_search_properties(None, None, parse_space(TINY, Path("tiny.yaml")).param_space())
    ran, running = [], []
    for number in range(trials):
        config = searcher.suggest(f"t{number}")
        if config == "FINISHED":
            break
        ran.append(config)
        running.append((f"t{number}", config))
        if len(running) == concurrent:
            trial_id, done = running.pop(0)
            searcher.on_trial_complete(trial_id, {"best_val_auc": score(done)})
    return ran


def searched(config: dict) -> tuple:
    return tuple(config[key] for key in TINY["params"])


@pytest.mark.parametrize("seed", range(5))
def test_no_configuration_runs_twice(seed):
    """Plain OptunaSearch with the same sampler repeats 2-3 of 8 here, for every one of these seeds."""
    ran = drive(make_searcher(parse_space(TINY, Path("tiny.yaml")), seed), trials=8)
    assert len(ran) == 8 and len({searched(c) for c in ran}) == 8


def test_a_repeat_is_told_to_optuna_with_the_earlier_trials_result():
    searcher = make_searcher(parse_space(TINY, Path("tiny.yaml")), 0)
    drive(searcher, trials=8)
    trials = searcher._ot_study.get_trials(deepcopy=False)
    repeats = [t for t in trials if REPEAT_OF in t.user_attrs]
    assert repeats, "the space forces repeats; none was proposed"
    for repeat in repeats:
        earlier = trials[repeat.user_attrs[REPEAT_OF]]
        assert repeat.params == earlier.params and earlier.number < repeat.number
        if earlier.state == TrialState.COMPLETE and repeat.state == TrialState.COMPLETE:
            assert repeat.value == earlier.value  # TPE sees the point scored as it was
        else:  # it repeated a trial still running: no value to copy, so it is failed (TPE ignores it)
            assert repeat.state == TrialState.FAIL


def test_search_stops_proposing_when_every_configuration_was_tried(capsys):
    ran = drive(make_searcher(parse_space(TINY, Path("tiny.yaml")), 1), trials=12)
    assert len(ran) == 8 and len({searched(c) for c in ran}) == 8
    assert "proposed only configurations already tried" in capsys.readouterr().out


def test_sampler_settings_are_stated_not_defaulted():
    """Optuna 5.x defaults to multivariate TPE with the constant liar; older versions the space admits did not."""
    sampler = make_searcher(parse_space(TINY, Path("tiny.yaml")), 0)._sampler
    assert (sampler._multivariate, sampler._constant_liar, sampler._group) == (True, True, False)


def test_space_refuses_a_point_given_twice():
    points = [{"lr": 0.01, "batch_size": 32, "loss_weighting": "none"},
              {"lr": 0.1, "batch_size": 32, "loss_weighting": "none"},
              {"lr": 0.01, "batch_size": 32, "loss_weighting": "none"}]
    with pytest.raises(UserError, match=r"^tiny.yaml: points_to_evaluate\[2\]: repeats points_to_evaluate\[0\]; "
                                        r"drop one$"):
        parse_space({**TINY, "points_to_evaluate": points}, Path("tiny.yaml"))

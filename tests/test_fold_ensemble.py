"""A cross-validated winner's `--ensemble` is its K fold models (analysis.ensemble.decide_folds): each with its
own fold's split and temperature, TTA chosen on out-of-fold predictions, the shipped network the mean of the fold
models' calibrated probabilities, and test never read while choosing.

One small 3-fold trial (toy data, 1 thread, a few seconds) logged as tune.py logs a search; replay's dataset
loader answers with the toy data.
"""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from conftest import toy_dataset
from sklearn.metrics import roc_auc_score
from test_analysis import TOY, log_search, run_main

import analysis.replay
from analysis import export, predict
from analysis.calibration import calibrated, fit_temperature
from analysis.ensemble import decide_folds, fold_members
from trainables.config import resolve_config
from trainables.data.datasets import Dataset, ImageSet
from trainables.data.normalization import Normalization
from trainables.data.splits import cv_fold_indices
from trainables.training.checkpoint import fold_weights, save_checkpoint
from trainables.training.epochs import iterate_epochs
from trainables.training.split_run import build_model, eval_loader, predict_logits

K = 3
CONFIG = {k: v for k, v in TOY.items() if k != "split_ratio"} | {"cv_folds": K, "epochs": 2}
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def cv_search(tmp_path_factory, mlflow_store):
    torch.set_num_threads(1)
    data = noisy(toy_dataset("binary", n_dev=180, n_test=80))
    tmp = tmp_path_factory.mktemp("fold_ensemble")
    *_, last = iterate_epochs(resolve_config(CONFIG), data)
    save_checkpoint(last.state, tmp / "trial_cv")
    uri = mlflow_store(tmp)
    # a second, single-split trial ranked next: a CV winner's ensemble must not take it
    logged = [{"trial_id": "trial_cv", "metrics": {**last.metrics, "best_val_auc": 0.99}, "params": {"lr": 3e-3},
               "checkpoint": tmp / "trial_cv"},
              {"trial_id": "trial_next", "metrics": {"best_val_auc": 0.98}, "params": {"lr": 1e-2}, "checkpoint": None}]
    log_search(uri, "cvens", logged, {"metric": "val_auc", "mode": "max", "params": {"lr": {"choice": [3e-3, 1e-2]}}})
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(analysis.replay, "load_dataset", lambda spec, **kwargs: data)
        yield SimpleNamespace(tmp=tmp, uri=uri, data=data, state=last.state)


def noisy(data: Dataset, share: float = 0.2) -> Dataset:
    """`data` with a `share` of its labels redrawn at random: folds that disagree, probabilities not saturated."""
    rng = np.random.default_rng(1)

    def redraw(images: ImageSet) -> ImageSet:
        labels = np.where(rng.random(len(images.labels)) < share, rng.integers(0, 2, len(images.labels)), images.labels)
        return ImageSet(images.images, labels, images.groups)

    return Dataset(data.name, data.task, data.class_names, redraw(data.dev), redraw(data.test), data.official_val)


def fold_logits(cv_search, fold: int, images) -> np.ndarray:
    """Fold model `fold`'s logits, computed apart from analysis: its weights and its own normalisation."""
    model = build_model(resolve_config(CONFIG), cv_search.data)
    model.load_state_dict(fold_weights(cv_search.state)[fold])
    norm = Normalization.from_meta(cv_search.state["folds"][fold]["dataset"])
    return predict_logits(model.eval(), eval_loader(images, 512, CPU, norm), CPU)[0]


def test_a_cv_winners_ensemble_ships_its_fold_models_and_their_mean(cv_search):
    data, out = cv_search.data, cv_search.tmp / "export"
    code, stdout, stderr = run_main(export, "--robustness-images", 32,
                                    "--search", "cvens", "--tracking-uri", cv_search.uri, "--out", out,
                                    "--n-resamples", 20, "--ensemble", 2)
    assert code == 0, stdout + stderr
    assert "--ensemble 2 uses its 3 fold models, not other trials" in stdout
    manifest = json.loads((out / "ensemble.json").read_text())
    best = cv_search.state["best_fold"]
    assert [m["label"] for m in manifest["members"]] == \
        [f"trial_cv/fold{f}" for f in [best, *(f for f in range(K) if f != best)]]
    assert manifest["network"] == "ensemble" and manifest["members_are"] == "folds" and manifest["variant"] == "ensemble"
    assert "fixed before any score is seen" in manifest["choice"]["reason"]

    folds = cv_fold_indices(data, K, seed=0)
    temperatures, expected, oof = {}, [], np.zeros((len(data.dev), 2))
    for fold, (_, held_out) in enumerate(folds):  # each temperature fitted on the fold's own held-out images
        held = data.dev.subset(held_out)
        temperatures[fold] = fit_temperature(fold_logits(cv_search, fold, held), held.labels, "binary")
        oof[held_out] = calibrated(fold_logits(cv_search, fold, held), "binary", temperatures[fold])
        expected.append(calibrated(fold_logits(cv_search, fold, data.test), "binary", temperatures[fold]))
    for member in manifest["members"]:
        assert member["temperature"] == pytest.approx(temperatures[int(member["label"][-1])], rel=1e-9)
    # the choice is made on out-of-fold predictions: every development image, by the model that held it out
    variants = manifest["choice"]["variants"]
    assert variants["single"]["value"] == pytest.approx(roc_auc_score(data.dev.labels, oof[:, 1]), abs=1e-9)
    assert manifest["choice"]["n_val"] == len(data.dev) and "out-of-fold" in manifest["choice"]["rule"]
    assert variants["ensemble"]["gap_to_best"] is None and variants["ensemble"]["passes"] == K

    shipped = predict.load_model(out)  # the folder as analysis.predict loads it
    inputs = Normalization.from_meta(cv_search.state["dataset"])(torch.from_numpy(data.test.images).permute(0, 3, 1, 2))
    with torch.no_grad():
        probs = calibrated(shipped(inputs).numpy().astype(np.float64), "binary", 1.0)
    assert np.allclose(probs, np.mean(expected, axis=0), atol=1e-6)
    decision = json.loads((out / "decision.json").read_text())
    assert decision["fitted_on"].startswith("out-of-fold predictions of the 3")
    # the average's own temperature: fitted on the out-of-fold probabilities, the card's claim
    assert decision["temperature"] == pytest.approx(fit_temperature(np.log(oof), data.dev.labels, "binary"), rel=1e-4)
    assert "divided by T = " + format(decision["temperature"], ".4f") in (out / "model_card.md").read_text()
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["reproduced"]["ok"]  # the best fold model alone still reproduces the logged test metrics


def test_the_fold_choice_never_reads_the_test_split(cv_search, monkeypatch):
    def spy(self):
        raise AssertionError("the test split was read while choosing")

    monkeypatch.setattr(analysis.replay.Replay, "test", property(spy))
    members = fold_members(cv_search.state, "trial_cv")
    choice = decide_folds(members, tta=True, ensemble=True, metric="best_val_auc", mode="max", n_resamples=50)
    assert choice.chosen in ("ensemble", "ensemble+tta") and choice.chosen_members == K
    assert set(choice.decision["variants"]) == {"single", "single+tta", "ensemble", "ensemble+tta"}
    # TTA follows the out-of-fold one-SE rule between the single variants
    tta_chosen = choice.decision["best"] == "single+tta" and choice.decision["variants"]["single"]["gap_to_best"] > \
        choice.decision["variants"]["single"]["se_of_gap"]
    assert choice.tta == tta_chosen
    # fold models normalised differently see different inputs: not averaged, and the lines say why
    state = cv_search.state
    other = {**state["folds"][1], "dataset": {**state["folds"][1]["dataset"], "mean": [0.4]}}
    unlike = {**state, "folds": [state["folds"][0], other, *state["folds"][2:]]}
    choice = decide_folds(fold_members(unlike, "t"), tta=False, ensemble=True, metric="best_val_auc", mode="max",
                          n_resamples=20)
    assert choice.chosen == "single" and "fold models not averaged" in "\n".join(choice.lines())

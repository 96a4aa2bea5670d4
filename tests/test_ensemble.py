"""Ensembles and flip TTA at export (analysis.ensemble, analysis.ensemble_model): members that may join, the
validation-only choice, and the exported ensemble reproducing its members' replayed, calibrated probabilities.

Four toy trials (real `iterate_epochs` checkpoints, a few seconds) logged as tune.py logs a search, each
checkpoint folder with the validation and test predictions a Ray trial leaves there; replay's dataset loader
answers with the toy data. The export's default rule, ensemble selection (analysis.handover), reads the kept
validation predictions; `--ensemble-rule topk` is the older rule.
"""

from __future__ import annotations

import json
from types import SimpleNamespace

import mlflow
import numpy as np
import pytest
import torch
from conftest import hide_the_export_extra, toy_dataset
from sklearn.metrics import roc_auc_score
from test_analysis import TOY, log_search, run_main, write_pngs

import analysis.ensemble
import analysis.handover
import analysis.replay
import analysis.runs
from analysis import export, predict
from analysis.calibration import calibrated, fit_temperature
from analysis.ensemble import Member, choose, decide, mismatch
from analysis.ensemble_model import flip_shift
from analysis.replay import replay
from trainables.config import resolve_config
from trainables.data.datasets import ImageSet
from trainables.training.checkpoint import save_checkpoint
from trainables.training.epochs import iterate_epochs
from trainables.training.figures import write_test_predictions, write_val_predictions

# mean_image normalisation: flipping a normalised image must not flip the mean (the Ensemble's `shift`)
CONFIG = TOY | {"normalize": "mean_image", "epochs": 2}
# (trial id, its own settings, the validation score it is ranked by): trial_b trained on another split
TRIALS = [("trial_a", {"lr": 3e-3}, 0.99), ("trial_b", {"lr": 3e-3, "split_ratio": 0.6}, 0.98),
          ("trial_c", {"lr": 1e-2}, 0.97), ("trial_d", {"lr": 1e-3}, 0.96)]


@pytest.fixture(scope="module")
def search(tmp_path_factory, mlflow_store):
    data = toy_dataset("binary", n_dev=200, n_test=80)
    tmp = tmp_path_factory.mktemp("ensemble")
    logged, states = [], {}
    for trial_id, changes, score in TRIALS:
        *_, last = iterate_epochs(resolve_config(CONFIG | changes), data)
        save_checkpoint(last.state, tmp / trial_id)
        write_val_predictions(tmp / trial_id, data.task, data.class_names, last.val_predictions,
                              last.state["config"], last.state["dataset"])
        write_test_predictions(tmp / trial_id, data.task, data.class_names, last.test_labels, last.test_probs)
        states[trial_id] = last.state
        logged.append({"trial_id": trial_id, "metrics": {**last.metrics, "best_val_auc": score},
                       "params": {"lr": changes["lr"]}, "checkpoint": tmp / trial_id})
    uri = mlflow_store(tmp)
    log_search(uri, "ens", logged, {"metric": "val_auc", "mode": "max", "params": {"lr": {"choice": [1e-3, 3e-3, 1e-2]}}})
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(analysis.replay, "load_dataset", lambda spec, **kwargs: data)
        yield SimpleNamespace(tmp=tmp, uri=uri, data=data, states=states)


def members(search, *labels) -> list[Member]:
    return [Member(label, search.states[label], None, None) for label in labels]


def replayed_probabilities(state: dict, images: ImageSet, temperature: float, tta: bool) -> np.ndarray:
    """A member's calibrated probabilities, computed apart from analysis.ensemble: the flip is of the raw image."""
    rep = replay(state)
    probs = calibrated(rep.logits(rep.model, images)[0], "binary", temperature)
    if not tta:
        return probs
    mirrored = ImageSet(np.ascontiguousarray(images.images[:, :, ::-1]), images.labels)
    return (probs + calibrated(rep.logits(rep.model, mirrored)[0], "binary", temperature)) / 2


def test_an_ensemble_of_one_reproduces_the_single_trial(search):
    rep = replay(search.states["trial_a"])
    logits, labels = rep.logits(rep.model, rep.val)
    temperature = fit_temperature(logits, labels, "binary")
    choice = decide(members(search, "trial_a"), tta=False, metric="best_val_auc", mode="max")
    assert list(choice.decision["variants"]) == ["single"] and choice.network == "single"
    assert choice.temperatures == [temperature]
    with torch.no_grad():
        shipped = choice.module()(rep.normalization(torch.from_numpy(rep.test.images).permute(0, 3, 1, 2)))
    single = calibrated(rep.logits(rep.model, rep.test)[0], "binary", temperature)
    assert np.allclose(calibrated(shipped.numpy(), "binary", 1.0), single, atol=1e-6)


def test_the_exported_ensemble_is_the_mean_of_its_members_replayed_calibrated_probabilities(search, monkeypatch):
    """Forced to ship ensemble+tta (whatever validation says) so the whole network is exercised: predict's
    probabilities, model.ts and the manifest all agree with the members replayed one by one."""
    def forced(*args, **kwargs):
        choice = decide(*args, **kwargs)
        choice.decision["chosen"] = "ensemble+tta"
        return choice

    monkeypatch.setattr(analysis.ensemble, "decide", forced)
    out = search.tmp / "export"
    code, stdout, stderr = run_main(export, "--robustness-images", 32, "--search", "ens", "--tracking-uri", search.uri, "--out", out,
                                    "--n-resamples", 20, "--ensemble", 3, "--tta", "--ensemble-rule", "topk")
    assert code == 0, stdout + stderr
    # trial_b trained on another split: skipped with the reason, and trial_d fills its place
    assert "skipped trial trial_b: split_ratio 0.6, not 0.75" in stdout
    manifest = json.loads((out / "ensemble.json").read_text())
    assert [m["label"] for m in manifest["members"]] == ["trial_a", "trial_c", "trial_d"]
    assert manifest["network"] == "ensemble" and manifest["tta"] and not (out / "model.safetensors").exists()
    assert set(manifest["choice"]["variants"]) == {"single", "single+tta", "ensemble", "ensemble+tta"}
    decision = json.loads((out / "decision.json").read_text())

    test = search.data.test
    expected = np.mean([replayed_probabilities(search.states[m["label"]], test, m["temperature"], tta=True)
                        for m in manifest["members"]], axis=0)
    for member in manifest["members"]:  # each temperature is the member's own, fitted on validation
        rep = replay(search.states[member["label"]])
        assert member["temperature"] == fit_temperature(*rep.logits(rep.model, rep.val), "binary")
    # and the average gets its own, fitted on the validation split as the card says: the calibration rows move
    val = replay(search.states["trial_a"]).val
    averaged = np.mean([replayed_probabilities(search.states[m["label"]], val, m["temperature"], tta=True)
                        for m in manifest["members"]], axis=0)
    assert decision["temperature"] == pytest.approx(fit_temperature(np.log(averaged), val.labels, "binary"), rel=1e-4)
    calibration = json.loads((out / "metrics.json").read_text())["calibration"]
    assert calibration["val"]["nll_after"] < calibration["val"]["nll_before"]
    assert calibration["test"]["ece_after"] != calibration["test"]["ece_before"]
    card = (out / "model_card.md").read_text()
    assert f"is divided by T = {decision['temperature']:.4f}, fitted on\nthe validation split" in card
    # analysis.predict on PNG files: the ensemble is loaded transparently (its own preprocessing, mean image)
    pngs = write_pngs(test.images[:8], search.tmp / "png")
    code, stdout_png, stderr = run_main(predict, "--model", out, "--json", *pngs)
    assert code == 0, stderr
    predicted = [[json.loads(line)["probabilities"][n] for n in search.data.class_names] for line in stdout_png.splitlines()]
    assert np.allclose(predicted, calibrated(np.log(expected[:8]), "binary", decision["temperature"]), atol=1e-6)
    inputs = replay(search.states["trial_a"]).normalization(torch.from_numpy(test.images).permute(0, 3, 1, 2))
    with torch.no_grad():
        traced = calibrated(torch.jit.load(str(out / "model.ts"))(inputs).numpy().astype(np.float64), "binary", 1.0)
    assert np.allclose(traced, expected, atol=1e-6)
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["test"]["argmax"]["auc"]["value"] == pytest.approx(roc_auc_score(test.labels, expected[:, 1]), abs=1e-6)
    assert metrics["reproduced"]["ok"]  # the winner alone still reproduces its logged test metrics
    assert "ensemble+tta" in (out / "model_card.md").read_text()
    # model.onnx is the whole ensemble (members, their temperatures, the flip, then the ensemble's own temperature):
    # onnxruntime's calibrated probabilities are the members' replayed ones, and predict --runtime onnx agrees
    assert metrics["onnx"]["ok"] and metrics["onnx"]["images"] == len(val.labels) and "model.onnx: matches" in stdout
    onnxruntime = pytest.importorskip("onnxruntime")
    session = onnxruntime.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    onnx_probs = session.run(None, {"input": inputs.numpy()})[0]
    assert np.abs(onnx_probs - calibrated(np.log(expected), "binary", decision["temperature"])).max() <= 1e-4
    code, onnx_stdout, stderr = run_main(predict, "--model", out, "--json", "--runtime", "onnx", *pngs)
    assert code == 0, stderr
    assert [json.loads(line)["label"] for line in onnx_stdout.splitlines()] == [json.loads(line)["label"]
                                                                                for line in stdout_png.splitlines()]


def test_the_choice_never_reads_the_test_split(search, monkeypatch):
    def spy(self):
        raise AssertionError("the test split was read while choosing")

    monkeypatch.setattr(analysis.replay.Replay, "test", property(spy))
    choice = decide(members(search, "trial_a", "trial_c"), tta=True, metric="best_val_auc", mode="max", n_resamples=100)
    monkeypatch.undo()
    assert choice.chosen in choice.decision["variants"]
    assert choice.decision["n_val"] == len(replay(search.states["trial_a"]).val_index)


def test_mismatched_members_are_refused_with_the_reason(search):
    a = search.states["trial_a"]
    assert mismatch(a, search.states["trial_c"]) is None
    assert mismatch(a, {**a, "config": {**a["config"], "image_size": 32}}) == "image_size 32, not 16"
    half = {**a["dataset"], "normalize": "half", "mean_image": None}
    assert mismatch(a, {**a, "dataset": half}).startswith("normalize 'half', not 'mean_image'")
    shifted = {**a["dataset"], "mean_image": a["dataset"]["mean_image"] + 0.01}
    assert mismatch(a, {**a, "dataset": shifted}) == "a different mean image"
    code, _, stderr = run_main(export, "--search", "ens", "--tracking-uri", search.uri, "--out", search.tmp / "bad",
                               "--ensemble", 0)
    assert code == 2 and "--ensemble 0" in stderr and stderr.count("\n") == 1


def test_one_se_rule_keeps_the_cheaper_variant_unless_the_richer_is_clearly_better():
    rng = np.random.default_rng(2)
    labels = rng.integers(0, 2, 400)
    noisy = np.clip(labels * 0.2 + rng.random(400) * 0.8, 0, 1)  # AUC ~0.76
    binary = lambda p: np.stack([1 - p, p], axis=1)  # noqa: E731
    nudge = np.clip(noisy + 0.003 * labels + rng.normal(0, 0.05, 400), 0, 1)  # a hair better, within the noise
    sharp = np.clip(labels * 0.6 + rng.random(400) * 0.4, 0, 1)  # AUC ~1
    same = choose(labels, {"single": (binary(noisy), 1), "ensemble": (binary(nudge), 3)}, "val_auc", "max", "binary",
                  n_resamples=200)
    assert same["best"] == "ensemble" and same["chosen"] == "single"
    assert 0 < same["variants"]["single"]["gap_to_best"] <= same["variants"]["single"]["se_of_gap"]
    better = choose(labels, {"single": (binary(noisy), 1), "ensemble": (binary(sharp), 3)}, "val_auc", "max", "binary",
                    n_resamples=200)
    assert better["chosen"] == "ensemble" and better["variants"]["single"]["gap_to_best"] > \
        better["variants"]["single"]["se_of_gap"] > 0
    lossy = choose(labels, {"single": (binary(noisy), 1), "ensemble": (binary(sharp), 3)}, "val_loss", "min", "binary",
                   n_resamples=200)
    assert lossy["chosen"] == "ensemble" and lossy["metric"] == "NLL"


@pytest.mark.parametrize("order", [("broken", "fine"), ("fine", "broken")])
def test_a_variant_whose_validation_score_is_nan_never_wins_whatever_its_place(order):
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, 200)
    fine = np.clip(labels * 0.3 + rng.random(200) * 0.7, 0, 1)
    probs = {"fine": np.stack([1 - fine, fine], axis=1), "broken": np.full((200, 2), np.nan)}  # its AUC: NaN
    choice = choose(labels, {name: (probs[name], 1) for name in order}, "val_auc", "max", "binary", n_resamples=50)
    assert choice["best"] == choice["chosen"] == "fine"


def test_flip_shift_makes_flipping_a_normalised_image_equal_normalising_the_flipped_image():
    from trainables.data.normalization import Normalization

    mean = torch.rand(1, 4, 4)
    norm = Normalization("mean_image", mean, torch.full((1, 1, 1), 0.3))
    image = torch.randint(0, 255, (2, 1, 4, 4), dtype=torch.uint8)
    flipped_then_normalised = norm(torch.flip(image, dims=(3,)))
    assert torch.allclose(torch.flip(norm(image), dims=(3,)) - flip_shift(norm), flipped_then_normalised, atol=1e-6)
    assert not torch.allclose(torch.flip(norm(image), dims=(3,)), flipped_then_normalised, atol=1e-3)  # needed


# --- ensemble selection, the default rule (analysis.handover) -------------------------------------------

def selection_of(monkeypatch, counts: list[int] | None, ships_ensemble: bool = False) -> None:
    """Make greedy selection return `counts` over the candidates (the winner trial_a first, then trial_c and
    trial_d: trial_b is on another split), and with `ships_ensemble` make the rule keep the ensemble."""
    if counts is not None:
        monkeypatch.setattr(analysis.handover, "greedy", lambda *args, **kwargs: (np.array(counts), [0.1]))
    if ships_ensemble:
        monkeypatch.setattr(analysis.handover, "paired_se", lambda *args, **kwargs: float("inf"))


def exported_probabilities(out, search) -> np.ndarray:
    """The export's probabilities at temperature 1 on the test images, as analysis.predict's network computes
    them (an ensemble's output is the log of its weighted mean probability); inputs normalised as the winner's."""
    inputs = replay(search.states["trial_a"]).normalization(torch.from_numpy(search.data.test.images).permute(0, 3, 1, 2))
    with torch.no_grad():
        return calibrated(predict.load_model(out)(inputs).numpy().astype(np.float64), "binary", 1.0)


def test_a_selection_of_one_member_exports_the_single_model(search, monkeypatch):
    """Also: the first export runs as after `pip install -e .` (no export extra): one line names the fix, an earlier
    model.onnx is gone, the rest is written."""
    alone, one = search.tmp / "alone", search.tmp / "one"
    one.mkdir()
    (one / "model.onnx").write_bytes(b"an earlier export's file")
    hide_the_export_extra(monkeypatch)
    code, stdout, stderr = run_main(export, "--robustness-images", 32, "--search", "ens", "--tracking-uri", search.uri, "--out", one,
                                    "--n-resamples", 20, "--ensemble", 1)
    monkeypatch.undo()
    assert code == 0, stdout + stderr
    assert "chosen: single -- --ensemble 1 asks for the winner alone" in stdout
    said = "onnxscript, onnxruntime not installed; pip install -e '.[export]' to write model.onnx"
    assert f"model.onnx: not written ({said})" in stdout.splitlines()
    assert not (one / "model.onnx").exists() and json.loads((one / "metrics.json").read_text())["onnx"] == {"skipped": said}
    assert f"`model.onnx`: not written ({said})." in (one / "model_card.md").read_text()
    selection_of(monkeypatch, [1, 0, 0])
    code, stdout, stderr = run_main(export, "--robustness-images", 32, "--search", "ens", "--tracking-uri", search.uri, "--out", alone,
                                    "--n-resamples", 20)
    assert code == 0, stdout + stderr
    assert "chosen: single -- selection kept the winner alone" in stdout
    assert (alone / "model.safetensors").exists() and not (alone / "members").exists()
    assert json.loads((alone / "ensemble.json").read_text())["network"] == "single"
    assert json.loads((alone / "decision.json").read_text()) == json.loads((search.tmp / "one" / "decision.json").read_text())
    assert np.array_equal(exported_probabilities(alone, search), exported_probabilities(search.tmp / "one", search))
    parent = analysis.runs.get_search(mlflow.MlflowClient(search.uri), "ens")
    assert "**single**: `trial_a` (weight 1.00)." in parent.data.tags["mlflow.note.content"]


def test_selected_weights_sum_to_one_and_the_export_is_the_weighted_mean_of_its_members(search, monkeypatch):
    """Selection forced to trial_a x3 + trial_c x1 and the rule to keep it: the manifest, the network, the card
    and the search's description carry the weights 0.75 / 0.25."""
    selection_of(monkeypatch, [3, 1, 0], ships_ensemble=True)
    out = search.tmp / "selected"
    code, stdout, stderr = run_main(export, "--robustness-images", 32, "--search", "ens", "--tracking-uri", search.uri, "--out", out,
                                    "--n-resamples", 20)
    assert code == 0, stdout + stderr
    assert "skipped trial trial_b: split_ratio 0.6, not 0.75" in stdout
    assert "chosen: ensemble -- on the held-back half the selected ensemble (trial_a 0.75, trial_c 0.25)" in stdout
    manifest = json.loads((out / "ensemble.json").read_text())
    members = manifest["members"]
    assert [(m["label"], m["weight"]) for m in members] == [("trial_a", 0.75), ("trial_c", 0.25)]
    assert sum(m["weight"] for m in members) == pytest.approx(1.0)
    expected = sum(m["weight"] * replayed_probabilities(search.states[m["label"]], search.data.test, m["temperature"],
                                                        tta=False) for m in members)
    assert np.allclose(exported_probabilities(out, search), expected, atol=1e-6)
    # the toy task is separable, so calibrated probabilities are nearly 0 or 1 whatever the weights: softened
    # temperatures in the manifest show that the network weighs its members as the manifest says
    soft = {**manifest, "members": [{**m, "temperature": 20.0} for m in members]}
    (out / "ensemble.json").write_text(json.dumps(soft))
    probs = [replayed_probabilities(search.states[m["label"]], search.data.test, 20.0, tta=False) for m in members]
    assert np.allclose(exported_probabilities(out, search), 0.75 * probs[0] + 0.25 * probs[1], atol=1e-6)
    assert not np.allclose(0.75 * probs[0] + 0.25 * probs[1], (probs[0] + probs[1]) / 2, atol=1e-3)
    for member in members:  # each temperature fitted on the whole validation split (the kept logits)
        rep = replay(search.states[member["label"]])
        assert member["temperature"] == pytest.approx(fit_temperature(*rep.logits(rep.model, rep.val), "binary"),
                                                      rel=1e-3)
    assert "`trial_a` weight 0.75, `trial_c` weight 0.25" in (out / "model_card.md").read_text()
    assert json.loads((out / "metrics.json").read_text())["onnx"]["ok"]  # the weighted network, checked on validation
    client = mlflow.MlflowClient(search.uri)
    parent = analysis.runs.get_search(client, "ens")
    note = parent.data.tags["mlflow.note.content"]
    assert "### Hand-over (the model that ships)" in note and "`trial_a` (weight 0.75), `trial_c` (weight 0.25)" in note


def test_selection_never_reads_the_test_split(search, monkeypatch):
    """A spy on the replayed test split and on every file load: choosing touches neither the test images nor the
    test predictions each trial keeps beside its validation ones."""
    opened = []
    real_load = np.load

    def load(path, *args, **kwargs):
        opened.append(str(path))
        assert "test_predictions" not in str(path), "the test predictions were read while choosing"
        return real_load(path, *args, **kwargs)

    def spy(self):
        raise AssertionError("the test split was read while choosing")

    monkeypatch.setattr(np, "load", load)
    monkeypatch.setattr(analysis.replay.Replay, "test", property(spy))
    client = mlflow.MlflowClient(search.uri)
    parent = analysis.runs.get_search(client, "ens")
    choice = analysis.handover.choose_handover(client, parent, analysis.runs.search_space(client, parent), 3, False,
                                               n_resamples=50)
    monkeypatch.undo()
    assert any("val_predictions" in path for path in opened)  # it did read the kept validation predictions
    assert choice.chosen in ("single", "ensemble") and sum(choice.decision["weights"]) == pytest.approx(1.0)
    assert choice.decision["selection"]["candidates"] == ["trial_a", "trial_c", "trial_d"]


def test_when_the_rule_ships_the_single_winner_the_hand_over_lists_it_alone_at_weight_one(search, monkeypatch):
    """Selection mixed the winner 3:1 with trial_c, the rule sent the winner alone: what the description shows is
    the winner at weight 1, not its share in the ensemble that did not ship."""
    selection_of(monkeypatch, [3, 1, 0])
    monkeypatch.setattr(analysis.handover, "paired_se", lambda *args, **kwargs: float("-inf"))  # any gap is too big
    client = mlflow.MlflowClient(search.uri)
    parent = analysis.runs.get_search(client, "ens")
    choice = analysis.handover.choose_handover(client, parent, analysis.runs.search_space(client, parent), 3, False,
                                               n_resamples=20)
    assert choice.chosen == "single" and choice.weights == [0.75, 0.25]
    assert analysis.handover.handover_record(choice)["members"] == [{"label": "trial_a", "weight": 1.0}]

"""Ensemble selection (analysis.selection) and the hand-over rule (analysis.handover.select), on constructed
predictions: no training, no data, well under a second each."""

from __future__ import annotations

import numpy as np
import pytest

from analysis.calibration import nll_of_probs
from analysis.handover import Candidate, select
from analysis.selection import greedy, halves, weighted


def nll(labels, probs):
    return nll_of_probs(probs, labels, "binary")


def binary(p_true: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """(n, 2) probabilities giving the true class `p_true`."""
    p1 = np.where(labels == 1, p_true, 1 - p_true)
    return np.stack([1 - p1, p1], axis=1)


def test_greedy_selection_with_replacement_finds_the_best_mix_of_complementary_models():
    """A is right on two thirds of the images, B on the rest, C mediocre everywhere: the best ensemble mixes A and
    B about 2:1 (found by a grid over the weight), which takes adding A more than once; C never joins."""
    labels = np.tile([0, 1], 150)
    first = np.arange(300) < 200
    a = binary(np.where(first, 0.95, 0.3), labels)
    b = binary(np.where(first, 0.3, 0.95), labels)
    c = binary(np.full(300, 0.6), labels)
    counts, path = greedy([c, a, b], labels, nll, "min", steps=25)
    weights = counts / counts.sum()
    grid = np.linspace(0, 1, 1001)
    best_w = grid[np.argmin([nll(labels, w * a + (1 - w) * b) for w in grid])]
    assert counts[0] == 0 and counts[1] > counts[2] > 0 and counts[1] >= 2  # with replacement
    assert weights[1] == pytest.approx(best_w, abs=0.05)
    assert path[-1] == min(path) == pytest.approx(nll(labels, weighted([c, a, b], weights)))


def test_greedy_stops_at_the_best_step_and_keeps_one_model_when_no_mix_helps():
    labels = np.tile([0, 1], 50)
    strong, weak = binary(np.full(100, 0.9), labels), binary(np.full(100, 0.7), labels)
    counts, path = greedy([weak, strong, strong.copy()], labels, nll, "min")
    assert counts.tolist() == [0, 1, 0] and len(path) == 1  # the first of equals, and no padding steps
    capped, _ = greedy([binary(np.where(np.arange(100) < 50, 0.95, 0.3), labels),
                        binary(np.where(np.arange(100) < 50, 0.3, 0.95), labels), weak], labels, nll, "min",
                       max_members=1)
    assert np.count_nonzero(capped) == 1


def test_halves_are_seeded_stratified_and_disjoint():
    labels = np.r_[np.zeros(60, int), np.ones(20, int)]
    pick, check = halves(labels, seed=3)
    assert sorted(np.r_[pick, check].tolist()) == list(range(80)) and len(pick) == 40
    assert labels[pick].sum() == 10 and labels[check].sum() == 10
    again, _ = halves(labels, seed=3)
    assert np.array_equal(pick, again)


def kept(labels: np.ndarray, probs: np.ndarray) -> dict:
    return {"task": "binary", "labels": labels, "logits": np.log(np.clip(probs, 1e-9, 1)), "index": np.arange(len(labels))}


def test_the_rule_ships_the_single_winner_when_the_ensemble_is_clearly_worse_on_the_held_back_half():
    """A candidate that is excellent on the selection half and poor on the other (what overfitting a small
    validation split looks like) is selected there, and the held-back half sends the single winner."""
    labels = np.tile([0, 1], 200)
    pick, check = halves(labels, seed=0)
    on_pick = np.isin(np.arange(400), pick)
    winner = kept(labels, binary(np.where(np.arange(400) % 5 == 0, 0.35, 0.8), labels))  # wrong on a fifth
    lucky = kept(labels, binary(np.where(on_pick, 0.99, 0.2), labels))
    decision = select([Candidate("w", "1", 0.2, winner), Candidate("lucky", "2", 0.3, lucky)], "best_val_loss", "min",
                      k=5, seed=0, n_resamples=200)
    assert decision["weights"][1] > 0.5  # selection on its half took the lucky one
    assert decision["chosen"] == "single"
    gap = decision["variants"]["ensemble"]["value"] - decision["variants"]["single"]["value"]
    assert gap > decision["variants"]["ensemble"]["se_of_gap"] > 0
    assert "more than one SE" in decision["reason"] and "the single winner ships" in decision["reason"]


def test_the_rule_ships_the_ensemble_when_it_is_not_clearly_worse():
    labels = np.tile([0, 1], 200)
    half = np.arange(400) % 4 < 2
    a = kept(labels, binary(np.where(half, 0.95, 0.35), labels))
    b = kept(labels, binary(np.where(half, 0.35, 0.95), labels))
    decision = select([Candidate("a", "1", 0.2, a), Candidate("b", "2", 0.3, b)], "best_val_loss", "min", k=5,
                      n_resamples=200)
    assert decision["chosen"] == "ensemble" and sum(decision["weights"]) == pytest.approx(1.0)
    assert all(w > 0 for w in decision["weights"]) and "the ensemble ships" in decision["reason"]
    assert decision["metric"] == "NLL"  # val_loss is scored as the calibrated probabilities' log loss

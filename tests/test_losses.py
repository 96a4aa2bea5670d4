import numpy as np
import pytest
import torch

from trainables.training.losses import build_loss, class_weights, positive_weights


def test_inverse_frequency_weights_balance_classes():
    labels = np.array([0] * 30 + [1] * 10)
    w = class_weights(labels, 2, "inverse", 0.999)
    assert w == pytest.approx([40 / (2 * 30), 40 / (2 * 10)])


def test_effective_number_weights_favour_the_rare_class():
    labels = np.array([0] * 300 + [1] * 10)
    w = class_weights(labels, 2, "effective", 0.99)
    assert w[1] > w[0] and w.sum() == pytest.approx(2)


def test_positive_weights_are_negatives_over_positives():
    labels = np.array([[1, 0], [0, 0], [0, 1], [0, 1]])
    assert positive_weights(labels, "inverse", 0.999) == pytest.approx([3.0, 1.0])


def test_weighted_bce_counts_positives_more():
    labels = np.array([[1], [0], [0], [0]], dtype=np.uint8)
    plain = build_loss("multilabel", labels, 1, "none", 0.999)
    weighted = build_loss("multilabel", labels, 1, "inverse", 0.999)
    logits, target = torch.zeros(1, 1), torch.ones(1, 1)
    assert weighted(logits, target).item() == pytest.approx(3 * plain(logits, target).item())


def test_wcel_betas_follow_the_batch_counts():
    from trainables.training.losses import wcel_betas

    batch = torch.tensor([[1, 0, 0], [0, 1, 0], [0, 0, 0], [1, 0, 0]], dtype=torch.float32)  # |P| = 3, |N| = 9
    beta_p, beta_n = wcel_betas(batch)
    assert beta_p.item() == pytest.approx(12 / 3) and beta_n.item() == pytest.approx(12 / 9)


def test_wcel_weighs_each_batch_by_its_own_counts():
    labels = np.array([[1, 0], [0, 0], [0, 0], [0, 0]], dtype=np.uint8)  # training labels: ignored by wcel
    wcel = build_loss("multilabel", labels, 2, "wcel", 0.999)
    logits = torch.tensor([[0.3, -1.0], [2.0, 0.5], [-0.7, 0.1]])
    targets = torch.tensor([[1.0, 0.0], [0.0, 0.0], [0.0, 1.0]])  # |P| = 2, |N| = 4
    per_entry = torch.nn.functional.binary_cross_entropy_with_logits(logits, targets, reduction="none")
    expected = (6 / 2 * per_entry[targets == 1].sum() + 6 / 4 * per_entry[targets == 0].sum()) / 6
    assert wcel(logits, targets).item() == pytest.approx(expected.item())
    # another batch, other counts: the betas are the batch's, not the training set's
    assert wcel(logits[:2], targets[:2]).item() == pytest.approx((per_entry[0, 0] + per_entry[[0, 1, 1], [1, 0, 1]].mean()).item())


def test_wcel_for_single_label_balances_the_classes_of_the_batch():
    wcel = build_loss("binary", np.array([0, 1]), 2, "wcel", 0.999)
    logits, targets = torch.randn(5, 2), torch.tensor([0, 0, 0, 0, 1])
    per_sample = torch.nn.functional.cross_entropy(logits, targets, reduction="none")
    assert wcel(logits, targets).item() == pytest.approx(((per_sample[:4].mean() + per_sample[4]) / 2).item())

import numpy as np
import pytest
import torch

from trainables.losses import build_loss, class_weights, positive_weights


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

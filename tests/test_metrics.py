import numpy as np
import pytest

from trainables.training.metrics import classification_metrics, confusion, probabilities


def test_binary_metrics_match_hand_counts():
    y = np.array([0, 0, 0, 1, 1, 1, 1, 1])
    p1 = np.array([0.1, 0.6, 0.2, 0.9, 0.8, 0.4, 0.7, 0.95])  # predictions: 0 1 0 1 1 0 1 1
    m = classification_metrics("binary", y, np.c_[1 - p1, p1])
    # TP=4 FN=1 TN=2 FP=1
    assert m["acc"] == pytest.approx(6 / 8)
    assert m["specificity"] == pytest.approx(2 / 3)
    assert m["recall_macro"] == pytest.approx((4 / 5 + 2 / 3) / 2)
    assert m["balanced_acc"] == pytest.approx((4 / 5 + 2 / 3) / 2)
    # AUC: of 15 (neg, pos) pairs only (0.6 > 0.4) is misordered
    assert m["auc"] == pytest.approx(14 / 15)
    assert confusion("binary", y, np.c_[1 - p1, p1]).tolist() == [[2, 1], [1, 4]]


def test_multilabel_exact_match_and_hamming():
    y = np.array([[1, 0, 1], [0, 1, 0], [1, 1, 0], [0, 0, 0]])
    probs = np.array([[0.9, 0.1, 0.8], [0.2, 0.7, 0.6], [0.7, 0.3, 0.1], [0.1, 0.2, 0.3]])
    m = classification_metrics("multilabel", y, probs, class_names=("Mass", "Nodule", "Pleural Thickening"))
    assert m["exact_match"] == pytest.approx(2 / 4)  # rows 0 and 3 exactly right
    assert m["hamming_loss"] == pytest.approx(2 / 12)  # row 1 label 2, row 2 label 1
    assert "auc_pleural_thickening" in m
    assert m["auc"] == pytest.approx(np.mean([m["auc_mass"], m["auc_nodule"], m["auc_pleural_thickening"]]))


def test_multiclass_auc_is_macro_one_vs_rest():
    y = np.array([0, 1, 2, 0, 1, 2])
    probs = probabilities("multiclass", np.eye(3)[y] * 3.0)
    m = classification_metrics("multiclass", y, probs)
    assert m["auc"] == 1.0 and m["acc"] == 1.0 and m["specificity"] == 1.0


def test_auc_is_nan_when_validation_has_one_class():
    y = np.zeros(4, dtype=int)
    p = np.full((4, 2), 0.5)
    assert np.isnan(classification_metrics("binary", y, p)["auc"])


def test_sensitivity_and_specificity_are_nan_where_a_class_is_missing_the_same_in_logs_and_intervals():
    """One rule (metrics.confusion_rates) for the logged metric and the bootstrap: a split without negatives has no
    specificity (NaN, not 0, which would read as 'every negative missed')."""
    from analysis.bootstrap import core_metrics, interval_metric_names

    labels, probs = np.array([1, 1, 1, 1]), np.array([[0.2, 0.8], [0.6, 0.4], [0.1, 0.9], [0.3, 0.7]])
    logged = classification_metrics("binary", labels, probs)
    assert np.isnan(logged["specificity"]) and np.isnan(logged["auc"])
    interval = dict(zip(interval_metric_names("binary"), core_metrics("binary", labels, probs)))
    assert interval["sensitivity"] == 0.75 and np.isnan(interval["specificity"])


@pytest.mark.parametrize("task,cases", [("binary", 300), ("binary", 5), ("multiclass", 300), ("multiclass", 4)])
def test_the_bootstrap_s_metrics_from_one_confusion_matrix_equal_scikit_learn_s_scores(task, cases):
    """The intervals' accuracy, balanced accuracy, sensitivity and specificity come from one confusion matrix per
    resample; they equal scikit-learn's own scores, on small samples where a class is missing too."""
    import warnings

    from sklearn import metrics as skm

    from analysis.bootstrap import core_metrics, interval_metric_names

    rng, classes = np.random.default_rng(cases), 2 if task == "binary" else 3
    for _ in range(20):
        labels, probs = rng.integers(0, classes, cases), rng.dirichlet(np.ones(classes), cases)
        predicted = probs.argmax(axis=1)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # a class missing from a small sample
            expected = {"acc": skm.accuracy_score(labels, predicted),
                        "balanced_acc": skm.balanced_accuracy_score(labels, predicted)}
            if task == "binary":
                recalls = skm.recall_score(labels, predicted, labels=[0, 1], average=None, zero_division=np.nan)
                expected |= {"sensitivity": recalls[1], "specificity": recalls[0]}
        got = dict(zip(interval_metric_names(task), core_metrics(task, labels, probs)))
        for name, value in expected.items():
            assert got[name] == pytest.approx(value, nan_ok=True), name


@pytest.mark.parametrize("task", ["binary", "multilabel"])
def test_validation_nll_is_the_same_from_logits_or_from_probabilities_and_matches_scikit_learn(task):
    """Temperature fitting (logits) and the ensemble choice (mean probabilities) score one NLL."""
    from sklearn.metrics import log_loss

    from analysis.calibration import nll, nll_of_probs

    rng = np.random.default_rng(0)
    logits = rng.normal(0, 2, size=(50, 2 if task == "binary" else 3))
    labels = rng.integers(0, 2, size=50) if task == "binary" else rng.integers(0, 2, size=(50, 3))
    probs = probabilities(task, logits)
    assert nll(logits, labels, task) == pytest.approx(nll_of_probs(probs, labels, task), rel=1e-9)
    reference = log_loss(labels, probs, labels=[0, 1]) if task == "binary" else log_loss(labels.ravel(), probs.ravel())
    assert nll_of_probs(probs, labels, task) == pytest.approx(reference, rel=1e-9)

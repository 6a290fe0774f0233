"""GLUE metrics (numpy, ours) against scikit-learn and scipy, on random and degenerate inputs."""
import warnings

import numpy as np
import pytest
from scipy import stats
from sklearn import metrics as skm

from loralib.tasks.glue import compute_metrics, main_metric
from loralib.tasks.glue.metrics import (accuracy, f1_binary, matthews_corrcoef, pearson, rank_average,
                                        spearmanr)


def _quiet(fn, *args, **kwargs):
    """scipy/sklearn warn on the degenerate inputs these tests feed them on purpose."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fn(*args, **kwargs)


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("num_classes", [2, 3, 5])
def test_classification_metrics_match_sklearn(seed, num_classes):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(5, 300))
    labels = rng.integers(0, num_classes, n)
    # predictions right about 60% of the time, so the scores are far from 0 and 1
    predictions = np.where(rng.random(n) < 0.6, labels, rng.integers(0, num_classes, n))
    assert accuracy(predictions, labels) == pytest.approx(skm.accuracy_score(labels, predictions), abs=1e-12)
    assert matthews_corrcoef(predictions, labels) == pytest.approx(
        skm.matthews_corrcoef(labels, predictions), abs=1e-12)
    if num_classes == 2:
        assert f1_binary(predictions, labels) == pytest.approx(skm.f1_score(labels, predictions), abs=1e-12)


@pytest.mark.parametrize("seed", range(5))
def test_correlations_match_scipy(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(3, 200))
    labels = rng.uniform(0, 5, n)
    predictions = labels + rng.normal(0, 1.5, n)
    assert pearson(predictions, labels) == pytest.approx(stats.pearsonr(predictions, labels)[0], abs=1e-12)
    assert spearmanr(predictions, labels) == pytest.approx(stats.spearmanr(predictions, labels)[0], abs=1e-12)
    # STS-B gold scores are often tied (0.0, 2.5, 5.0 ...): ranks must average over ties as scipy's do
    tied = np.round(labels * 2) / 2
    rounded = np.round(predictions)
    assert spearmanr(rounded, tied) == pytest.approx(stats.spearmanr(rounded, tied)[0], abs=1e-12)


def test_rank_average_matches_scipy():
    x = np.array([3.0, 1.0, 3.0, 2.0, 3.0, 1.0, 7.0])
    np.testing.assert_allclose(rank_average(x), stats.rankdata(x))


@pytest.mark.parametrize("predictions,labels", [
    ([1, 1, 1, 1], [0, 1, 0, 1]),        # constant predictions
    ([0, 1, 0, 1], [1, 1, 1, 1]),        # constant labels
    ([0, 0, 0, 0], [0, 0, 0, 0]),        # both constant
    ([2, 2, 2], [0, 1, 2]),              # multi-class, constant predictions
])
def test_mcc_is_zero_when_undefined(predictions, labels):
    assert matthews_corrcoef(predictions, labels) == 0.0
    assert _quiet(skm.matthews_corrcoef, labels, predictions) == 0.0


def test_mcc_extremes():
    y = np.array([0, 1, 1, 0, 1])
    assert matthews_corrcoef(y, y) == pytest.approx(1.0)
    assert matthews_corrcoef(1 - y, y) == pytest.approx(-1.0)


@pytest.mark.parametrize("predictions,labels", [
    ([0, 0, 0], [0, 0, 0]),   # no positive anywhere: F1 undefined, reported 0 like sklearn
    ([0, 0, 0], [1, 1, 0]),   # no predicted positive
    ([1, 1, 1], [0, 0, 0]),   # no true positive
    ([1, 1, 1], [1, 1, 1]),
])
def test_f1_edge_cases_match_sklearn(predictions, labels):
    expected = _quiet(skm.f1_score, labels, predictions, zero_division=0.0)
    assert f1_binary(predictions, labels) == pytest.approx(expected)


def test_correlation_of_a_constant_is_nan_like_scipy():
    constant, varied = np.full(5, 2.0), np.arange(5.0)
    assert np.isnan(pearson(constant, varied)) and np.isnan(_quiet(stats.pearsonr, constant, varied)[0])
    assert np.isnan(spearmanr(varied, constant)) and np.isnan(_quiet(stats.spearmanr, varied, constant)[0])


def test_compute_metrics_names_per_task():
    rng = np.random.default_rng(0)
    y2, p2 = rng.integers(0, 2, 50), rng.integers(0, 2, 50)
    assert set(compute_metrics("cola", p2, y2)) == {"matthews_correlation"}
    assert set(compute_metrics("mrpc", p2, y2)) == {"accuracy", "f1"}
    assert set(compute_metrics("qqp", p2, y2)) == {"accuracy", "f1"}
    for task in ("sst2", "qnli", "rte", "wnli"):
        assert set(compute_metrics(task, p2, y2)) == {"accuracy"}
    y3, p3 = rng.integers(0, 3, 50), rng.integers(0, 3, 50)
    matched, mismatched = compute_metrics("mnli", p3, y3), compute_metrics("mnli-mm", p3[::-1], y3)
    assert set(matched) == set(mismatched) == {"accuracy"}
    assert matched["accuracy"] == skm.accuracy_score(y3, p3)
    assert mismatched["accuracy"] == skm.accuracy_score(y3, p3[::-1])
    scores = rng.uniform(0, 5, 50)
    stsb = compute_metrics("STS-B", scores + rng.normal(0, 1, 50), scores)
    assert set(stsb) == {"pearson", "spearmanr"}
    assert main_metric("cola") == "matthews_correlation" and main_metric("stsb") == "pearson"
    assert main_metric("mrpc") == "accuracy"


def test_compute_metrics_takes_logits():
    logits = np.array([[2.0, 0.1, 0.3], [0.0, 0.2, 3.0], [0.1, 1.0, 0.0], [5.0, 0.0, 0.0]])
    labels = np.array([0, 2, 0, 0])
    assert compute_metrics("mnli", logits, labels)["accuracy"] == pytest.approx(0.75)
    column = np.array([[1.0], [2.0], [3.5]])
    got = compute_metrics("stsb", column, [1.0, 2.5, 3.0])
    assert got["pearson"] == pytest.approx(stats.pearsonr([1.0, 2.0, 3.5], [1.0, 2.5, 3.0])[0])


def test_bad_inputs_raise():
    with pytest.raises(ValueError, match="3 predictions but 2 labels"):
        compute_metrics("sst2", [0, 1, 1], [0, 1])
    with pytest.raises(ValueError, match="None"):
        compute_metrics("sst2", [0, 1], [None, None])
    with pytest.raises(ValueError, match="binary"):
        compute_metrics("mrpc", [0, 2], [0, 1])
    with pytest.raises(ValueError, match="no predictions"):
        compute_metrics("rte", [], [])
    with pytest.raises(ValueError, match="unknown GLUE task"):
        compute_metrics("squad", [0], [0])

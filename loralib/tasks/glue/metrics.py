"""GLUE metrics in numpy, under the names the GLUE tooling uses.

    task            metrics                          main metric (for picking the best checkpoint)
    cola            matthews_correlation             matthews_correlation
    sst2 qnli rte   accuracy                         accuracy
    wnli wn-lex
    mrpc qqp        accuracy, f1 (positive class 1)  accuracy
    wn-pair
    stsb            pearson, spearmanr               pearson
    mnli / mnli-mm  accuracy                         accuracy

MNLI matched and mismatched are two evaluations: call compute_metrics("mnli", ...) on the dev_matched
predictions and compute_metrics("mnli-mm", ...) on the dev_mismatched ones, and report them side by side
(a trainer prefixes them, e.g. eval_mnli_accuracy and eval_mnli-mm_accuracy).

Papers also report metrics made from these (compare_metrics adds them to a run's results): AdaLoRA's STS-B
column is the average correlation, average_correlation = (pearson + spearmanr) / 2.

Degenerate inputs follow scikit-learn / scipy: MCC is 0 when either side is constant, F1 is 0 with no
positive in predictions nor labels, Pearson/Spearman are nan when either side is constant.
Non-finite predictions (a diverged model's nan / inf scores or logits) score nan for every metric of the
task, with a warning: argmax over nan logits or a rank of nan scores would otherwise give a good-looking
number (all-nan STS-B scores used to rank 1..n in input order, Spearman 1.0).
"""
from __future__ import annotations

import logging

import numpy as np

from .data import get_task

log = logging.getLogger(__name__)


def accuracy(predictions, labels) -> float:
    p, y = _pair(predictions, labels)
    return float(np.mean(p == y))


def f1_binary(predictions, labels) -> float:
    """F1 of the positive class 1: 2 tp / (2 tp + fp + fn)."""
    p, y = _pair(predictions, labels)
    for name, v in (("predictions", p), ("labels", y)):
        if not np.isin(v, (0, 1)).all():
            raise ValueError(f"f1 is binary: {name} hold values other than 0 and 1: {np.unique(v)[:10]}")
    tp = np.sum((p == 1) & (y == 1))
    fp = np.sum((p == 1) & (y == 0))
    fn = np.sum((p == 0) & (y == 1))
    denominator = 2 * tp + fp + fn
    return float(2 * tp / denominator) if denominator else 0.0


def matthews_corrcoef(predictions, labels) -> float:
    """Multi-class MCC from the confusion matrix C (rows true, columns predicted), n = sum C:
    (trace(C) n - t.p) / sqrt((n^2 - p.p)(n^2 - t.t)) with t, p the true / predicted class counts; 0 if undefined."""
    p, y = _pair(predictions, labels)
    classes, codes = np.unique(np.concatenate([y, p]), return_inverse=True)
    y_codes, p_codes = codes[: len(y)], codes[len(y):]
    k = len(classes)
    confusion = np.bincount(y_codes * k + p_codes, minlength=k * k).reshape(k, k).astype(np.float64)
    t, q = confusion.sum(axis=1), confusion.sum(axis=0)
    n, correct = confusion.sum(), np.trace(confusion)
    denominator = np.sqrt((n * n - q @ q) * (n * n - t @ t))
    return float((correct * n - t @ q) / denominator) if denominator else 0.0


def pearson(predictions, labels) -> float:
    x, y = _pair(predictions, labels, dtype=np.float64)
    if not (np.isfinite(x).all() and np.isfinite(y).all()):
        return float("nan")
    xc, yc = x - x.mean(), y - y.mean()
    denominator = np.sqrt((xc @ xc) * (yc @ yc))
    if denominator == 0:
        return float("nan")
    return float(np.clip((xc @ yc) / denominator, -1.0, 1.0))


def spearmanr(predictions, labels) -> float:
    """Pearson correlation of the ranks, ties sharing their average rank."""
    x, y = _pair(predictions, labels, dtype=np.float64)
    if not (np.isfinite(x).all() and np.isfinite(y).all()):  # nan has no rank
        return float("nan")
    return pearson(rank_average(x), rank_average(y))


def rank_average(x: np.ndarray) -> np.ndarray:
    """1-based ranks; tied values all get the mean of the ranks they span."""
    order = np.argsort(x, kind="mergesort")
    sorted_x = x[order]
    # start of each run of equal values in sorted order
    starts = np.flatnonzero(np.r_[True, sorted_x[1:] != sorted_x[:-1]])
    ends = np.r_[starts[1:], len(x)]
    mean_rank = (starts + ends + 1) / 2.0  # mean of the 1-based ranks starts+1 .. ends
    ranks = np.empty(len(x), dtype=np.float64)
    ranks[order] = np.repeat(mean_rank, ends - starts)
    return ranks


_METRIC_FUNCTIONS = {"accuracy": accuracy, "f1": f1_binary, "matthews_correlation": matthews_corrcoef,
                     "pearson": pearson, "spearmanr": spearmanr}


def compute_metrics(task_name: str, predictions, labels) -> dict[str, float]:
    """The GLUE metrics of one task. `predictions` are class ids of shape (n,), or logits of shape
    (n, num_labels) (argmax is taken); for STS-B scores of shape (n,) or (n, 1). `labels` shape (n,)."""
    task = get_task(task_name)
    predictions = np.asarray(predictions)
    labels = np.asarray(labels)
    bad = _count_non_finite(predictions)
    if bad:
        log.warning("GLUE %s: %d of %d predictions are nan / inf (the model diverged?); every metric is nan",
                    task.name, bad, len(predictions))
        return {name: float("nan") for name in task.metrics}
    if task.is_regression:
        if predictions.ndim == 2 and predictions.shape[1] == 1:
            predictions = predictions[:, 0]
    elif predictions.ndim == 2:
        predictions = predictions.argmax(axis=1)
    return {name: _METRIC_FUNCTIONS[name](predictions, labels) for name in task.metrics}


# metric a paper reports -> the metrics it is the mean of
DERIVED_METRICS = {"average_correlation": ("pearson", "spearmanr")}


def compare_metrics(metrics: dict) -> dict:
    """`metrics` (one evaluation's {name: value}, keys bare or eval_-prefixed) with the derived metrics added
    where all their parts are there: eval_pearson 0.90 and eval_spearmanr 0.88 add eval_average_correlation
    0.89. A part that is nan or not a number gives nan."""
    out = dict(metrics)
    for prefix in ("", "eval_"):
        for name, parts in DERIVED_METRICS.items():
            keys = [prefix + part for part in parts]
            if prefix + name in out or not all(k in out for k in keys):
                continue
            values = [out[k] for k in keys]
            ok = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)
            out[prefix + name] = float(np.mean(values)) if ok else float("nan")
    return out


def main_metric(task_name: str) -> str:
    """The metric a best checkpoint is chosen by (the first one GLUE lists for the task)."""
    return get_task(task_name).metrics[0]


def _count_non_finite(values: np.ndarray) -> int:
    """Rows (of scores, or of logits) holding a nan / inf; 0 for integer class ids."""
    if values.dtype.kind not in "fc" or values.size == 0:
        return 0
    finite = np.isfinite(values)
    return int((~finite.reshape(len(values), -1).all(axis=1)).sum()) if values.ndim else int(not finite)


def _pair(predictions, labels, dtype=None) -> tuple[np.ndarray, np.ndarray]:
    p, y = np.asarray(predictions), np.asarray(labels)
    if p.dtype == object or y.dtype == object:
        raise ValueError("predictions and labels must be numbers (a test split's labels are None: it cannot be scored)")
    if dtype is not None:
        p, y = p.astype(dtype), y.astype(dtype)
    if p.ndim != 1 or y.ndim != 1:
        raise ValueError(f"predictions and labels must be 1-D, got shapes {p.shape} and {y.shape}")
    if len(p) != len(y):
        raise ValueError(f"{len(p)} predictions but {len(y)} labels")
    if len(p) == 0:
        raise ValueError("no predictions to score")
    return p, y

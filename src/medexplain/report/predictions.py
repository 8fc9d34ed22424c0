"""What the model predicted: probabilities from stored scores, counts, the confusion matrix,
a probability histogram per class, and which images a report shows as examples."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from .figures import _figure, _save
from .html import plain_table

__all__ = [
    "choose_examples",
    "confusion_matrix",
    "plot_probability_histograms",
    "predictions_html",
    "probabilities",
]


def probabilities(scores: np.ndarray, n_classes: int, sigmoid: bool) -> np.ndarray:
    """``(N, K)`` class probabilities from the stored scores ``(N, L)``.

    Softmax over the outputs for a softmax model (of logits or of log-probabilities alike:
    softmax of log p is p); a sigmoid per output for multi-label models (``sigmoid``); a
    one-logit model (``L == 1``, ``K == 2``) gives ``[1 - s, s]`` with ``s = sigmoid(z)``.
    """
    z = np.asarray(scores, dtype=np.float64)
    z = z.reshape(len(z), -1)
    if z.shape[1] == 1 and n_classes == 2:
        positive = 1.0 / (1.0 + np.exp(-z[:, 0]))
        return np.stack([1.0 - positive, positive], axis=1)
    if sigmoid:
        return 1.0 / (1.0 + np.exp(-z))
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def confusion_matrix(labels: np.ndarray, preds: np.ndarray, n_classes: int) -> np.ndarray:
    """``(K, K)`` counts, rows = true class, columns = predicted class; unlabelled images
    (label < 0) are left out."""
    labels, preds = np.asarray(labels).ravel(), np.asarray(preds).ravel()
    keep = labels >= 0
    matrix = np.zeros((n_classes, n_classes), dtype=np.int64)
    np.add.at(matrix, (labels[keep].astype(int), preds[keep].astype(int)), 1)
    return matrix


def confidence(probs: np.ndarray, preds: np.ndarray, multilabel: bool) -> np.ndarray:
    """``(N,)``: the predicted class's probability; multi-label: the least confident
    output's ``max(p, 1 - p)``."""
    if multilabel:
        return np.maximum(probs, 1.0 - probs).min(axis=1)
    return probs[np.arange(len(probs)), np.asarray(preds, dtype=int)]


def wrong(labels: np.ndarray, preds: np.ndarray, multilabel: bool) -> np.ndarray:
    """``(N,)`` bool: labelled images whose prediction differs from the label."""
    labels, preds = np.asarray(labels), np.asarray(preds)
    if multilabel:
        return (labels != preds).any(axis=1)
    return (labels >= 0) & (labels != preds)


def choose_examples(
    conf: np.ndarray, mistaken: np.ndarray, n_confident: int = 3, n_mistaken: int = 12
) -> list[tuple[int, str]]:
    """``(position, why)`` of the images a report shows: the ``n_confident`` most and least
    confident (``why`` = "most confident" / "least confident") and the misclassified ones,
    least confident first, up to ``n_mistaken``; each image once."""
    order = np.argsort(-conf, kind="stable")
    chosen: dict[int, str] = {}
    for i in order[:n_confident].tolist():
        chosen.setdefault(i, "most confident")
    for i in order[::-1][:n_confident].tolist():
        chosen.setdefault(i, "least confident")
    wrong_order = [i for i in order[::-1].tolist() if mistaken[i]]
    for i in wrong_order[:n_mistaken]:
        chosen.setdefault(i, "misclassified")
    return list(chosen.items())


def predictions_html(
    class_names: Sequence[str], labels: np.ndarray, preds: np.ndarray, multilabel: bool
) -> str:
    """Counts per class (labels and predictions) and, for labelled single-label data, the
    confusion matrix (rows true, columns predicted) with the accuracy."""
    k = len(class_names)
    labels, preds = np.asarray(labels), np.asarray(preds)
    if multilabel:
        rows = [
            (name, int(labels[:, c].sum()), int(preds[:, c].sum()))
            for c, name in enumerate(class_names)
        ]
        return plain_table(("class", "positive labels", "positive predictions"), rows)
    labelled = labels >= 0
    counts = [
        (
            name,
            int((labels == c).sum()) if labelled.any() else "–",
            int((preds == c).sum()),
        )
        for c, name in enumerate(class_names)
    ]
    body = plain_table(("class", "images labelled", "images predicted"), counts)
    if labelled.any():
        matrix = confusion_matrix(labels, preds, k)
        rows = [(f"true {name}", *matrix[c].tolist()) for c, name in enumerate(class_names)]
        accuracy = np.trace(matrix) / matrix.sum()
        body += "<p>Confusion matrix (rows: true class, columns: predicted class); accuracy "
        body += f"{accuracy:.3f} on {int(matrix.sum())} labelled image(s).</p>"
        body += plain_table(("", *[f"pred. {n}" for n in class_names]), rows)
    return body


def plot_probability_histograms(
    probs: np.ndarray,
    labels: np.ndarray,
    class_names: Sequence[str],
    path: str | Path,
    multilabel: bool = False,
    bins: int = 10,
) -> Path:
    """One panel per class: the histogram of ``P(class)`` over the images, split into the
    images that truly are that class and the others when labels exist (a calibrated,
    accurate model puts the first near 1 and the second near 0)."""
    k = len(class_names)
    columns = min(k, 4)
    rows = -(-k // columns)
    fig = _figure(figsize=(2.6 * columns, 2.1 * rows))
    axes = fig.subplots(rows, columns, squeeze=False)
    edges = np.linspace(0, 1, bins + 1)
    labels = np.asarray(labels)
    labelled = labels.ndim == 2 or (labels >= 0).any()
    for c, ax in enumerate(axes.flat):
        if c >= k:
            ax.axis("off")
            continue
        p = probs[:, c]
        if labelled:
            truth = labels[:, c] > 0 if labels.ndim == 2 else labels == c
            known = np.ones_like(truth) if labels.ndim == 2 else labels >= 0
            ax.hist(
                p[known & truth], edges, color="#d62728", alpha=0.7, label=f"is {class_names[c]}"
            )
            ax.hist(p[known & ~truth], edges, color="#1f77b4", alpha=0.6, label="other")
            ax.legend(fontsize=6)
        else:
            ax.hist(p, edges, color="#555555")
        ax.set_title(f"P({class_names[c]})", fontsize=8)
        ax.set_xlim(0, 1)
        ax.tick_params(labelsize=6)
    fig.tight_layout()
    return _save(fig, path)

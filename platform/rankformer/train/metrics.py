"""Classification scores (ROC AUC, macro F1, accuracy, confusion matrix), their mean and sd over
folds, and the plots (ROC curves, confusion matrices) as PNG."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np


def scores(y: np.ndarray, prob: np.ndarray, classes: Sequence[str]) -> dict[str, Any]:
    """``y``: class index per item; ``prob``: (items, classes). ROC AUC is binary (the second
    column's score is the first's complement, so either gives the same AUC) or one-vs-rest macro."""
    from sklearn.metrics import accuracy_score, confusion_matrix, f1_score, roc_auc_score

    k = len(classes)
    pred = prob.argmax(1)
    out: dict[str, Any] = {
        "n": len(y),
        "accuracy": float(accuracy_score(y, pred)),
        "macro_f1": float(f1_score(y, pred, average="macro", labels=list(range(k)), zero_division=0)),
        "confusion": confusion_matrix(y, pred, labels=list(range(k))).tolist(),
    }
    present = np.unique(y)
    if len(present) < 2:
        out["roc_auc"] = float("nan")
    elif k == 2:
        out["roc_auc"] = float(roc_auc_score(y, prob[:, 1]))
    else:  # one-vs-rest, macro over the classes present
        out["roc_auc"] = float(np.mean([roc_auc_score(y == c, prob[:, c]) for c in present]))
    return out


def summarize(folds: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Mean and sd of each score over folds, and the summed confusion matrix."""
    out: dict[str, Any] = {}
    for key in ("roc_auc", "macro_f1", "accuracy"):
        vals = np.asarray([f[key] for f in folds], dtype=float)
        vals = vals[~np.isnan(vals)]
        out[f"{key}_mean"] = float(vals.mean()) if len(vals) else float("nan")
        out[f"{key}_sd"] = float(vals.std(ddof=1)) if len(vals) > 1 else 0.0
    out["confusion"] = np.sum([np.asarray(f["confusion"]) for f in folds], axis=0).tolist()
    return out


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_roc(curves: Sequence[tuple[str, np.ndarray, np.ndarray]], positive: str, path: str) -> None:
    """ROC curves (label, y is positive, score) in one figure."""
    from sklearn.metrics import roc_auc_score, roc_curve

    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(4.5, 4.5))
    for label, is_pos, score in curves:
        if len(np.unique(is_pos)) < 2:
            continue
        fpr, tpr, _ = roc_curve(is_pos, score)
        ax.plot(fpr, tpr, lw=1.2, label=f"{label} (AUC {roc_auc_score(is_pos, score):.2f})")
    ax.plot([0, 1], [0, 1], ls="--", c="grey", lw=0.8)
    ax.set(xlabel="false positive rate", ylabel="true positive rate", title=f"ROC: {positive}")
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_confusion(confusion: Sequence[Sequence[int]], classes: Sequence[str], title: str, path: str) -> None:
    plt = _pyplot()
    m = np.asarray(confusion, dtype=float)
    frac = m / np.clip(m.sum(1, keepdims=True), 1, None)
    fig, ax = plt.subplots(figsize=(1.2 * len(classes) + 2.5, 1.2 * len(classes) + 2))
    ax.imshow(frac, cmap="Blues", vmin=0, vmax=1)
    for i in range(len(classes)):
        for j in range(len(classes)):
            ax.text(
                j,
                i,
                f"{int(m[i, j])}",
                ha="center",
                va="center",
                color="black" if frac[i, j] < 0.6 else "white",
            )
    ax.set_xticks(range(len(classes)), classes, rotation=30, ha="right", fontsize=8)
    ax.set_yticks(range(len(classes)), classes, fontsize=8)
    ax.set(xlabel="predicted", ylabel="true", title=title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)

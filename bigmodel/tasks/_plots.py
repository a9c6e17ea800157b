"""The pictures of an evaluation report (PNG, matplotlib's Agg backend, no display needed).

One function per picture; each takes plain numpy arrays and a path and writes the file
atomically. Images are shown with a robust (1st-99th percentile) grey window per image, since
normalised CT/MR intensities have no fixed display range.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from sharding.helpers import atomic_write  # noqa: E402

__all__ = [
    "confusion_matrix_png",
    "detection_png",
    "overlays_png",
    "retrieval_png",
    "roc_pr_png",
]


def _save(fig, path: Path) -> Path:
    """Write the figure under a temporary name beside ``path``, then rename it to ``path``."""
    try:
        atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight"))
    finally:
        plt.close(fig)
    return path


def _grey(image: np.ndarray) -> np.ndarray:
    """``[C, H, W]`` -> ``[H, W]`` (first channel; the centre slice of a 2.5D stack) in [0, 1]."""
    plane = image[image.shape[0] // 2] if image.ndim == 3 else image
    low, high = np.percentile(plane, [1, 99])
    return np.clip((plane - low) / max(high - low, 1e-6), 0, 1)


def confusion_matrix_png(matrix: np.ndarray, classes: list[str], title: str, path: Path) -> Path:
    """Counts with row-normalised shading (rows: true class, columns: predicted)."""
    size = max(3.0, 0.7 * len(classes) + 1.5)
    fig, ax = plt.subplots(figsize=(size, size))
    rows = matrix.sum(axis=1, keepdims=True)
    shade = np.divide(matrix, rows, out=np.zeros_like(matrix, dtype=float), where=rows > 0)
    ax.imshow(shade, cmap="Blues", vmin=0, vmax=1)
    for i in range(len(classes)):
        for j in range(len(classes)):
            colour = "white" if shade[i, j] > 0.6 else "black"
            ax.text(j, i, int(matrix[i, j]), ha="center", va="center", color=colour)
    ax.set_xticks(range(len(classes)), classes, rotation=45, ha="right")
    ax.set_yticks(range(len(classes)), classes)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    return _save(fig, path)


def roc_pr_png(
    curves: dict[str, dict[str, np.ndarray]], aurocs: dict[str, float], title: str, path: Path
) -> Path:
    """ROC (left) and precision-recall (right) curves, one line per class (one-vs-rest)."""
    fig, (roc, pr) = plt.subplots(1, 2, figsize=(10, 4.5))
    for name, c in curves.items():
        roc.plot(c["fpr"], c["tpr"], label=f"{name} (AUROC {aurocs.get(name, float('nan')):.3f})")
        pr.plot(c["recall"], c["precision"], label=f"{name} (AP {c['ap']:.3f})")
    roc.plot([0, 1], [0, 1], color="grey", linestyle=":", linewidth=1)
    roc.set(xlabel="false positive rate", ylabel="true positive rate", title=f"{title}: ROC")
    pr.set(xlabel="recall", ylabel="precision", title=f"{title}: precision-recall")
    for ax in (roc, pr):
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1.02)
        ax.legend(fontsize=8, loc="lower right" if ax is roc else "lower left")
    return _save(fig, path)


def overlays_png(
    cases: list[tuple[str, np.ndarray, np.ndarray, np.ndarray, float]],
    num_classes: int,
    title: str,
    path: Path,
) -> Path:
    """Rows of (image, ground truth, prediction) for ``(label, image, mask, pred, dice)`` cases."""
    fig, axes = plt.subplots(len(cases), 3, figsize=(9, 3.1 * len(cases)), squeeze=False)
    cmap = plt.get_cmap("tab10", max(num_classes, 2))
    for row, (label, image, mask, pred, dice) in enumerate(cases):
        grey = _grey(image)
        for col, (overlay, name) in enumerate(((None, "image"), (mask, "truth"), (pred, "pred"))):
            ax = axes[row, col]
            ax.imshow(grey, cmap="gray")
            if overlay is not None:
                shown = np.ma.masked_where((overlay == 0) | (overlay >= num_classes), overlay)
                ax.imshow(shown, cmap=cmap, vmin=0, vmax=max(num_classes - 1, 1), alpha=0.5)
            ax.set_axis_off()
            ax.set_title(
                f"{label}: {name}" + (f" (Dice {dice:.3f})" if col == 2 else ""), fontsize=9
            )
    fig.suptitle(title)
    return _save(fig, path)


def detection_png(
    cases: list[tuple[str, np.ndarray, np.ndarray, np.ndarray, np.ndarray]],
    title: str,
    path: Path,
) -> Path:
    """Images with ground-truth boxes (green) and predictions (red, with scores)."""
    cols = min(4, len(cases))
    rows = -(-len(cases) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.4 * cols, 3.4 * rows), squeeze=False)
    for ax in axes.flat:
        ax.set_axis_off()
    for ax, (key, image, truth, boxes, scores) in zip(axes.flat, cases, strict=False):
        ax.imshow(_grey(image), cmap="gray")
        for x1, y1, x2, y2 in truth:
            ax.add_patch(plt.Rectangle((x1, y1), x2 - x1, y2 - y1, fill=False, color="lime"))
        for (x1, y1, x2, y2), score in zip(boxes, scores, strict=True):
            ax.add_patch(plt.Rectangle((x1, y1), x2 - x1, y2 - y1, fill=False, color="red"))
            ax.text(x1, y1, f"{score:.2f}", color="red", fontsize=7, va="bottom")
        ax.set_title(key, fontsize=8)
    fig.suptitle(f"{title}: truth (green) vs predicted (red)")
    return _save(fig, path)


def retrieval_png(
    strips: list[tuple[str, np.ndarray, list[tuple[str, np.ndarray, float, bool]]]],
    title: str,
    path: Path,
) -> Path:
    """One row per query: the query, then its nearest neighbours (green: same label)."""
    cols = 1 + max(len(n) for _, _, n in strips)
    fig, axes = plt.subplots(len(strips), cols, figsize=(2.2 * cols, 2.4 * len(strips)))
    axes = np.atleast_2d(axes)
    for ax in axes.flat:
        ax.set_axis_off()
    for row, (key, image, neighbours) in enumerate(strips):
        axes[row, 0].imshow(_grey(image), cmap="gray")
        axes[row, 0].set_title(f"query {key}", fontsize=7)
        for col, (nkey, nimage, score, same) in enumerate(neighbours, start=1):
            ax = axes[row, col]
            ax.imshow(_grey(nimage), cmap="gray")
            ax.set_title(f"{nkey}\ncos {score:.2f}", fontsize=7, color="green" if same else "red")
    fig.suptitle(f"{title}: nearest neighbours (green = same label)")
    return _save(fig, path)

"""Confusion matrix and training curves as PNG (matplotlib, headless)."""

from __future__ import annotations

from pathlib import Path

from covid_cxr.core.figures import plt, save_png


def confusion_matrix_png(cm: list[list[int]], classes: list[str], path: Path, title: str = "") -> None:
    fig, ax = plt.subplots(figsize=(4.6, 4))
    im = ax.imshow(cm, cmap="Blues")
    ax.set_xticks(range(len(classes)), classes, rotation=30, ha="right")
    ax.set_yticks(range(len(classes)), classes)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    peak = max(max(row) for row in cm) or 1
    for i, row in enumerate(cm):
        for j, v in enumerate(row):
            ax.text(j, i, str(v), ha="center", va="center", color="white" if v > peak / 2 else "black")
    ax.set_title(title or "confusion matrix (test split)")
    fig.colorbar(im, ax=ax, fraction=0.046)
    save_png(fig, path)


def curves_png(history: list[dict], path: Path, title: str = "") -> None:
    """Loss and accuracy per epoch, train vs validation."""
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(9, 3.4))
    ep = [h["epoch"] for h in history]
    for key, ax in (("loss", a1), ("acc", a2)):
        for stage in ("train", "val"):
            ys = [h.get(f"{stage}_{key}") for h in history]
            if any(y is not None for y in ys):
                ax.plot(ep, ys, marker=".", label=stage)
        ax.set_xlabel("epoch")
        ax.set_ylabel(key)
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend()
        else:  # a site head fits full batch for a fixed budget: no epochs to draw
            ax.text(0.5, 0.5, "no epochs recorded", ha="center", va="center", transform=ax.transAxes)
    fig.suptitle(title or "training curves")
    save_png(fig, path)

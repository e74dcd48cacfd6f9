"""matplotlib, headless (Agg), and one way to save a figure: a PNG written atomically. Every
report's plots (evaluate, calibration, audit, site check) use these two names."""

from __future__ import annotations

import io
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from covid_cxr.core.files import atomic_write_bytes  # noqa: E402

__all__ = ["plt", "save_png"]


def save_png(fig, path: Path) -> None:
    """Render `fig` to PNG, close it (figures are not freed otherwise), write `path` atomically."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())

"""matplotlib, headless (Agg), and one way to save a figure: a PNG written atomically. Every
report's plots (evaluate, calibration, audit, site check) use these two names."""

from __future__ import annotations

import io
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from covid_cxr.core.files import atomic_write_bytes  # noqa: E402

__all__ = ["plt", "save_png", "wrap_titles"]
CHARS_PER_INCH = 10  # a title at matplotlib's default size: about ten characters per inch of axes


def save_png(fig, path: Path) -> None:
    """Render `fig` to PNG, close it (figures are not freed otherwise), write `path` atomically.
    Titles longer than their axes are wrapped first, so none runs past the figure's edge."""
    wrap_titles(fig)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())


def wrap_titles(fig) -> None:
    """Break each axes title (and the figure's suptitle) at words to fit its width."""
    import textwrap

    for ax in fig.axes:
        title = ax.get_title()
        width = max(12, int(ax.get_position().width * fig.get_figwidth() * CHARS_PER_INCH))
        if len(title) > width:
            ax.set_title(textwrap.fill(title, width))
    if fig._suptitle is not None and len(fig._suptitle.get_text()) > fig.get_figwidth() * CHARS_PER_INCH:
        fig._suptitle.set_text(textwrap.fill(fig._suptitle.get_text(), int(fig.get_figwidth() * CHARS_PER_INCH)))

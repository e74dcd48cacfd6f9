"""Pictures of lung masks: the mask over the X-ray (tint + outline), files for `lungs segment`,
and montages for the note."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from covid_cxr.lungs.segment import sanity_check

GREEN = np.array([0.1, 0.9, 0.2], np.float32)
RED = np.array([1.0, 0.15, 0.1], np.float32)


def outline(mask: np.ndarray) -> np.ndarray:
    from scipy import ndimage

    mask = np.asarray(mask, bool)
    return mask & ~ndimage.binary_erosion(mask, iterations=max(1, mask.shape[0] // 256))


def mask_overlay(pixels: np.ndarray, mask: np.ndarray, truth: np.ndarray | None = None) -> np.ndarray:
    """uint8 RGB: the X-ray, the predicted lungs tinted and outlined green, the reference outline
    (when given) in red."""
    gray = np.clip(np.asarray(pixels, np.float32), 0, 1)[..., None].repeat(3, -1)
    rgb = np.where(mask[..., None], 0.75 * gray + 0.25 * GREEN, gray)
    rgb[outline(mask)] = GREEN
    if truth is not None:
        rgb[outline(truth)] = RED
    return np.clip(np.rint(rgb * 255), 0, 255).astype(np.uint8)


def png_gray(mask: np.ndarray) -> bytes:
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.where(mask, 255, 0).astype(np.uint8), mode="L").save(buf, format="PNG")
    return buf.getvalue()


def segment_files(seg, files: list[Path], out: Path):
    """Mask and overlay per readable file (atomic writes); returns ([(file, Sanity)], [(file, reason)])."""
    from covid_cxr.data.decode import DecodeError, decode_file
    from covid_cxr.data.files import unique_stem
    from covid_cxr.explain.gradcam import png_bytes
    from covid_cxr.core.files import atomic_write_bytes

    rows, skipped, used = [], [], set()
    for f in files:
        try:
            pixels = decode_file(f).pixels.astype(np.float32)
        except DecodeError as exc:
            skipped.append((f, str(exc)))
            continue
        mask = seg.masks(pixels[None])[0]
        stem = unique_stem(f, used)
        atomic_write_bytes(out / f"{stem}_mask.png", png_gray(mask))
        atomic_write_bytes(out / f"{stem}_overlay.png", png_bytes(mask_overlay(pixels, mask)))
        rows.append((f, sanity_check(mask)))
    return rows, skipped


def montage(tiles: list[np.ndarray], captions: list[str], path: Path, cols: int = 6, title: str = "") -> None:
    """RGB tiles in a grid with a caption each (matplotlib), written atomically as PNG."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from covid_cxr.core.files import atomic_write_bytes

    rows = (len(tiles) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(max(2.2, 8 / cols) * cols, 2.6 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, tile, cap in zip(axes.flat, tiles, captions):
        ax.imshow(tile)
        ax.set_title(cap, fontsize=7)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())

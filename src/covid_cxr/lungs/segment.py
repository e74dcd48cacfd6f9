"""Lung masks from a segmentation bundle with numpy + ONNX Runtime only (no torch), and the
sanity check that turns an implausible mask into an out-of-distribution signal.

    seg = LungSegmenter.from_bundle("MODELS/lungs")
    masks = seg.masks(images)            # images: N x H x W float [0, 1] (any H, W) -> bool N x H x W
    probs = seg.probabilities(images)    # float N x H x W
    sanity_check(masks[0]).ok            # two lung blobs side by side, plausible area
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from covid_cxr.core.lung_config import MAX_AREA, MIN_AREA, MIN_BLOB_SHARE

ONNX_MASK = "mask"
THRESHOLD = 0.5
BATCH = 32


def _as_batch(images) -> np.ndarray:
    x = np.asarray(images, dtype=np.float32)
    if x.ndim == 2:
        x = x[None]
    if x.ndim == 4 and x.shape[-1] == 1:
        x = x[..., 0]
    if x.ndim != 3:
        raise ValueError(f"expected N x H x W (or H x W) grayscale images, got shape {np.shape(images)}")
    return np.clip(np.nan_to_num(x), 0.0, 1.0)


def shrink(x: np.ndarray, size: int) -> np.ndarray:
    """N x H x W -> N x S x S by the resize every model input gets (PIL, antialiased: as in training)."""
    from covid_cxr.data.decode import resize

    return np.stack([resize(im, size, size) for im in x]).astype(np.float32)


def grow(probs: np.ndarray, h: int, w: int) -> np.ndarray:
    """N x S x S probabilities -> N x H x W, bilinear (the outline stays sub-pixel accurate).
    Upwards OpenCV's bilinear (the same values as PIL's to 1e-7, ~10x faster); downwards PIL's
    antialiased resize (plain bilinear would alias)."""
    if h >= probs.shape[1] and w >= probs.shape[2]:
        import cv2

        out = [cv2.resize(p, (w, h), interpolation=cv2.INTER_LINEAR) for p in probs]
    else:
        from covid_cxr.data.decode import resize

        out = [resize(p, h, w) for p in probs]
    return np.clip(np.stack(out), 0.0, 1.0).astype(np.float32, copy=False)


def predict_probabilities(prob_fn: Callable[[np.ndarray], np.ndarray], images, size: int) -> np.ndarray:
    """Resize each image to the network's size, run `prob_fn` (N x S x S -> N x S x S) in batches,
    and resize the probabilities back to each image's own size. Training's test metrics and the
    ONNX reader both go through here."""
    x = _as_batch(images)
    small = shrink(x, size)
    probs = np.concatenate([prob_fn(small[i:i + BATCH]) for i in range(0, len(small), BATCH)])
    return grow(probs, *x.shape[1:])


@dataclass
class LungSegmenter:
    """A segmentation bundle opened for inference (ONNX Runtime, CPU). Its session does not spin:
    ONNX Runtime's idle threads busy-waiting after each run took the core the resize and blob
    steps need, and on a loaded 2-core machine made one 256 x 256 image take 34 ms instead of
    16 (benchmarks/bench_lungs.py --latency-only). `threads` 0: ONNX Runtime's default (all cores)."""

    bundle: object
    threads: int = 0
    spinning: bool = False
    _own: object = field(default=None, repr=False)  # its session, opened on first use

    @classmethod
    def from_bundle(cls, path: str | Path, threads: int = 0) -> LungSegmenter:
        """MODELS/<name>[/<version>]; BundleError unless it is a segmentation bundle."""
        from covid_cxr.bundle import BundleError, check_bundle

        bundle = check_bundle(path)
        if bundle.metadata.task != "segmentation":
            raise BundleError(f"{bundle.path}: a {bundle.metadata.task} model, not a lung segmentation model")
        return cls(bundle, threads)

    @property
    def size(self) -> int:
        return self.bundle.input_hw[0]

    def _session(self):
        if self._own is None:
            from covid_cxr.bundle import open_checked_session

            self._own = open_checked_session(self.bundle, self.threads, self.spinning)
        return self._own

    def _run(self, small: np.ndarray) -> np.ndarray:
        from covid_cxr.bundle.schema import ONNX_INPUT

        return self._session().run([ONNX_MASK], {ONNX_INPUT: small[..., None]})[0][..., 0]

    def probabilities(self, images) -> np.ndarray:
        """N x H x W float [0, 1] -> N x H x W lung probability at the images' own size."""
        return predict_probabilities(self._run, images, self.size)

    def masks(self, images, clean: bool = True) -> np.ndarray:
        """N x H x W float [0, 1] -> bool N x H x W lung masks (probability >= 0.5); `clean` keeps
        the two largest blobs (stray specks over the shoulder, bowel gas or a cable are no lung)."""
        masks = self.probabilities(images) >= THRESHOLD
        return np.stack([two_largest(m) for m in masks]) if clean else masks


def lung_fields(images, model: str | Path | LungSegmenter) -> np.ndarray:
    """The trust audit's entry point: bool lung masks for N x H x W float [0, 1] images."""
    seg = model if isinstance(model, LungSegmenter) else LungSegmenter.from_bundle(model)
    return seg.masks(images)


@dataclass
class Sanity:
    """Whether a mask looks like a pair of lungs; `problems` says why not (empty when ok)."""

    area: float
    blobs: int
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def as_dict(self) -> dict:
        return {"ok": self.ok, "area": round(self.area, 4), "blobs": self.blobs, "problems": self.problems}


def blobs(mask: np.ndarray) -> tuple[np.ndarray, list[int]]:
    """Connected components (8-connected) and their labels, largest first (OpenCV: the components
    scipy.ndimage.label finds, numbered otherwise, in two thirds of the time)."""
    import cv2

    _, labels, stats, _ = cv2.connectedComponentsWithStats(np.ascontiguousarray(mask, dtype=np.uint8), connectivity=8)
    return labels, [int(i) + 1 for i in np.argsort(-stats[1:, cv2.CC_STAT_AREA], kind="stable")]


def two_largest(mask: np.ndarray) -> np.ndarray:
    labels, order = blobs(mask)
    if len(order) <= 2:
        return mask
    keep = np.zeros(len(order) + 1, bool)
    keep[order[:2]] = True
    return keep[labels]


def sanity_check(mask: np.ndarray) -> Sanity:
    """Two lung blobs side by side, each a real share of the lung area, and a plausible total area
    (MIN_AREA..MAX_AREA of the image). A mask failing this means the model met something unlike
    the chest films it learnt from: one more out-of-distribution signal."""
    mask = np.asarray(mask, dtype=bool)
    area = float(mask.mean())
    labels, order = blobs(mask)
    problems = []
    if not MIN_AREA <= area <= MAX_AREA:
        problems.append(f"lung area {area:.0%} of the image is outside {MIN_AREA:.0%}-{MAX_AREA:.0%}")
    big = [(labels == k) for k in order[:2]]
    sizes = [int(b.sum()) for b in big]
    if len(big) < 2 or sizes[1] < MIN_BLOB_SHARE * max(1, mask.sum()):
        problems.append("not two lung fields (one blob, or the second is tiny)")
    else:
        cols = sorted(np.nonzero(b)[1].mean() for b in big)
        rows_a, rows_b = (np.nonzero(b)[0] for b in big)
        if not (rows_a.min() < rows_b.max() and rows_b.min() < rows_a.max()) or cols[1] - cols[0] < 0.1 * mask.shape[1]:
            problems.append("the two largest blobs are not side by side")
    return Sanity(area, len(order), problems)


_cache: dict[str, LungSegmenter] = {}


def segmenter_for(path: str | Path) -> LungSegmenter:
    """One LungSegmenter per bundle folder (the newest version when given MODELS/<name>), kept."""
    from covid_cxr.bundle.reader import resolve

    key = str(resolve(path).resolve())
    if key not in _cache:
        _cache[key] = LungSegmenter.from_bundle(key)
    return _cache[key]

"""Maps over X-rays, torch-free (numpy and Pillow): what the ONNX-only server draws Grad-CAM with."""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np

DEFAULT_METHOD = "gradcam"
# name -> class name in pytorch_grad_cam (resolved lazily: importing grad-cam pulls in cv2, sklearn)
_METHOD_CLASSES = {
    "gradcam": "GradCAM",
    "gradcam++": "GradCAMPlusPlus",
    "xgradcam": "XGradCAM",
    "eigencam": "EigenCAM",
    "layercam": "LayerCAM",
    "hirescam": "HiResCAM",
    "scorecam": "ScoreCAM",
}
METHODS: tuple[str, ...] = tuple(_METHOD_CLASSES)


@dataclass
class Explanation:
    cam: np.ndarray  # float32 H x W in [0, 1], at the resolution of the pixels the model saw
    class_index: int  # the class explained
    probabilities: np.ndarray  # float32 (num_classes,), softmax of the model's logits
    method: str = DEFAULT_METHOD

    @property
    def predicted_index(self) -> int:
        return int(np.argmax(self.probabilities))

    @property
    def peak(self) -> tuple[int, int]:
        """(row, col) of the map's maximum; where it is a plateau (the map's borders, after
        upsampling a coarse grid), the middle of that plateau."""
        cells = np.argwhere(self.cam >= self.cam.max() - 1e-6)
        r, c = np.rint(cells.mean(axis=0)).astype(int)
        return int(r), int(c)

    def hotspot(self, level: float = 0.75) -> tuple[float, float]:
        """(row, col) centre of the hottest region: the connected region where the map is at
        least `level` x its maximum that holds the most heat, weighted by the map's values.

        The map is a coarse grid (7 x 7 for a stride-32 layer at 224 px) blown up bilinearly;
        neighbouring cells often come within a few percent of each other, so the single-pixel
        argmax jumps between them. The hot region's centre is the stable answer to "where"."""
        from scipy import ndimage

        cam = self.cam
        top = float(cam.max())
        if top <= 0:
            h, w = cam.shape
            return (h - 1) / 2, (w - 1) / 2
        labels, n = ndimage.label(cam >= level * top)
        heat = ndimage.sum_labels(cam, labels, index=np.arange(1, n + 1))
        best = int(np.argmax(heat)) + 1
        r, c = ndimage.center_of_mass(cam, labels, best)
        return float(r), float(c)


def as_batch(pixels: np.ndarray) -> np.ndarray:
    arr = np.asarray(pixels)
    if arr.dtype == np.uint8:
        arr = arr.astype(np.float32) / 255.0
    elif arr.dtype == np.uint16:
        arr = arr.astype(np.float32) / 65535.0
    arr = arr.astype(np.float32, copy=False)
    if arr.ndim == 3 and arr.shape[-1] == 1 and arr.shape[0] > 1:  # H x W x 1
        arr = arr[..., 0]
    if arr.ndim == 2:
        arr = arr[None]
    if arr.ndim != 3:
        raise ValueError(f"expected a grayscale image H x W (or a batch N x H x W), got shape {np.shape(pixels)}")
    if not np.isfinite(arr).all():
        raise ValueError("image holds NaN or infinite values")
    return np.clip(arr, 0.0, 1.0)


def jet(values: np.ndarray) -> np.ndarray:
    """The classic jet colour map: float [0, 1] H x W -> float RGB H x W x 3 in [0, 1]."""
    v = np.clip(np.asarray(values, dtype=np.float32), 0.0, 1.0)[..., None]
    centres = np.array([3.0, 2.0, 1.0], dtype=np.float32)  # red, green, blue
    return np.clip(1.5 - np.abs(4.0 * v - centres), 0.0, 1.0)


def overlay(pixels_hw: np.ndarray, cam: np.ndarray, alpha: float = 0.4) -> np.ndarray:
    """Blend the map (jet) over the grayscale X-ray: uint8 RGB H x W x 3 at the image's size.

    `alpha` is the map's weight (0: the X-ray alone, 1: the map alone)."""
    from covid_cxr.data.decode import resize

    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must lie in [0, 1], got {alpha}")
    gray = as_batch(pixels_hw)[0]
    cam = np.clip(np.nan_to_num(np.asarray(cam, dtype=np.float32)), 0.0, 1.0)
    if cam.shape != gray.shape:
        cam = np.clip(resize(cam, *gray.shape), 0.0, 1.0)
    rgb = (1.0 - alpha) * gray[..., None] + alpha * jet(cam)
    return np.clip(np.rint(rgb * 255.0), 0, 255).astype(np.uint8)


def png_bytes(rgb: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(rgb, mode="RGB").save(buf, format="PNG", optimize=False)
    return buf.getvalue()


class GraphExplainer:
    """Grad-CAM through a bundle's cam.onnx (ONNX Runtime only): the same `explain` as
    gradcam.Explainer for method "gradcam", without torch. NoCamGraph for a bundle without one."""

    def __init__(self, bundle, threads: int = 0, spinning: bool = True):
        self.bundle = bundle
        self.threads, self.spinning = threads, spinning
        bundle.cam_session(threads, spinning)  # opens and checks it now
        self.layer_name = bundle.metadata.cam.layer

    def close(self) -> None:
        """Nothing to release (the session lives with the bundle); for gradcam.Explainer's callers."""

    def explain(self, seen: np.ndarray, class_index: int | None = None,
                method: str = DEFAULT_METHOD) -> list[Explanation]:
        """Explain one image (H x W) or a batch (N x H x W), as model.onnx takes them (prepared)."""
        from covid_cxr.bundle.schema import ONNX_INPUT, ONNX_OUTPUT

        if method.strip().lower() != DEFAULT_METHOD:
            raise ValueError(f"cam.onnx computes Grad-CAM only, not {method!r}")
        batch = as_batch(seen)
        n_classes = len(self.bundle.classes)
        if class_index is not None and not 0 <= int(class_index) < n_classes:
            raise ValueError(f"class index {class_index} out of range: the model has {n_classes} classes")
        maps = self.bundle.cam_maps(batch, self.threads, self.spinning)
        probs = self.bundle.session().run([ONNX_OUTPUT], {ONNX_INPUT: batch[..., None]})[0]
        wanted = [int(np.argmax(p)) if class_index is None else int(class_index) for p in probs]
        return [Explanation(m[c], c, p.astype(np.float32), DEFAULT_METHOD) for m, c, p in zip(maps, wanted, probs)]


def cam_overlay(bundle, pixels_hw: np.ndarray, class_index: int, alpha: float = 0.4, threads: int = 0,
                spinning: bool = True, prepared: bool = False) -> tuple[bytes, np.ndarray]:
    """(overlay PNG, map H x W in [0, 1]) of one decoded image through the bundle's cam.onnx: resized
    to its input, prepared (lung crop) as model.onnx sees it, unless `prepared` says it already was
    (the server reuses the classifier's prepared pixels). The server's Grad-CAM: no torch."""
    from covid_cxr.data.decode import resize

    h, w = bundle.input_hw
    pixels = np.clip(resize(as_batch(pixels_hw)[0], h, w), 0.0, 1.0)
    seen = pixels if prepared else bundle.prepare(pixels[None])[0]
    cam = bundle.cam_maps(seen[None], threads, spinning)[0, int(class_index)]
    return png_bytes(overlay(seen, cam, alpha)), cam

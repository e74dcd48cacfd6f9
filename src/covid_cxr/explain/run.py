"""Explain images as `predict` answers them: the probabilities, label and gate verdict come from the
bundle's own runner (`Bundle.answer`: lung crop, model.onnx with its temperature, operating point,
out-of-distribution gate), and the map explains that label on the pixels the model saw. The map
(cam.onnx through ONNX Runtime, or PyTorch for other methods and older bundles) only draws, so
`explain` can never tell another story than `predict`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from covid_cxr.bundle.reader import Answers, Bundle

GATE_NO = "NO: unlike the training X-rays; do not trust the label"
GATE_NONE = "– (no gate in this bundle)"


def gate_verdict(inside: bool | None) -> str:
    """The gate's verdict as predict and explain print it."""
    return GATE_NONE if inside is None else ("yes" if inside else GATE_NO)


@dataclass
class Explained:
    """One image: what the bundle answers, and the map of the class explained."""

    pixels: np.ndarray  # H x W, what the model saw (the lung crop of a --lung-crop bundle)
    cam: np.ndarray  # H x W float32 in [0, 1]
    answers: Answers  # for this one image (N = 1)
    class_index: int  # the class explained: the one asked for, else the bundle's label

    def row(self, classes: list[str]) -> dict:
        """What predict --json reports, plus the class explained and its probability."""
        row = self.answers.row(0, classes)
        return {**row, "explained_class": classes[self.class_index],
                "explained_probability": float(self.answers.probabilities[0, self.class_index]),
                "gate": gate_verdict(row["in_distribution"])}


def explain_image(bundle: Bundle, explainer, pixels: np.ndarray, class_index: int | None = None,
                  method: str = "gradcam") -> Explained:
    """Decoded H x W pixels at the bundle's input size -> Explained (the bundle's answer, the map)."""
    seen = bundle.prepare(np.asarray(pixels, np.float32)[None])[0]  # what model.onnx runs on
    answers = bundle.answer(seen[None], prepared=True)  # prepared once: the lung crop is not run twice
    target = int(answers.labels[0]) if class_index is None else int(class_index)
    cam = explainer.explain(seen, target, method)[0].cam
    return Explained(seen, cam, answers, target)


def write_explained(e: Explained, out: Path, stem: str, alpha: float, lungs_info: dict | None = None) -> None:
    """<stem>_cam.npy (raw map), <stem>_cam.png (overlay) and <stem>_lungs.json, each atomically."""
    import io

    from covid_cxr.explain.render import overlay, png_bytes
    from covid_cxr.core.files import atomic_write_bytes

    buf = io.BytesIO()
    np.save(buf, np.asarray(e.cam, dtype=np.float32), allow_pickle=False)
    atomic_write_bytes(out / f"{stem}_cam.npy", buf.getvalue())
    atomic_write_bytes(out / f"{stem}_cam.png", png_bytes(overlay(e.pixels, e.cam, alpha)))
    if lungs_info is not None:
        atomic_write_bytes(out / f"{stem}_lungs.json", (json.dumps(lungs_info, indent=2) + "\n").encode())

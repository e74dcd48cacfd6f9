"""Where a Grad-CAM map looks, in the radiologist's words: the share of its mass inside the lung
fields and the strongest of six zones, right/left x upper/middle/lower.

Sides are the patient's: on a frontal (PA/AP) film the patient's right lung is on the image's
left, as radiologists read it. Each lung is cut into thirds of its own height (upper, middle,
lower zone), a common simplification of the zones radiologists use (which follow the anterior
rib ends); it names a region, it does not measure one.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from covid_cxr.data.decode import resize
from covid_cxr.lungs.segment import blobs, sanity_check, segmenter_for

SIDES = ("right", "left")  # patient's right = image left
LEVELS = ("upper", "middle", "lower")
ZONES = tuple(f"{s} {lv}" for s in SIDES for lv in LEVELS)


def lungs_by_side(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(patient's right lung, patient's left lung) as bool masks. The two largest blobs, the one
    on the image's left being the right lung; with one blob (lungs touching, or one lung found),
    the mask is cut at its own horizontal centre."""
    mask = np.asarray(mask, dtype=bool)
    labels, order = blobs(mask)
    if len(order) >= 2:
        a, b = (labels == order[0]), (labels == order[1])
        if np.nonzero(a)[1].mean() > np.nonzero(b)[1].mean():
            a, b = b, a
        return a, b
    cols = np.nonzero(mask)[1]
    cut = (cols.min() + cols.max()) / 2 if cols.size else mask.shape[1] / 2
    image_left = np.arange(mask.shape[1])[None, :] < cut
    return mask & image_left, mask & ~image_left


def zone_labels(mask: np.ndarray) -> np.ndarray:
    """int H x W: -1 outside the lungs, else the index into ZONES."""
    out = np.full(mask.shape, -1, dtype=np.int8)
    for s, lung in enumerate(lungs_by_side(mask)):
        rows = np.nonzero(lung.any(axis=1))[0]
        if rows.size == 0:
            continue
        top, height = rows.min(), rows.max() - rows.min() + 1
        level = np.clip(((np.arange(mask.shape[0]) - top) * 3) // height, 0, 2)
        out[lung] = (s * 3 + level[:, None].repeat(mask.shape[1], 1))[lung]
    return out


@dataclass
class CamZones:
    inside: float  # share of the map's mass inside the lung fields
    zones: dict[str, float]  # zone -> share of the map's mass
    strongest: str | None  # the zone holding the most mass (None: no lung found)

    @property
    def summary(self) -> str:
        where = f"strongest: {self.strongest} zone" if self.strongest else "no lung fields found"
        return f"{self.inside * 100:.0f} % inside the lungs; {where}"

    def as_dict(self) -> dict:
        return {"inside_share": round(self.inside, 4), "strongest_zone": self.strongest,
                "zones": {k: round(v, 4) for k, v in self.zones.items()}, "summary": self.summary}


def cam_zones(cam: np.ndarray, mask: np.ndarray) -> CamZones:
    """The map's mass inside the lungs and per zone (the map is resized to the mask if needed)."""
    cam = np.clip(np.nan_to_num(np.asarray(cam, dtype=np.float32)), 0, None)
    if cam.shape != mask.shape:
        cam = np.clip(resize(cam, *mask.shape), 0, None)
    total = float(cam.sum())
    labels = zone_labels(np.asarray(mask, dtype=bool))
    if total <= 0:
        return CamZones(0.0, dict.fromkeys(ZONES, 0.0), None)
    zones = {z: float(cam[labels == i].sum()) / total for i, z in enumerate(ZONES)}
    inside = float(cam[labels >= 0].sum()) / total
    strongest = max(zones, key=zones.get) if (labels >= 0).any() else None
    return CamZones(inside, zones, strongest)


def lung_report(path: str | Path, pixels: np.ndarray, cam: np.ndarray | None = None) -> dict:
    """What the upload API adds: the mask's sanity check and, given a Grad-CAM map, where it looks
    (fields of serve.protocol.LungFields)."""
    mask = segmenter_for(path).masks(np.asarray(pixels)[None])[0]
    s = sanity_check(mask)
    out = {"check_ok": s.ok, "problems": s.problems, "area": round(s.area, 4)}
    if cam is not None:
        z = cam_zones(cam, mask)
        out.update(inside_share=round(z.inside, 4), strongest_zone=z.strongest, summary=z.summary)
    return out

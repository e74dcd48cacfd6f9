"""`covid-cxr audit`: does the model read the lungs, or something else that comes with the label?

On this database the classes come from different sources (COVID-19: adults from many hospitals;
Viral Pneumonia: children from one), and a network can score well by recognising the source: the
shortcut DeGrave et al. (2021, Nature Machine Intelligence) found in COVID-19 radiograph models.
Three probes, each with its figure, its chance level and a one-line verdict:

- occlusion: accuracy with the lung fields hidden (filled with the image's mean) and with
  everything but the lung fields hidden; a model far above chance with the lungs hidden reads
  something else;
- acquisition: a cross-validated scikit-learn classifier on non-clinical features only (original
  size and aspect, format, bit depth, border-strip statistics, intensity histogram): how well the
  labels can be read off how the image was made and stored;
- Grad-CAM mass inside the lung fields, per class, on a sample.

Lung fields come through ONE function, `lung_fields`; until the lung segmentation model is wired in
it is a fixed central region (two ellipses), and the report says so.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from covid_cxr.core.errors import UserError
from covid_cxr.models.loading import load_torch

# Lung fields as two fixed ellipses (fractions of height/width): centre row, centre columns, radii.
ELLIPSE_ROW, ELLIPSE_COLS, ELLIPSE_RY, ELLIPSE_RX = 0.48, (0.30, 0.70), 0.30, 0.16
LUNG_NOTE = ("fixed central region (two ellipses covering where the lungs usually lie), not a "
             "segmentation: give --lungs MODELS/lungs for each image's own lung fields")
RETAINED_SUSPECT = 0.5  # lungs hidden keep >= half the above-chance accuracy: reads something else
ACQUISITION_SUSPECT = 0.5  # acquisition-only balanced accuracy covers >= half the way from chance to 1
BORDER = 0.08  # border strips: this fraction of each side
CORNER = 0.12  # corner patches (where labels, side markers and burnt-in text sit)
CAM_SUSPECT = 0.9  # Grad-CAM mass in the lungs below 0.9 x their area share: looks elsewhere
HIST_BINS = 16
PROBE_SIZE = 128  # pixels for the border/histogram features (enough for statistics, cheap)


class AuditError(UserError):
    """The audit cannot run on what it was given (no images, one class only...)."""


@dataclass
class Sample:
    """The audited images: paths, labels (class indices), pixels at the model's input size."""

    paths: list[Path]
    labels: np.ndarray
    images: np.ndarray  # N x H x W float32 [0, 1]
    acquisition: np.ndarray  # N x K non-clinical features
    skipped: list[dict] = field(default_factory=list)


# ------------------------------------------------------------------------------------ lung fields

def lung_fields(images: np.ndarray, lungs: Path | None = None) -> np.ndarray:
    """N x H x W bool masks of the lung fields: the single place the audit gets them from. With
    `lungs` (a lung segmentation bundle, covid_cxr.lungs) each image's own lungs; without, the
    fixed two-ellipse region."""
    if lungs is not None:
        from covid_cxr.lungs.segment import lung_fields as segmented

        return segmented(images, lungs)  # BundleError (one line) if it is not a segmentation bundle
    n, h, w = images.shape
    return np.broadcast_to(ellipse_mask(h, w), (n, h, w))


def lung_method(lungs: Path | None = None) -> dict:
    if lungs is not None:
        return {"method": "segmentation", "note": f"each image's lung fields from the lung model {lungs}"}
    return {"method": "fixed-ellipses", "note": LUNG_NOTE}


def ellipse_mask(h: int, w: int) -> np.ndarray:
    yy, xx = np.mgrid[0:h, 0:w]
    yy, xx = (yy + 0.5) / h, (xx + 0.5) / w
    m = np.zeros((h, w), bool)
    for cx in ELLIPSE_COLS:
        m |= ((yy - ELLIPSE_ROW) / ELLIPSE_RY) ** 2 + ((xx - cx) / ELLIPSE_RX) ** 2 <= 1
    return m


# ------------------------------------------------------------------------------------ sampling

def read_image(path: Path, hw: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """(pixels at the model's input size, non-clinical features): original
    width, height, aspect, format, bit depth, channels, border-strip statistics, intensity histogram.
    The features need the full resolution; the pixels are decoded again as every other door does."""
    from PIL import Image

    from covid_cxr.data.decode import decode_file, load_for_model, resize

    dec = decode_file(path)
    bits, channels = 16, 1  # DICOM
    if dec.format != "DICOM":
        with Image.open(path) as im:
            bits = {"1": 1, "I;16": 16, "I;16B": 16, "I;16L": 16, "I": 32, "F": 32}.get(im.mode, 8)
            channels = len(im.getbands())
    small = resize(dec.pixels, PROBE_SIZE, PROBE_SIZE)
    fmt = ["PNG", "JPEG", "DICOM"].index(dec.format) if dec.format in ("PNG", "JPEG", "DICOM") else 3
    meta = [dec.width, dec.height, dec.width / dec.height, fmt, bits, channels]
    feats = np.concatenate([meta, border_stats(small), intensity_hist(small)]).astype(np.float64)
    return load_for_model(path, *hw), feats  # the model's pixels decoded as predict decodes them


def border_stats(img: np.ndarray) -> np.ndarray:
    """Mean, std, 5th and 95th percentile of each border strip (top, bottom, left, right), and
    mean and 99th percentile of each corner patch."""
    k, c = max(1, int(round(BORDER * img.shape[0]))), max(1, int(round(CORNER * img.shape[0])))
    strips = (img[:k], img[-k:], img[:, :k], img[:, -k:])
    corners = (img[:c, :c], img[:c, -c:], img[-c:, :c], img[-c:, -c:])
    return np.array([f(s) for s in strips for f in (np.mean, np.std, lambda a: np.percentile(a, 5),
                                                     lambda a: np.percentile(a, 95))]
                    + [f(s) for s in corners for f in (np.mean, lambda a: np.percentile(a, 99))])


def intensity_hist(img: np.ndarray) -> np.ndarray:
    return np.histogram(img, bins=HIST_BINS, range=(0.0, 1.0))[0] / img.size


FEATURE_GROUPS = {"size, format, bit depth": slice(0, 6), "border strips and corners": slice(6, 30),
                  "intensity histogram": slice(30, 30 + HIST_BINS)}
# The verdict reads the acquisition proper; the whole-image histogram also carries the lungs' density
# (clinical), so it is reported beside it, not judged.
ACQUISITION = "size, format, bit depth, borders, corners"
ALL = "all of the above (with histogram)"
PROBE_COLUMNS = {**FEATURE_GROUPS, ACQUISITION: slice(0, 30), ALL: slice(None)}


def load_sample(data_dir: Path, classes: list[str], hw: tuple[int, int], per_class: int, seed: int) -> Sample:
    """Up to `per_class` random images of each class (seeded), decoded once for every probe."""
    from covid_cxr.data.decode import DecodeError
    from covid_cxr.data.layouts import discover

    files = discover(data_dir, classes).files
    rng = np.random.default_rng(seed)
    chosen = []
    for c in classes:
        mine = [f for f in files if f.label == c]
        chosen += [mine[i] for i in sorted(rng.permutation(len(mine))[:per_class])]
    paths, labels, images, feats, skipped = [], [], [], [], []
    for f in chosen:
        try:
            pixels, acq = read_image(f.path, hw)
        except (DecodeError, OSError) as exc:
            skipped.append({"path": f.relpath, "reason": str(exc)})
            continue
        paths.append(f.path)
        labels.append(classes.index(f.label))
        images.append(pixels)
        feats.append(acq)
    if len(set(labels)) < 2:
        raise AuditError(f"{data_dir}: the audit needs readable images of at least two classes of {classes}")
    return Sample(paths, np.array(labels), np.stack(images).astype(np.float32), np.stack(feats), skipped)


# ------------------------------------------------------------------------------------ probes

def _labels(bundle, images: np.ndarray, batch: int = 32) -> np.ndarray:
    """The bundle's labels (`Bundle.answer`: its lung crop, operating point), as predict gives them."""
    return np.concatenate([bundle.answer(images[i:i + batch]).labels for i in range(0, len(images), batch)])


def _scores(labels: np.ndarray, pred: np.ndarray, classes: list[str]) -> dict:
    return {"accuracy": float((pred == labels).mean()),
            "recall": {c: float((pred[labels == i] == i).mean()) if (labels == i).any() else None
                       for i, c in enumerate(classes)}}


def chance_level(labels: np.ndarray) -> float:
    """Accuracy of always answering the sample's most frequent class."""
    return float(np.bincount(labels).max() / len(labels))


def occlusion_probe(bundle, sample: Sample, masks: np.ndarray) -> dict:
    """Accuracy as is, with the lung fields hidden, and with all but the lung fields hidden (hidden
    pixels take the image's mean, as in DeGrave et al.)."""
    x = sample.images
    mean = x.mean(axis=(1, 2), keepdims=True)
    variants = {"full image": x, "lungs hidden": np.where(masks, mean, x), "only lungs": np.where(masks, x, mean)}
    classes = bundle.classes
    out = {name: _scores(sample.labels, _labels(bundle, v), classes) for name, v in variants.items()}
    chance = chance_level(sample.labels)
    full, hidden = out["full image"]["accuracy"], out["lungs hidden"]["accuracy"]
    retained = (hidden - chance) / (full - chance) if full > chance else 0.0
    suspect = retained >= RETAINED_SUSPECT
    verdict = (f"with the lung fields hidden the model keeps {retained:.0%} of its above-chance accuracy "
               f"({hidden:.2f} vs {full:.2f}, chance {chance:.2f}): "
               + ("it reads something outside the lungs" if suspect else "it depends on the lung fields"))
    return {"accuracy": out, "chance": chance, "retained_without_lungs": float(retained), "suspect": bool(suspect),
            "verdict": verdict}


def acquisition_probe(sample: Sample, n_classes: int, seed: int = 0) -> dict:
    """Balanced accuracy of a 5-fold cross-validated random forest on non-clinical features, all
    together and per feature group; chance is 1 / classes."""
    from sklearn.ensemble import RandomForestClassifier
    from sklearn.model_selection import StratifiedKFold, cross_val_score

    folds = int(min(5, np.bincount(sample.labels)[np.bincount(sample.labels) > 0].min()))
    if folds < 2:
        raise AuditError("the acquisition probe needs at least two images of each class")
    cv = StratifiedKFold(folds, shuffle=True, random_state=seed)
    scores = {}
    for name, cols in PROBE_COLUMNS.items():
        clf = RandomForestClassifier(n_estimators=200, random_state=seed, n_jobs=1)
        scores[name] = float(cross_val_score(clf, sample.acquisition[:, cols], sample.labels, cv=cv,
                                             scoring="balanced_accuracy").mean())
    chance = 1.0 / n_classes
    best = scores[ACQUISITION]
    suspect = best >= chance + ACQUISITION_SUSPECT * (1 - chance)
    verdict = (f"size, format, bit depth, border strips and corners alone give balanced accuracy {best:.2f} "
               f"(chance {chance:.2f}; with the intensity histogram {scores[ALL]:.2f}): "
               + ("the labels can be read off the acquisition" if suspect else "the acquisition says little about the label"))
    return {"balanced_accuracy": scores, "chance": chance, "folds": folds, "classifier": "RandomForest(200)",
            "suspect": bool(suspect), "verdict": verdict}


def gradcam_probe(bundle, sample: Sample, masks: np.ndarray, per_class: int, seed: int = 0) -> dict:
    """Share of each Grad-CAM map's mass inside the lung fields (predicted class), per true class;
    chance is the lung fields' share of the image (what a uniform map gives)."""
    from covid_cxr.explain.gradcam import Explainer

    rng = np.random.default_rng(seed)
    pick = np.concatenate([rng.permutation(np.flatnonzero(sample.labels == i))[:per_class]
                           for i in range(len(bundle.classes))]).astype(int)
    explainer = Explainer(load_torch(bundle), layer=bundle.metadata.architecture.cam_layer)
    try:
        maps = np.stack([e.cam for k in range(0, len(pick), 16)  # on what the model sees (a lung crop)
                         for e in explainer.explain(bundle.prepare(sample.images[pick[k:k + 16]]))])
    finally:
        explainer.close()
    m = masks[pick]
    mass = (maps * m).sum(axis=(1, 2)) / np.maximum(maps.sum(axis=(1, 2)), 1e-12)
    area = float(m.mean())
    per_class = {c: {"mean": float(mass[sample.labels[pick] == i].mean()), "n": int((sample.labels[pick] == i).sum()),
                     "sd": float(mass[sample.labels[pick] == i].std())}
                 for i, c in enumerate(bundle.classes) if (sample.labels[pick] == i).any()}
    low = [c for c, e in per_class.items() if e["mean"] < CAM_SUSPECT * area]
    verdict = ("Grad-CAM mass inside the lung fields: " + ", ".join(f"{c} {e['mean']:.2f}" for c, e in per_class.items())
               + f" (a uniform map: {area:.2f}); " + (f"under {CAM_SUSPECT:g} x uniform for {', '.join(low)}: "
                                                      "attention lies outside the lungs"
                                                      if low else "every class looks at the lungs more than a uniform map"))
    return {"mass_in_lungs": per_class, "chance": area, "suspect": bool(low), "verdict": verdict,
            "examples": [{"path": str(sample.paths[i]), "cam": maps[j]} for j, i in enumerate(pick)]}


# ------------------------------------------------------------------------------------ the audit

def run_audit(bundle, data_dir: Path, out: Path, per_class: int = 150, cam_per_class: int = 12,
              seed: int = 0, lungs: Path | None = None) -> dict:
    """All probes on a seeded sample of `data_dir`; writes out/audit.md, out/audit.json and the plots.
    Returns the JSON (``shortcut_suspected`` and ``reasons`` first)."""
    from covid_cxr.trust.audit_report import write_audit

    sample = load_sample(data_dir, bundle.classes, bundle.input_hw, per_class, seed)
    masks = lung_fields(sample.images, lungs)
    probes = {"occlusion": occlusion_probe(bundle, sample, masks),
              "acquisition": acquisition_probe(sample, len(bundle.classes), seed)}
    if cam_per_class > 0:
        probes["gradcam"] = gradcam_probe(bundle, sample, masks, cam_per_class, seed)
    reasons = [f"{name}: {p['verdict']}" for name, p in probes.items() if p["suspect"]]
    result = {"shortcut_suspected": bool(reasons), "reasons": reasons,
              "model": {"name": bundle.name, "version": bundle.version, "path": str(bundle.path)},
              "data": str(Path(data_dir).resolve()), "lung_fields": lung_method(lungs),
              "sample": {"per_class_max": per_class, "seed": seed, "n": int(len(sample.labels)),
                         "counts": {c: int((sample.labels == i).sum()) for i, c in enumerate(bundle.classes)},
                         "skipped": sample.skipped},
              "probes": probes}
    write_audit(result, sample, masks, out)
    return strip_arrays(result)


def strip_arrays(result: dict) -> dict:
    """The JSON-ready audit: Grad-CAM examples keep their paths, not their maps."""
    probes = {k: {kk: vv for kk, vv in p.items() if kk != "examples"} for k, p in result["probes"].items()}
    if "gradcam" in result["probes"]:
        probes["gradcam"]["examples"] = [e["path"] for e in result["probes"]["gradcam"]["examples"]]
    return {**result, "probes": probes}

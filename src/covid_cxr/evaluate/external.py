"""Evaluate a bundle on any labelled folder (another release, a hospital's own data), through the
bundle's ONNX model: exactly what the server would answer."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from covid_cxr.bundle import Bundle
from covid_cxr.data import build_manifest
from covid_cxr.data.decode import load_batch
from covid_cxr.core.errors import DataError
from covid_cxr.core.results import FolderEvaluation, Metrics, ModelRef, SkippedFile
from covid_cxr.core.files import atomic_folder
from covid_cxr.evaluate.metrics import compute_metrics, with_operating_point
from covid_cxr.evaluate.report import write_report
from covid_cxr.core.progress import progress_iter
from covid_cxr.evaluate.selective import risk_coverage_png, selective_md, selective_metrics


def evaluate_folder(bundle: Bundle, data_dir: Path, out: Path, progress: bool = True) -> FolderEvaluation:
    man = build_manifest(data_dir, classes=bundle.classes, progress=progress, allow_missing=True)
    recs = man.ok  # skipped files are listed in the manifest and the report
    if not recs:
        raise DataError(f"no readable labelled images in {data_dir}")
    h, w = bundle.input_hw
    answers = []
    for i in progress_iter(range(0, len(recs), 32), "evaluating", enabled=progress):
        answers.append(bundle.answer(load_batch([man.root / r.path for r in recs[i:i + 32]], h, w)))
    y = np.array([bundle.classes.index(r.label) for r in recs])
    probs = np.concatenate([a.probabilities for a in answers])
    inside = [a.in_distribution if a.in_distribution is not None else np.ones(len(a.labels), bool) for a in answers]
    m = with_operating_point(compute_metrics(y, probs, bundle.classes), y, probs, bundle.metadata.operating_point)
    inside = np.concatenate(inside)
    present = [c for c in bundle.classes if m.per_class[c].support]
    absent = len(present) < len(bundle.classes)  # macro-F1 over every class would count absent ones as 0
    m = FolderEvaluation(**{
        **dict(m),  # the share of the folder the model's gate calls unlike its training images:
        "ood_rate": float(1 - inside.mean()) if bundle.has_ood else None,
        "selective": selective_metrics(y, probs, inside if bundle.has_ood else None),
        "classes_absent": [c for c in bundle.classes if c not in present] if absent else None,
        "macro_f1_present": float(np.mean([m.per_class[c].f1 for c in present])) if absent else None,
        "skipped": [SkippedFile(path=r.path, reason=r.reason) for r in man.records if r.status == "skipped"],
        "model": ModelRef(name=bundle.name, version=bundle.version), "data": str(man.root)})
    title = f"{bundle.name} v{bundle.version} on {man.root.name}"
    with atomic_folder(out) as tmp:  # a failure or an interrupt leaves no half-written report
        man.write_csv(tmp / "manifest.csv")
        write_predictions(tmp / "predictions.csv", bundle, [r.path for r in recs], answers)
        curves = bundle.report_dir / "curves.png"
        if curves.is_file():
            (tmp / "curves.png").write_bytes(curves.read_bytes())
        risk_coverage_png(y, probs, tmp / "risk_coverage.png", title)
        write_report(m, tmp, title, absent_md(m) + selective_md(m.selective))
    return m


def absent_md(m: Metrics) -> str:
    if not m.classes_absent:
        return ""
    return (f"\n- classes absent from this folder: {', '.join(m.classes_absent)}; macro-F1 over the classes "
            f"present {m.macro_f1_present:.3f}\n")


def write_predictions(path: Path, bundle: Bundle, images: list[str], answers: list) -> None:
    """One row per image: what `predict --json` answers for it (label by the operating point, every
    probability, the gate), so a report can be checked image by image."""
    from covid_cxr.core.files import atomic_write_csv

    rows = []
    for a in answers:
        for i in range(len(a.labels)):
            r = a.row(i, bundle.classes)
            rows.append([r["label"], *(repr(v) for v in r["probabilities"].values()),
                         "" if r["in_distribution"] is None else r["in_distribution"],
                         "" if r["ood_score"] is None else repr(r["ood_score"])])
    atomic_write_csv(path, ["image", "label", *bundle.classes, "in_distribution", "ood_score"],
                     ([img, *row] for img, row in zip(images, rows)))

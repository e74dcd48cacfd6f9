"""`covid-cxr site check`: a folder of a new site's images (unlabelled; class folders are fine)
against the bundle's `site_reference`, through the bundle's own ONNX model (what the server would
answer): a verdict, the signals that moved in words, plots, and the next step."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from covid_cxr.bundle import Bundle
from covid_cxr.bundle.store import member_dir
from covid_cxr.core.config import SITE_PREVALENCE_MIN_IMAGES
from covid_cxr.core.errors import DataError, UserError
from covid_cxr.site.images import ImageBatch, image_files, read_images
from covid_cxr.site.reference import Sample, sample_of
from covid_cxr.site.shift import ALPHA, FIT, MIN_IMAGES, SHIFT, ShiftResult, compare, summary_words
from covid_cxr.core.files import atomic_write_json, atomic_write_text
from covid_cxr.core.progress import progress_iter

CHUNK = 32  # images decoded and run at once (bounds memory on large folders)
ADAPT_PER_CLASS = 20  # labelled images per class the next step asks for (issue 16's measurements)


@dataclass
class SiteCheck:
    bundle: Bundle
    folder: Path
    sample: Sample
    batch: ImageBatch
    result: ShiftResult


def measure(bundle: Bundle, paths: list[Path], progress: bool = False) -> tuple[Sample, ImageBatch]:
    """The bundle's answers and the image statistics of `paths`, read in chunks of CHUNK."""
    h, w = bundle.input_hw
    batch, probs, scores = ImageBatch(), [], []
    for i in progress_iter(range(0, len(paths), CHUNK), "site check", enabled=progress):
        batch, x = read_images(paths[i:i + CHUNK], h, w, batch)
        if len(x):
            p, s, _ = bundle.predict_with_ood(x)
            probs.append(p)
            scores.append(s)
    c = len(bundle.classes)
    p = np.concatenate(probs) if probs else np.zeros((0, c))
    s = np.concatenate(scores) if scores and scores[0] is not None else None
    return sample_of(p, s, batch), batch


def check_site(bundle: Bundle, folder: Path, alpha: float = ALPHA, progress: bool = False) -> SiteCheck:
    """Measure the folder and compare it with the bundle's reference (UserError without one)."""
    ref = bundle.metadata.site_reference
    if ref is None:
        raise UserError(f"{bundle.path}: this bundle has no site_reference (written before covid-cxr stored one): "
                        "retrain it, or rebuild the ensemble, to check sites against it")
    if not 0 < alpha < 1:
        raise UserError(f"--alpha {alpha}: must lie between 0 and 1")
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"{folder}: not a folder")
    paths = image_files(folder)
    if not paths:
        raise DataError(f"{folder}: no image files (PNG, JPEG, DICOM) in it")
    sample, batch = measure(bundle, paths, progress)
    return SiteCheck(bundle, folder, sample, batch, compare(ref, sample, bundle.classes, alpha))


def adapt_target(b: Bundle) -> tuple[str, str]:
    """(the bundle `train --init-from` should start from, a note on that choice). An ensemble is
    adapted through one model; a frozen ImageNet backbone adapts worse than one fine-tuned on chest
    X-rays (docs/results/site.md, "Which model to adapt")."""
    models = b.path.parent.parent
    arch = b.metadata.architecture
    if arch.members:
        first = arch.members[0].name
        member = member_dir(models, first)  # beside it, or where the recipe trained it
        return (str(member) if member else f"MODELS/{first}",
                f"{b.name} is an ensemble: adapt a single model, the one distilled from it (`--recipe accurate` "
                f"writes it beside the ensemble) or one of its members, here {first}.")
    if arch.frozen_backbone:
        return (str(b.path.parent), f"{b.name}'s backbone is frozen ImageNet features; a model whose backbone was "
                "fine-tuned on chest X-rays adapts better from the same labelled images (`covid-cxr train "
                "--recipe accurate` builds one; docs/results/site.md).")
    return str(b.path.parent), ""


def next_step(check: SiteCheck) -> str:
    """What to do now, with the exact command."""
    b, r = check.bundle, check.result
    models = b.path.parent.parent
    if r.verdict == FIT:
        return (f"Nothing to adapt. Serve it; the server's monitor keeps testing the latest answers: "
                f"covid-cxr serve --models {models}")
    if r.verdict != SHIFT:
        return f"Add images: at least {MIN_IMAGES} (20 or more to detect the shifts measured in docs/results/site.md)."
    # the site alone: the adapted head starts from the bundle's (docs/results/site.md, "Adaptation that
    # pays"); mixing the development data back in drowns the site's films and its reference
    start, note = adapt_target(b)
    adapted = f"{Path(start).name}-site"
    # these films, unlabelled, give the site's class prevalence (train/adapt.py site_prior)
    prevalence = f" --site-unlabelled {check.folder}" if r.n >= SITE_PREVALENCE_MIN_IMAGES else ""
    return (f"Do not trust the model's figures on this site. Label at least {ADAPT_PER_CLASS} images per class "
            f"of it (one folder per class: {', '.join(b.classes)}) and adapt:\n"
            f"  covid-cxr train --init-from {start} --data SITE_LABELLED{prevalence} --out {models} --name {adapted}\n"
            + (f"{note}\n" if note else "")
            + f"then check fresh images of the site (not the labelled ones) against the adapted model: "
            f"covid-cxr site check --model {models}/{adapted} --data {check.folder}")


def _fmt(v) -> str:
    if isinstance(v, dict):
        return ", ".join(f"{k} {x:.0%}" for k, x in v.items())
    return f"{v:.4g}"


def report_text(check: SiteCheck) -> str:
    b, r = check.bundle, check.result
    ref = b.metadata.site_reference
    lines = [f"# site check: {b.name} v{b.version} on {check.folder.name}", "",
             f"- images: {r.n} read, {len(check.batch.skipped)} skipped; reference: {ref.computed_on}, {ref.n} images",
             f"- verdict: **{r.verdict}** (Holm-corrected family-wise level {r.alpha:g}; at least {MIN_IMAGES} images)",
             f"- {summary_words(r)}", ""]
    if r.signals:
        lines += ["| signal | test | p | p (Holm) | effect | site | reference | moved |", "|---|---|---|---|---|---|---|---|"]
        lines += [f"| {s.name} | {s.test} | {s.p_value:.2g} | {s.p_adjusted:.2g} | {s.effect_name} {s.effect:.2f} | "
                  f"{_fmt(s.site)} | {_fmt(s.reference)} | {'yes' if s.moved else ''} |" for s in r.signals]
        lines.append("")
    for tag, counts in check.sample.dicom.items():
        lines.append(f"- DICOM {tag}: " + ", ".join(f"{k} ({v})" for k, v in counts.items()))
    lines += ["## Next step", "", next_step(check), ""]
    return "\n".join(lines)


def write_outputs(check: SiteCheck, out: Path | None, json_path: Path | None) -> None:
    """report.md and shift.png under `out`; the result as JSON at `json_path`."""
    data = {**check.result.to_dict(), "model": {"name": check.bundle.name, "version": check.bundle.version},
            "folder": str(check.folder), "skipped": [{"path": p, "reason": why} for p, why in check.batch.skipped],
            "summary": summary_words(check.result), "next_step": next_step(check)}
    if json_path is not None:
        atomic_write_json(Path(json_path), data)
    if out is not None:
        from covid_cxr.site.plots import shift_png

        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out / "report.md", report_text(check))
        atomic_write_json(out / "site_check.json", data)
        shift_png(check.bundle.metadata.site_reference, check.sample, check.bundle.classes, check.result,
                  out / "shift.png")

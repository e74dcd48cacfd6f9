"""`covid-cxr run`: data -> train each architecture -> evaluate -> compare -> one summary report.

The dataset is scanned, deduplicated and split once, so every architecture sees the same split
(the comparison is fair) and no test image ever touches training.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

from covid_cxr.data import prepare
from covid_cxr.data.split import SPLITS
from covid_cxr.evaluate.compare import to_markdown, write_comparison
from covid_cxr.evaluate.report import metrics_table_md
from covid_cxr.train.fit import TrainConfig, TrainResult, train
from covid_cxr.core.files import atomic_folder, atomic_write_csv, atomic_write_json, atomic_write_text


def write_splits(prepared, path: Path) -> None:
    """Which image went to which split (csv module: paths may hold commas or quotes)."""
    atomic_write_csv(path, ["path", "label", "split", "sha256", "group"],
                     ([r.path, r.label, s, r.sha256, r.group] for s in SPLITS for r in prepared.splits[s]))


def run_pipeline(data_dir: Path, out: Path, archs: list[str], base: TrainConfig, synthetic: bool = False,
                 resume: bool = False, log=print) -> dict:
    """Every stage; the report folder appears whole at the end (core.files.atomic_folder), so a
    failed or interrupted run leaves none, only what --resume needs (train.fit.tidy_failed_run)."""
    out = Path(out)
    models_dir = out / "models"
    timings: dict[str, float] = {}

    t = time.perf_counter()
    prepared = prepare(data_dir, base.classes, base.balance, base.max_per_class, base.seed, progress=base.progress)
    prepared.manifest.write_csv(out / "manifest.csv")
    write_splits(prepared, out / "splits.csv")
    timings["data"] = time.perf_counter() - t
    log(f"data: {prepared.manifest.layout}; counts {prepared.counts()}; duplicates {prepared.dedupe}")

    results: dict[str, TrainResult] = {}
    for arch in archs:
        t = time.perf_counter()
        cfg = base.model_copy(update={"arch": arch, "name": f"synthetic-{arch}" if synthetic else None})
        results[arch] = train(data_dir, models_dir, cfg, workdir=out / "work", prepared=prepared, resume=resume)
        timings[f"train+evaluate+bundle {arch}"] = time.perf_counter() - t
        log(f"{arch}: accuracy {results[arch].metrics.accuracy:.3f} -> {results[arch].bundle_path}")

    t = time.perf_counter()
    with atomic_folder(out / "report") as tmp:
        rows = write_summary(tmp, data_dir, out, prepared, base, results, synthetic, timings, t)
    summary = {"report": str(out / "report" / "summary.md"), "models": str(models_dir), "timings_s": timings,
               "comparison": rows, "synthetic": synthetic}
    atomic_write_json(out / "report" / "summary.json", summary)
    return summary


def write_summary(report_dir: Path, data_dir: Path, out: Path, prepared, base: TrainConfig,
                  results: dict[str, TrainResult], synthetic: bool, timings: dict[str, float], t0: float) -> list:
    """The run's report folder: comparison table, each model's figures, summary.md; the rows."""
    rows, _, _ = write_comparison(out / "models", report_dir)
    tag = "SYNTHETIC DATA — " if synthetic else ""
    md = [f"# {tag}covid-cxr run: {Path(data_dir).name}\n\n"]
    if synthetic:
        md.append("> **SYNTHETIC DATA**: drawn images, not radiographs. These numbers test the software only.\n\n")
    md.append(f"- data: `{prepared.manifest.root}` ({prepared.manifest.layout}); {len(prepared.manifest.records)} "
              f"files, {sum(r.status == 'skipped' for r in prepared.manifest.records)} skipped, duplicates "
              f"{prepared.dedupe}\n- balance: {base.balance}, max per class: {base.max_per_class}, seed "
              f"{base.seed}\n- split (group-aware, stratified): {prepared.counts()}\n"
              f"- normalisation (train split only): mean {prepared.mean:.4f}, std {prepared.std:.4f}\n\n"
              f"## Comparison (test split)\n\n{to_markdown(rows)}\n")
    for arch, r in results.items():
        rel = r.bundle_path.relative_to(out)
        shutil.copy(r.bundle_path / "report" / "confusion_matrix.png", report_dir / f"{arch}_confusion.png")
        shutil.copy(r.bundle_path / "report" / "curves.png", report_dir / f"{arch}_curves.png")
        md.append(f"## {arch}\n\nBundle: `{rel}`; epochs run {len(r.history)}\n\n{metrics_table_md(r.metrics)}\n"
                  f"![{arch} confusion](./{arch}_confusion.png) ![{arch} curves](./{arch}_curves.png)\n\n")
    timings["compare+report"] = time.perf_counter() - t0
    md.append("## Seconds per stage\n\n" + "\n".join(f"- {k}: {v:.1f}" for k, v in timings.items()) + "\n")
    atomic_write_text(report_dir / "summary.md", "".join(md))
    return rows

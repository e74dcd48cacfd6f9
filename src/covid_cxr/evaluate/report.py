"""Write an evaluation report: metrics.json, metrics.md (the study's table), confusion matrix PNG."""

from __future__ import annotations

from pathlib import Path

from covid_cxr.evaluate.plots import confusion_matrix_png
from covid_cxr.evaluate.trust_report import ci_text, trust_md
from covid_cxr.core.files import atomic_write_json, atomic_write_text
from covid_cxr.core.results import Metrics, OperatingPoint

KEY_CLASS = "COVID-19"


def metrics_table_md(m: Metrics) -> str:
    rows = ["| Category | Precision | Recall | F1 | Support | ROC AUC |", "|---|---|---|---|---|---|"]
    for c, e in m.per_class.items():
        auc = "–" if e.roc_auc is None else f"{e.roc_auc:.3f}"
        rows.append(f"| {c} | {e.precision:.2f}{ci_text(e, 'precision')} | {e.recall:.2f}{ci_text(e, 'recall')} | "
                    f"{e.f1:.2f}{ci_text(e, 'f1')} | {e.support} | {auc} |")
    lo, hi = m.accuracy_ci95
    summary = f"\nAccuracy **{m.accuracy:.3f}** (95% CI {lo:.3f}–{hi:.3f}, n = {m.n})"
    if KEY_CLASS in m.per_class:
        e = m.per_class[KEY_CLASS]
        rlo, rhi = e.recall_ci95
        summary += f"; {KEY_CLASS} recall **{e.recall:.3f}** (95% CI {rlo:.3f}–{rhi:.3f})."
    return "\n".join(rows + [summary]) + "\n"


def operating_point_md(m: Metrics) -> str:
    """The operating-point table beside the argmax one (empty when none is set)."""
    op = m.operating_point
    if op is None:
        return ""
    return (f"\n## At the operating point: {op.class_name} when p >= {op.threshold:.4f}\n\n"
            f"Fitted on the {op.fitted_on} for recall >= {op.target_recall} (there: {op.val_recall:.3f}, "
            f"{op.val_images} images){_conformal_md(op)}; otherwise the argmax.\n\n" + metrics_table_md(op.metrics))


def _conformal_md(op: OperatingPoint) -> str:
    if op.rule != "conformal":
        return ""
    films = "new films" if op.batch is None else f"each batch of {op.batch} new films"
    return (f", conformal: the target met on {films} of the same population with probability "
            f">= {op.confidence_reached:.3f} (wanted {op.confidence})")


def sources_md(m: Metrics) -> str:
    """Per-source tables when the training data came from several folders."""
    parts = [f"\n## Source: {s}\n\n" + metrics_table_md(sm) + operating_point_md(sm).replace("## ", "### ")
             for s, sm in (m.by_source or {}).items()]
    return "".join(parts)


def write_report(m: Metrics, out: Path, title: str, extra_md: str = "") -> None:
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / "metrics.json", m.model_dump(mode="json", exclude_none=True))
    confusion_matrix_png(m.confusion_matrix, m.classes, out / "confusion_matrix.png", title)
    md = [f"# {title}\n", "\n## Argmax\n\n" if m.operating_point else "", metrics_table_md(m),
          operating_point_md(m), sources_md(m), trust_md(m, out, title), "\n![confusion matrix](confusion_matrix.png)\n"]
    if (out / "curves.png").is_file():
        md.append("\n![training curves](curves.png)\n")
    if (out / "lr_find.png").is_file():
        md.append("\n![LR range test](lr_find.png)\n")
    atomic_write_text(out / "metrics.md", "".join(md) + extra_md)

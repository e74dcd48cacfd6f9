"""The model card (MODEL_CARD.md and MODEL_CARD.html) of a bundle, from the bundle alone.

Sections as Hugging Face model cards and Mitchell et al. 2019 ("Model Cards for Model Reporting")
lay them out, filled from metadata.json and report/ (metrics.json; audit.json where `covid-cxr
audit --out MODELS/<name>/<version>/report` put one). A figure the bundle does not hold is written
"not measured", never guessed. Torch-free: the server renders cards of older bundles on request.
"""

from __future__ import annotations

import json
from pathlib import Path

from covid_cxr.bundle.reader import Bundle
from covid_cxr.bundle.schema import BundleMetadata
from covid_cxr.core.files import atomic_write_text

CARD_MD = "MODEL_CARD.md"
CARD_HTML = "MODEL_CARD.html"
NOT_MEASURED = "not measured"
VIRAL = "Viral Pneumonia"
SHORTCUT_NOTE = (f"**Known shortcut:** in the COVID-19 Radiography Database the {VIRAL} images (and part of "
                 "Normal) come from a paediatric collection (children aged 1-5, one hospital), while the COVID-19 "
                 "images are adults' from many sources. A model can tell the classes apart by age, body size, "
                 "scanner and text marks rather than by disease: treat its scores on that database as an upper "
                 "bound, not as evidence of clinical skill.")
CLI_FIELDS = ("arch", "weights", "epochs", "batch_size", "lr", "seed", "balance", "max_per_class", "image_size",
              "hidden", "dropout", "patience", "finetune", "finetune_epochs", "finetune_views", "finetune_from_block",
              "precision", "classes", "name", "lung_crop", "lungs", "target_recall", "target_confidence", "target_batch",
              "init_from", "site_unlabelled", "extractor")


def _f(x, digits: int = 3) -> str:
    return NOT_MEASURED if x is None else f"{x:.{digits}f}"


def _ci(ci) -> str:
    return "" if not ci else f" (95% CI {ci[0]:.3f}–{ci[1]:.3f})"


def _pct(x) -> str:
    return NOT_MEASURED if x is None else f"{100 * x:.1f}%"


def _read_json(path: Path) -> dict | None:
    """A report file as a dict, or None when it is absent or unreadable (a card never fails on it)."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _overview(m: BundleMetadata) -> list[str]:
    a, i = m.architecture, m.input
    members = f"; an ensemble of {len(a.members)} models" if a.members else ""
    return [f"# Model card: {m.name} v{m.version}", "",
            f"- **Task:** {m.task}; classes, in output order: {', '.join(m.classes)}",
            f"- **Architecture:** {a.name} (timm `{a.timm_name}`), weights: {a.weights}{members}; head "
            f"{a.hidden or 'linear'}, backbone {'frozen' if a.frozen_backbone else 'fine-tuned'}",
            f"- **Input:** {i.height}x{i.width} grayscale, {i.resize}; normalised inside the model "
            f"(mean {i.normalisation.mean:.4f}, std {i.normalisation.std:.4f}, {i.normalisation.computed_on})",
            f"- **Files:** model.onnx (opset {m.onnx.opset}; agrees with PyTorch to {m.onnx.parity_max_abs_diff:.1e} "
            f"on {m.onnx.parity_images} images), model.safetensors, metadata.json, report/",
            f"- **Created:** {m.created.isoformat()}", ""]


def _intended_use(m: BundleMetadata) -> list[str]:
    return ["## Intended use", "",
            "Research and teaching: studying transfer learning, calibration, out-of-distribution gating and "
            "shortcut learning on chest X-rays; a reproducible baseline for comparisons; demonstrating a "
            f"serving stack. It sorts one frontal chest X-ray into {', '.join(m.classes)}.", "",
            "## Out-of-scope use", "",
            "- **Diagnosis or triage of patients.** It has not been validated for patient care, by any "
            "regulator or in any prospective study; it is no substitute for a PCR test or a radiologist.",
            "- Images unlike its training images: lateral views, CT, other body parts, photos of screens, "
            "children's X-rays for the adult classes (the gate below rejects some of these, not all).",
            "- Diseases it was not trained on: an X-ray of another condition still gets one of its classes.",
            "- Populations, hospitals and scanners other than the training data's without a site check "
            "(`covid-cxr evaluate` on local labelled images first).", ""]


def _training_data(m: BundleMetadata) -> list[str]:
    out = ["## Training data", ""]
    if m.training is None:
        return out + [f"Training record: {NOT_MEASURED} (this bundle carries none).", ""] + _shortcuts(m)
    d = m.training.data
    out += [f"Dataset folder `{Path(d.dataset_root).name}` ({d.layout}), manifest sha256 `{d.manifest_sha256[:16]}…`: "
            f"{d.files_found} files found, {d.files_skipped} unreadable skipped, {d.exact_duplicates_removed} exact "
            f"duplicates removed; balance: {d.balance}"
            + (f" (at most {d.max_per_class} per class)" if d.max_per_class else "")
            + f"; split {'/'.join(f'{x:.2f}' for x in d.split_fractions)} (seed {d.seed}).", "",
            "| split | " + " | ".join(m.classes) + " |", "|---|" + "---|" * len(m.classes)]
    for split, counts in d.counts.items():
        out.append(f"| {split} | " + " | ".join(str(counts.get(c, 0)) for c in m.classes) + " |")
    return out + [""] + _shortcuts(m)


def _shortcuts(m: BundleMetadata) -> list[str]:
    out = ["### Known shortcuts", ""] + ([SHORTCUT_NOTE, ""] if VIRAL in m.classes else [])
    return out + ["Any class that comes from fewer sources than the others can be learnt from its source's marks. "
                  "The audit section below says whether the probes found such a shortcut in this model.", ""]


def _evaluation(m: BundleMetadata, metrics: dict | None) -> list[str]:
    out = ["## Evaluation", ""]
    if m.task == "segmentation":
        t = m.segmentation.test_metrics if m.segmentation else None
        if t is None:
            return out + [f"Lung masks on the held-out split: {NOT_MEASURED}.", ""]
        return out + [f"Lung masks on the held-out split: Dice {_f(t.dice)}, IoU {_f(t.iou)} (n = {t.n}).", ""]
    t = m.test_metrics
    if t is None:
        return out + [f"Test metrics: {NOT_MEASURED} (no test split was scored).", ""]
    boot = t.ci.model_dump() if t.ci is not None else ((metrics or {}).get("ci") or {})
    macro_ci = _ci(boot.get("macro_f1"))
    out += [f"On the held-out test split (n = {t.n}): accuracy **{t.accuracy:.3f}**{_ci(t.accuracy_ci95)}, "
            f"macro-F1 {_f(t.macro_f1)}{macro_ci}. Accuracy and recall intervals are Wilson 95% intervals; "
            f"precision and F1 intervals are {boot.get('method', 'bootstrap')} ({NOT_MEASURED} where blank).", "",
            "| class | precision | recall | F1 | ROC AUC | support |", "|---|---|---|---|---|---|"]
    for c, e in t.per_class.items():
        ci = e.ci.model_dump() if e.ci is not None else {}
        out.append(f"| {c} | {e.precision:.3f}{_ci(ci.get('precision'))} | {e.recall:.3f}{_ci(e.recall_ci95)} | "
                   f"{e.f1:.3f}{_ci(ci.get('f1'))} | {_f(e.roc_auc)} | {e.support} |")
    out += ["", "Confusion matrix (rows: true class, columns: predicted, in the class order above): "
            + "; ".join(f"{c}: {row}" for c, row in zip(t.classes, t.confusion_matrix)) + ".", ""]
    op = m.operating_point
    out += ["### Operating point", "",
            (f"{op.class_name} whenever its probability ≥ {op.threshold:.4f} (else the most probable class): "
             f"target recall {op.target_recall:.2f}, {op.val_recall:.3f} on {op.val_images} {op.fitted_on} images."
             if op else "None set: the label is the most probable class."), ""]
    return out


def _calibration(m: BundleMetadata, metrics: dict | None) -> list[str]:
    cal = m.trust.calibration if m.trust else None
    t, old = m.test_metrics, metrics or {}  # report/metrics.json: for bundles whose metadata lacks them
    ece = t.ece if t is not None and t.ece is not None else old.get("ece")
    brier = t.brier if t is not None and t.brier is not None else old.get("brier")
    out = ["## Calibration", ""]
    if cal is None:
        out.append(f"Temperature scaling: {NOT_MEASURED} (the probabilities are the network's own).")
    else:
        out.append(f"Temperature scaling inside model.onnx: T = {cal.temperature:.3f}, fitted on the {cal.fitted_on} "
                   f"(negative log-likelihood {_f(cal.val_nll_before)} before, {_f(cal.val_nll_after)} after).")
    prev = m.trust.prevalence if m.trust else None
    if prev is not None:
        share = ", ".join(f"{c} {v:.0%}" for c, v in prev.prevalence.items())
        out += ["", f"Answers carry this site's class prevalence, estimated on {prev.images} of its unlabelled films "
                f"(EM): {share}. On films of another population, adapt again."]
    return out + ["", f"On the test split: expected calibration error (15 bins) {_f(ece)}, Brier score {_f(brier)}.", ""]


def _gate(m: BundleMetadata, metrics: dict | None) -> list[str]:
    g = m.trust.ood if m.trust else None
    out = ["## Out-of-distribution gate", ""]
    if g is None:
        return out + [f"Gate: {NOT_MEASURED} (this bundle has none: every image gets a label).", ""]
    ood_rate = m.test_metrics.ood_rate if m.test_metrics else None
    ood_rate = ood_rate if ood_rate is not None else (metrics or {}).get("ood_rate")
    return out + [f"An image whose `ood_score` ({g.method}) exceeds {g.threshold:.4g} is rejected: no label is "
                  "given, only the probabilities on request. The threshold was set to accept "
                  f"{_pct(g.accept_target)} of the validation split.", "",
                  "| | accepted |", "|---|---|", f"| validation split | {_pct(g.val_accept_rate)} |",
                  f"| test split | {_pct(g.test_accept_rate)} |",
                  f"| test split, rejected | {_pct(ood_rate)} |", "",
                  "The gate only knows the training images: it rejects noise, drawings and photos, but an X-ray "
                  "of another kind that looks like the training images passes.", ""]


def _audit(audit: dict | None, name: str) -> list[str]:
    out = ["## Shortcut audit", ""]
    if audit is None:
        return out + [f"Verdict: {NOT_MEASURED}. Run `covid-cxr audit --model MODELS/{name} --data DATASET "
                      f"--out MODELS/{name}/<version>/report` and `covid-cxr card MODELS/{name}` again.", ""]
    verdict = "**shortcut suspected**" if audit.get("shortcut_suspected") else "no shortcut found by these probes"
    out += [f"Verdict: {verdict} (on `{Path(str(audit.get('data', '?'))).name}`, "
            f"{(audit.get('sample') or {}).get('n', '?')} images)."]
    out += [f"- {name}: {p.get('verdict', NOT_MEASURED)}" for name, p in (audit.get("probes") or {}).items()]
    return out + [""]


def _lungs(m: BundleMetadata, path: Path, audit: dict | None) -> list[str]:
    out = ["## Lung fields and zones", ""]
    crop = m.lung_crop
    if crop is not None:
        seg = _read_json(path / crop.folder / "metadata.json") or {}
        dice = ((seg.get("segmentation") or {}).get("test_metrics") or {}).get("dice")
        out.append(f"- Input: lung-only ({crop.mode} crop) by its own lung model ({crop.folder}/, Dice {_f(dice)} "
                   "on its test masks).")
    cam = ((audit or {}).get("probes") or {}).get("gradcam")
    if cam:
        mass = ", ".join(f"{c} {e['mean']:.2f}" for c, e in cam.get("mass_in_lungs", {}).items())
        out.append(f"- Grad-CAM mass inside the lung fields ({(audit.get('lung_fields') or {}).get('method', 'lung fields')}"
                   f"): {mass}; a uniform map would give {cam.get('chance', 0):.2f}.")
    zones = _read_json(path / "report" / "zones.json")
    if zones:
        out.append("- Strongest zone per class: " + ", ".join(f"{k}: {v}" for k, v in zones.items()))
    if len(out) == 2:
        out.append(f"Lung-zone findings: {NOT_MEASURED} (whole-image input; no audit with Grad-CAM in report/).")
    return out + [""]


def _limitations(m: BundleMetadata) -> list[str]:
    t = m.test_metrics
    out = ["## Limitations", "",
           "- One public database, one label per image (from the source, not from a reading of each image).",
           "- Held-out images come from the same sources as the training images: the test figures say nothing "
           "about other hospitals (see Known shortcuts)."]
    if t is not None and t.n < 300:
        out.append(f"- A small test split (n = {t.n}): the intervals above are wide; differences of a few "
                   "points between models are within them.")
    if "none" in m.architecture.weights.lower():
        out.append("- The backbone has random weights (no pretraining): a test or demo model, not a useful one.")
    return out + ["- Grayscale frontal views only; DICOM is read through its LUTs but never checked for view "
                  "or body part beyond the gate.", ""]


def reproduce_command(m: BundleMetadata) -> str:
    """The `covid-cxr train` command that rebuilds this bundle from its recorded configuration."""
    cfg = m.training.config
    default = type(cfg)()  # TrainConfig's defaults, without importing the training layer
    words = ["covid-cxr", "train", "--data", Path(m.training.data.dataset_root).name, "--out", "MODELS"]
    for field in CLI_FIELDS:
        v = getattr(cfg, field)
        if field not in ("arch", "weights", "seed") and v == getattr(default, field):
            continue
        flag = "--" + field.replace("_", "-")
        if isinstance(v, bool):
            words.append(flag if v else f"--no-{field.replace('_', '-')}")
        elif v is not None:
            words += [flag, ",".join(map(str, v)) if isinstance(v, list) else str(v)]
    return " ".join(words)


def _reproduce(m: BundleMetadata) -> list[str]:
    sw = m.software
    commit = sw.get("covid-cxr commit", "not recorded (written outside a git checkout, or before bundles recorded it)")
    out = ["## How to reproduce", ""]
    if m.training is None:
        out.append(f"Training command: {NOT_MEASURED} (no training record).")
    else:
        out += ["```", reproduce_command(m), "```", "",
                "`--data` names the dataset folder the bundle was trained on; its manifest sha256 (above) tells "
                "whether a folder holds the same images.", ""]
    h = m.training.history if m.training else None
    if h is not None:
        out.append(f"Epochs run {h.epochs_run}, best epoch {h.best_epoch}, best validation accuracy "
                   f"{_f(h.best_val_acc)}; {_f(m.training.timings_s.get('total'), 0)} s in all.")
    return out + ["", f"covid-cxr {sw.get('covid-cxr', '?')}, commit `{commit}`; "
                  + ", ".join(f"{k} {v}" for k, v in sw.items() if k not in ("covid-cxr", "covid-cxr commit")), ""]


def card_markdown(path: Path, meta: BundleMetadata) -> str:
    """The card of the bundle at `path` (whose metadata is `meta`) as Markdown."""
    path = Path(path)
    metrics = _read_json(path / "report" / "metrics.json")
    audit = _read_json(path / "report" / "audit.json")
    parts = [_overview(meta), _intended_use(meta), _training_data(meta), _evaluation(meta, metrics)]
    if meta.task == "classification":
        parts += [_calibration(meta, metrics), _gate(meta, metrics), _audit(audit, meta.name),
                  _lungs(meta, path, audit)]
    parts += [_limitations(meta), _reproduce(meta),
              ["---", "", "Sections after Mitchell et al. 2019, *Model Cards for Model Reporting*. Written by "
               "`covid-cxr card` from metadata.json and report/ alone."]]
    return "\n".join(line for part in parts for line in part) + "\n"


def card_html(markdown: str, title: str) -> str:
    """The Markdown card as one self-contained HTML page (raw HTML in the text is escaped, not passed on)."""
    from html import escape

    from markdown_it import MarkdownIt

    body = MarkdownIt("commonmark", {"html": False}).enable("table").render(markdown)
    return ("<!doctype html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
            f"<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\n<title>{escape(title)}</title>\n"
            "<style>body{font-family:system-ui,sans-serif;max-width:60rem;margin:2rem auto;padding:0 1rem;"
            "line-height:1.5}table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:.25rem .5rem}"
            "code,pre{background:#f4f4f4}pre{padding:.5rem;overflow-x:auto}</style>\n</head>\n<body>\n"
            f"{body}</body>\n</html>\n")


def write_card(folder: Path, meta: BundleMetadata) -> tuple[Path, Path]:
    """Write MODEL_CARD.md and MODEL_CARD.html into a bundle folder, each atomically."""
    folder = Path(folder)
    md = card_markdown(folder, meta)
    atomic_write_text(folder / CARD_MD, md)
    atomic_write_text(folder / CARD_HTML, card_html(md, f"Model card: {meta.name} v{meta.version}"))
    return folder / CARD_MD, folder / CARD_HTML


def write_bundle_card(bundle: Bundle) -> tuple[Path, Path]:
    return write_card(bundle.path, bundle.metadata)

"""The audit's report: audit.md with one section per probe (figure, chance level, verdict), the
plots it shows, and audit.json."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from covid_cxr.core.figures import plt, save_png
from covid_cxr.core.files import atomic_write_json, atomic_write_text


def occlusion_png(p: dict, classes: list[str], path: Path) -> None:
    variants = list(p["accuracy"])
    groups = ["accuracy", *classes]
    fig, ax = plt.subplots(figsize=(7, 3.6))
    width = 0.8 / len(variants)
    for k, v in enumerate(variants):
        a = p["accuracy"][v]
        vals = [a["accuracy"], *(a["recall"][c] or 0.0 for c in classes)]
        ax.bar(np.arange(len(groups)) + k * width, vals, width, label=v)
    ax.axhline(p["chance"], color="k", ls="--", lw=1, label=f"chance {p['chance']:.2f}")
    ax.set_xticks(np.arange(len(groups)) + width * (len(variants) - 1) / 2,
                  ["accuracy", *(f"{c} recall" for c in classes)])
    ax.set_ylim(0, 1.05)
    ax.legend(fontsize=8, loc="lower right")
    ax.set_title("occlusion: what is left when the lung fields (or all but them) are hidden")
    save_png(fig, path)


def acquisition_png(p: dict, path: Path) -> None:
    names = list(p["balanced_accuracy"])
    fig, ax = plt.subplots(figsize=(6.4, 3.2))
    ax.barh(names[::-1], [p["balanced_accuracy"][n] for n in names[::-1]], color="tab:purple")
    ax.axvline(p["chance"], color="k", ls="--", lw=1, label=f"chance {p['chance']:.2f}")
    ax.set_xlim(0, 1)
    ax.set_xlabel(f"balanced accuracy ({p['folds']}-fold cross-validated)")
    ax.legend(fontsize=8)
    ax.set_title("acquisition probe: the label read off non-clinical features")
    save_png(fig, path)


def gradcam_png(p: dict, path: Path) -> None:
    names = list(p["mass_in_lungs"])
    fig, ax = plt.subplots(figsize=(5.2, 3.2))
    ax.bar(names, [p["mass_in_lungs"][n]["mean"] for n in names], yerr=[p["mass_in_lungs"][n]["sd"] for n in names],
           color="tab:orange", capsize=4)
    ax.axhline(p["chance"], color="k", ls="--", lw=1, label=f"uniform map {p['chance']:.2f}")
    ax.set_ylim(0, 1)
    ax.set_ylabel("share of Grad-CAM mass in lung fields")
    ax.legend(fontsize=8)
    ax.set_title("Grad-CAM mass inside the lung fields (by true class)")
    save_png(fig, path)


def regions_png(sample, masks: np.ndarray, cams: list, path: Path) -> None:
    """One image per class: the lung fields, both occlusions, and its Grad-CAM (when computed)."""
    explained = {e["path"] for e in cams}
    picks = [next((int(k) for k in np.flatnonzero(sample.labels == i) if str(sample.paths[k]) in explained),
                  int(np.flatnonzero(sample.labels == i)[0])) for i in np.unique(sample.labels)]
    fig, axes = plt.subplots(len(picks), 4, figsize=(9, 2.4 * len(picks)), squeeze=False)
    for row, i in zip(axes, picks):
        x, m = sample.images[i], masks[i]
        mean = x.mean()
        cam = next((e["cam"] for e in cams if e["path"] == str(sample.paths[i])), None)
        panels = [(x, "image + lung fields"), (np.where(m, mean, x), "lungs hidden"),
                  (np.where(m, x, mean), "only lungs"), (x, "Grad-CAM" if cam is not None else "")]
        for k, (ax, (img, title)) in enumerate(zip(row, panels)):
            ax.imshow(img, cmap="gray", vmin=0, vmax=1)
            if k == 0:
                ax.contour(m, levels=[0.5], colors="yellow", linewidths=1)
            if k == 3 and cam is not None:
                ax.imshow(cam, cmap="jet", alpha=0.4, vmin=0, vmax=1)
            ax.set_title(f"{title}", fontsize=8)
            ax.axis("off")
        row[0].set_ylabel(sample.paths[i].parent.name)
    save_png(fig, path)


def audit_md(r: dict) -> str:
    s = r["sample"]
    flag = "**SHORTCUT SUSPECTED**" if r["shortcut_suspected"] else "no shortcut found by these probes"
    lines = [f"# Shortcut audit: {r['model']['name']} v{r['model']['version']} on {Path(r['data']).name}\n",
             f"\nVerdict: {flag}.\n", *(f"- {x}\n" for x in r["reasons"]),
             f"\nSample: {s['n']} images (at most {s['per_class_max']} per class, seed {s['seed']}): "
             + ", ".join(f"{c} {n}" for c, n in s["counts"].items()) + f"; {len(s['skipped'])} unreadable skipped. "
             "Drawn from the whole folder: images the model was trained on may be among them (the probes "
             "compare the model with itself, occluded or not).\n",
             f"\nLung fields: {r['lung_fields']['note']}.\n\n![regions](regions.png)\n"]
    p = r["probes"]["occlusion"]
    lines += ["\n## Occlusion (DeGrave et al. 2021)\n\n| variant | accuracy | " +
              " | ".join(f"{c} recall" for c in p["accuracy"]["full image"]["recall"]) + " |\n|---|---|" +
              "---|" * len(p["accuracy"]["full image"]["recall"]) + "\n"]
    for v, a in p["accuracy"].items():
        lines.append(f"| {v} | {a['accuracy']:.3f} | " + " | ".join("–" if x is None else f"{x:.3f}"
                                                                  for x in a["recall"].values()) + " |\n")
    lines.append(f"\nChance {p['chance']:.3f}. Verdict: {p['verdict']}.\n\n![occlusion](occlusion.png)\n")
    p = r["probes"]["acquisition"]
    lines.append("\n## Acquisition probe\n\n| features | balanced accuracy |\n|---|---|\n")
    lines += [f"| {k} | {v:.3f} |\n" for k, v in p["balanced_accuracy"].items()]
    lines.append(f"\nChance {p['chance']:.3f} ({p['classifier']}, {p['folds']}-fold). Verdict: {p['verdict']}.\n"
                 "\n![acquisition](acquisition.png)\n")
    if "gradcam" in r["probes"]:
        p = r["probes"]["gradcam"]
        lines.append("\n## Grad-CAM mass in the lung fields\n\n| class | mean | sd | n |\n|---|---|---|---|\n")
        lines += [f"| {c} | {e['mean']:.3f} | {e['sd']:.3f} | {e['n']} |\n" for c, e in p["mass_in_lungs"].items()]
        lines.append(f"\nChance (uniform map) {p['chance']:.3f}. Verdict: {p['verdict']}.\n\n![gradcam](gradcam.png)\n")
    return "".join(lines)


def write_audit(result: dict, sample, masks: np.ndarray, out: Path) -> None:
    from covid_cxr.trust.audit import strip_arrays

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    classes = list(result["sample"]["counts"])
    occlusion_png(result["probes"]["occlusion"], classes, out / "occlusion.png")
    acquisition_png(result["probes"]["acquisition"], out / "acquisition.png")
    cams = []
    if "gradcam" in result["probes"]:
        gradcam_png(result["probes"]["gradcam"], out / "gradcam.png")
        cams = result["probes"]["gradcam"]["examples"]
    regions_png(sample, masks, cams, out / "regions.png")
    atomic_write_json(out / "audit.json", strip_arrays(result))
    atomic_write_text(out / "audit.md", audit_md(result))

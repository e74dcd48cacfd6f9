"""`covid-cxr explain` (registered on the main Typer app by `register`).

    covid-cxr explain IMAGE... --model MODELS/<name>[/<version>] --out DIR
                      [--method gradcam] [--class C] [--alpha 0.4]

For each image (files, or folders holding PNG / JPEG / DICOM files) it writes
``<stem>_cam.png`` (the map over the X-ray) and ``<stem>_cam.npy`` (the raw map, float32 in
[0, 1] at the model's input size), each written atomically, and prints a table of predictions.
An unreadable image is reported and skipped.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from covid_cxr.data.files import collect_images, unique_stem
from covid_cxr.models.loading import load_torch


def resolve_class(value: Optional[str], classes: list[str]) -> Optional[int]:
    """--class as an index or a class name (case-insensitive); None means the predicted class."""
    if value is None or value.strip() == "":
        return None
    v = value.strip()
    if v.lstrip("-").isdigit():
        idx = int(v)
        if not 0 <= idx < len(classes):
            raise ValueError(f"class index {idx} out of range 0..{len(classes) - 1} ({', '.join(classes)})")
        return idx
    lowered = [c.lower() for c in classes]
    if v.lower() in lowered:
        return lowered.index(v.lower())
    raise ValueError(f"unknown class {value!r}; the model's classes: {', '.join(classes)} (or an index)")


def explain_command(
    images: Annotated[list[Path], typer.Argument(help="Image files or folders (PNG, JPEG, DICOM).")],
    model: Annotated[Path, typer.Option("--model", help="The model: MODELS/<name> (its newest version) or a version folder.")],
    out: Annotated[Path, typer.Option("--out", help="Folder for <stem>_cam.png and <stem>_cam.npy.")],
    method: Annotated[str, typer.Option("--method", help="gradcam | gradcam++ | xgradcam | eigencam | "
                                        "layercam | hirescam | scorecam (slow: one forward per channel)")] = "gradcam",
    class_: Annotated[Optional[str], typer.Option("--class", help="Class to explain, by name or index "
                                                  "(default: each image's predicted class).")] = None,
    alpha: Annotated[float, typer.Option("--alpha", min=0.0, max=1.0, help="Map opacity over the X-ray.")] = 0.4,
    progress: Annotated[bool, typer.Option(help="Show a progress bar.")] = True,
    lungs: Annotated[Optional[Path], typer.Option("--lungs", help="Lung segmentation bundle (MODELS/lungs): "
                                                  "report the map's share inside the lungs and its strongest zone.")] = None,
):
    """Grad-CAM maps over X-rays: <stem>_cam.png (overlay) and <stem>_cam.npy (raw map) per image."""
    from rich.console import Console

    from covid_cxr.cli.common import err_console as err
    from covid_cxr.cli.common import fail, open_bundle
    from covid_cxr.explain.render import METHODS

    console = Console()

    method = method.strip().lower()
    if method not in METHODS:
        fail(f"unknown method {method!r}; choose from {', '.join(METHODS)}")
    bundle = open_bundle(model)
    classes = bundle.classes
    try:
        class_index = resolve_class(class_, classes)
    except ValueError as exc:
        fail(str(exc))
    files, problems = collect_images(images)
    for p, why in problems:
        err.print(f"[yellow]skipped[/] {p}: {why}", soft_wrap=True)
    if not files:
        fail("no images to explain")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        fail(f"cannot create {out}: {exc}")

    explainer = _explainer(bundle, method)
    segmenter = _segmenter(lungs)
    rows, skipped = _explain_files(explainer, bundle, files, class_index, method, alpha, out, progress, segmenter)

    console.print(_table(f"{bundle.name} v{bundle.version} — {method}, layer {explainer.layer_name}", rows,
                         segmenter is not None))
    console.print(f"{len(rows)} explained, {len(skipped)} skipped; written to {out}")
    if not rows:
        raise typer.Exit(1)


def _explainer(bundle, method: str):
    """Grad-CAM from the bundle's cam.onnx (ONNX Runtime, what the server answers) where it has
    one; the other methods, and bundles written before cam.onnx, through PyTorch and grad-cam."""
    if method == "gradcam" and bundle.has_cam:
        from covid_cxr.explain.render import GraphExplainer

        return GraphExplainer(bundle)
    from covid_cxr.explain.gradcam import Explainer

    return Explainer(load_torch(bundle), layer=bundle.metadata.architecture.cam_layer,
                     temperature=bundle.temperature)


def _table(title: str, rows: list[tuple], lungs: bool):
    from rich.table import Table

    t = Table(title=title)
    t.add_column("image", overflow="fold")
    for col in ("predicted (p)", "in distribution", "explained class", "probability") + (("where (lungs)",) if lungs else ()):
        t.add_column(col)
    for r in rows:
        t.add_row(*r)
    return t


def _segmenter(lungs: Optional[Path]):
    if lungs is None:
        return None
    from covid_cxr.lungs.segment import LungSegmenter

    return LungSegmenter.from_bundle(lungs)


def where_in_lungs(segmenter, pixels, cam) -> tuple[str, dict]:
    """'72 % inside the lungs; strongest: left lower zone' (+ the mask's sanity warning), and the
    figures as a dict for <stem>_lungs.json."""
    from covid_cxr.lungs.segment import sanity_check
    from covid_cxr.lungs.zones import cam_zones

    mask = segmenter.masks(pixels[None])[0]
    z, s = cam_zones(cam, mask), sanity_check(mask)
    text = z.summary + ("" if s.ok else f" (lung check failed: {'; '.join(s.problems)}: out of distribution?)")
    return text, {**z.as_dict(), "lung_check": s.as_dict()}


def _explain_files(explainer, bundle, files: list[Path], class_index: Optional[int], method: str, alpha: float,
                   out: Path, progress: bool, segmenter=None) -> tuple[list[tuple], list[tuple[Path, str]]]:
    """Explain each file (`explain.run.explain_image`: the bundle's own answer, as predict gives it)
    and write its files; unreadable files are skipped."""
    from rich.markup import escape

    from covid_cxr.cli.common import err_console as err
    from covid_cxr.core.progress import progress_iter
    from covid_cxr.data.decode import DecodeError, load_for_model
    from covid_cxr.explain.run import explain_image, write_explained

    classes, (h, w) = bundle.classes, bundle.input_hw
    rows, skipped, used = [], [], set()
    for f in progress_iter(files, f"Grad-CAM ({method})", enabled=progress):
        try:
            pixels = load_for_model(f, h, w)
        except DecodeError as exc:
            skipped.append((f, str(exc)))
            err.print(f"[yellow]skipped[/] {f}: {exc}", soft_wrap=True, markup=True, highlight=False)
            continue
        e = explain_image(bundle, explainer, pixels, class_index, method)
        r = e.row(classes)
        text, info = where_in_lungs(segmenter, e.pixels, e.cam) if segmenter is not None else (None, None)
        write_explained(e, out, unique_stem(f, used), alpha, info)
        gate = escape(r["gate"]) if r["in_distribution"] is not False else f"[red]{escape(r['gate'])}[/]"
        label = "—" if r["label"] is None else f"{r['label']} ({r['probabilities'][r['label']]:.3f})"
        rows.append((escape(str(f)), label, gate,
                     r["explained_class"], f"{r['explained_probability']:.3f}") + ((text,) if text else ()))
    return rows, skipped


def register(app: typer.Typer) -> None:
    app.command("explain")(explain_command)

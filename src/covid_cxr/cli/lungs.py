"""`covid-cxr lungs train | evaluate | segment` (registered on the main Typer app by `register`)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from covid_cxr.cli.common import JsonOpt, config_option
from covid_cxr.core.lung_config import DEFAULTS as D

lungs_app = typer.Typer(no_args_is_help=True, help="Lung segmentation: train, evaluate, segment.")


def _opt(field: str, *names: str):
    from covid_cxr.core.lung_config import LungConfig

    return config_option(LungConfig, field, *names)


@lungs_app.command("train")
def train_cmd(data: Annotated[Path, typer.Option("--data", help="Folder with images/ and masks/ (like lung-masks).")],
              out: Annotated[Path, typer.Option("--out", help="Model repository (MODELS).")],
              name: Annotated[str, _opt("name")] = D.name, epochs: Annotated[int, _opt("epochs")] = D.epochs,
              image_size: Annotated[int, _opt("image_size")] = D.image_size,
              batch_size: Annotated[int, _opt("batch_size")] = D.batch_size, lr: Annotated[float, _opt("lr")] = D.lr,
              weights: Annotated[str, _opt("weights")] = D.weights,
              frozen_stages: Annotated[int, _opt("frozen_stages")] = D.frozen_stages,
              decoder_channels: Annotated[str, _opt("decoder_channels")] = ",".join(map(str, D.decoder_channels)),
              channels_last: Annotated[bool, _opt("channels_last", "--channels-last/--no-channels-last")] = D.channels_last,
              source_balance: Annotated[float, _opt("source_balance")] = D.source_balance,
              max_images: Annotated[Optional[int], _opt("max_images")] = D.max_images,
              patience: Annotated[int, _opt("patience")] = D.patience, seed: Annotated[int, _opt("seed")] = D.seed,
              max_minutes: Annotated[Optional[float], _opt("max_minutes")] = D.max_minutes,
              resume: Annotated[bool, typer.Option("--resume", help="Continue an interrupted run from its last checkpoint.")] = False,
              progress: Annotated[bool, typer.Option(help="Progress on stderr (a bar on a terminal, lines in a log).")] = True):
    """U-Net lung segmenter (pretrained EfficientNet-Lite encoder) -> MODELS/<name>/<version>."""
    from pydantic import ValidationError

    from covid_cxr.cli.common import quiet_libraries
    from covid_cxr.cli.common import fail
    from covid_cxr.core.lung_config import LungConfig
    from covid_cxr.train.lungs import train_lungs

    quiet_libraries()
    try:
        cfg = LungConfig(name=name, epochs=epochs, image_size=image_size, batch_size=batch_size, lr=lr,
                         weights=weights, frozen_stages=frozen_stages, max_images=max_images, patience=patience,
                         seed=seed, progress=progress, channels_last=channels_last, source_balance=source_balance,
                         max_minutes=max_minutes,
                         decoder_channels=[int(c) for c in decoder_channels.split(",") if c.strip()])
    except ValidationError as exc:
        fail(str(exc.errors()[0]["msg"]))
    except ValueError:  # int() of a --decoder-channels entry
        fail(f"--decoder-channels {decoder_channels!r}: expected five comma-separated widths, e.g. 32,24,16,12,8")
    r = train_lungs(data, out, cfg, resume=resume)  # its UserErrors: one line, via cli.common.Commands
    _print(r.metrics, f"{cfg.name}: test split")
    typer.echo(f"bundle: {r.bundle_path} (training {r.timings.get('total', 0):.0f} s)")


def _print(m, title: str) -> None:
    """A MaskMetrics (core.results) per source and overall."""
    from rich.console import Console
    from rich.table import Table

    t = Table(title=title)
    for col in ("source", "n", "Dice", "IoU", "Dice median", "Dice min"):
        t.add_column(col)
    for src, e in [*m.per_source.items(), ("all", m)]:
        t.add_row(src, str(e.n), f"{e.dice:.4f}", f"{e.iou:.4f}", f"{e.dice_median:.4f}", f"{e.dice_min:.4f}")
    Console().print(t)


@lungs_app.command("evaluate")
def evaluate_cmd(model: Annotated[Path, typer.Option("--model", help="MODELS/<name>\\[/<version>] (a segmentation bundle)")],
                 data: Annotated[Path, typer.Option("--data", help="Folder with images/ and masks/ (manifest.csv optional).")],
                 json_path: JsonOpt = None,
                 held_out: Annotated[bool, typer.Option("--held-out", help="Only the pairs of the bundle's own test split.")] = False):
    """Dice and IoU of the bundle's masks, overall and per manifest `source`, at the images' own size."""
    from covid_cxr.cli.common import err_console
    from covid_cxr.evaluate.lungs import evaluate_folder
    from covid_cxr.lungs.segment import LungSegmenter
    from covid_cxr.cli.common import write_json

    seg = LungSegmenter.from_bundle(model)
    only = set(seg.bundle.metadata.segmentation.data.test_ids) if held_out else None
    m, skipped = evaluate_folder(seg, data, only=only)
    for path, why in skipped:
        err_console.print(f"[yellow]skipped[/] {path}: {why}", soft_wrap=True, highlight=False)
    _print(m, f"{seg.bundle.name} v{seg.bundle.version} on {data}")
    write_json(json_path, m.model_dump(mode="json", include={"dice", "iou", "per_source", "n", "worst"}))


@lungs_app.command("segment")
def segment_cmd(images: Annotated[list[Path], typer.Argument(help="Image files or folders (PNG, JPEG, DICOM).")],
                model: Annotated[Path, typer.Option("--model", help="MODELS/<name>\\[/<version>] (a segmentation bundle)")],
                out: Annotated[Path, typer.Option("--out", help="Folder for <stem>_mask.png and <stem>_overlay.png.")]):
    """A lung mask PNG (0/255, the image's size) and an overlay per image, with the mask's sanity check."""
    from rich.console import Console
    from rich.table import Table

    from covid_cxr.cli.common import err_console, fail
    from covid_cxr.data.files import collect_images
    from covid_cxr.explain.lung_overlay import segment_files
    from covid_cxr.lungs.segment import LungSegmenter

    seg = LungSegmenter.from_bundle(model)
    files, problems = collect_images(images)
    if not files:
        fail("no images to segment" + "".join(f"; {p}: {why}" for p, why in problems))
    rows, skipped = segment_files(seg, files, out)
    for p, why in [*problems, *skipped]:
        err_console.print(f"[yellow]skipped[/] {p}: {why}", soft_wrap=True, highlight=False)
    t = Table(title=f"{seg.bundle.name} v{seg.bundle.version}")
    for col in ("image", "lung area", "blobs", "sanity"):
        t.add_column(col, overflow="fold")
    for f, s in rows:
        t.add_row(str(f), f"{s.area:.1%}", str(s.blobs), "ok" if s.ok else "[red]" + "; ".join(s.problems))
    Console().print(t)
    typer.echo(f"{len(rows)} segmented, {len(skipped) + len(problems)} skipped; written to {out}")
    if not rows:
        raise typer.Exit(1)


def register(app: typer.Typer) -> None:
    app.add_typer(lungs_app, name="lungs")

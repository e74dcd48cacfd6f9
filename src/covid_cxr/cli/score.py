"""`covid-cxr score --model M --data DIR_OR_MANIFEST --out preds.parquet [--ray] [--ray-address ADDRESS]`
(registered on the main Typer app). `--ray` alone starts a local Ray cluster; `--ray-address` joins a
running one and implies `--ray` (Typer has no option whose value may be left out, so one flag and
one option stand for the issue's `--ray [ADDRESS]`)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer


def _log_progress() -> None:
    """The scorer's progress lines on stderr, timestamped (readable in a log file, not only a terminal)."""
    import logging

    log = logging.getLogger("covid_cxr.score")
    if not log.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S"))
        log.addHandler(handler)
        log.setLevel(logging.INFO)
        log.propagate = False


def score(model: Annotated[Path, typer.Option("--model", help="MODELS/<name>\\[/<version>] (a classifier)")],
          data: Annotated[Path, typer.Option("--data", help="Folder of images (recursively), or a manifest CSV "
                                             "with a 'path' column (relative to the manifest's folder).")],
          out: Annotated[Path, typer.Option("--out", help="Output: a folder of Parquet parts (e.g. preds.parquet); "
                                            "rows already there are skipped.")],
          ray: Annotated[bool, typer.Option("--ray", help="Run on Ray, on a Ray cluster started here "
                                            "(one CPU per worker).")] = False,
          ray_address: Annotated[Optional[str], typer.Option("--ray-address", metavar="ADDRESS", help="Run on "
                                                             "the running Ray cluster at ADDRESS ('auto', "
                                                             "'ray://host:10001'); implies --ray.")] = None,
          workers: Annotated[int, typer.Option(min=1, help="Ray workers (one model each).")] = 2,
          threads: Annotated[int, typer.Option(min=0, help="ONNX Runtime threads per process or Ray worker "
                                               "(0: all cores; on Ray, 0 means 1).")] = 0,
          part_rows: Annotated[int, typer.Option(min=1, help="Rows per Parquet part (the unit of resuming).")] = 4096):
    """Score an archive: one row per image with every class probability, the gate's score and verdict,
    the label (none when the gate rejects the image) and, for unreadable images, the error."""
    from rich.console import Console

    from covid_cxr.score import score_archive

    _log_progress()
    where = ray_address or ("local" if ray else None)
    s = score_archive(model, data, out, threads, part_rows, where, workers)  # a UserError: one line, exit 2
    engine = "in one process" if where is None else f"on Ray ({where}, {workers} workers)"
    Console().print(f"{s.scored} images scored ({s.errors} unreadable, {s.rejected} rejected by the gate), "
                    f"{s.skipped} already in {out}; {s.rate:.1f} images/s {engine}; {s.parts} new parts",
                    highlight=False)


def register(app: typer.Typer) -> None:
    app.command("score")(score)

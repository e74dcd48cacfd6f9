"""`covid-cxr site check` (registered on the main Typer app)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from covid_cxr.cli.common import JsonOpt
from covid_cxr.site import ALPHA

SHIFT_EXIT = 3  # --fail-on-shift: what a pipeline stops on

site_app = typer.Typer(help="Is a new site's population the one the model was validated on?", no_args_is_help=True)


@site_app.command("check")
def check(model: Annotated[Path, typer.Option("--model", help="MODELS/<name>\\[/<version>]")],
          data: Annotated[Path, typer.Option("--data", help="Folder of the site's images (unlabelled; class "
                                                           "folders are fine).")],
          out: Annotated[Optional[Path], typer.Option(help="Report folder (report.md, site_check.json, shift.png).")] = None,
          json_path: JsonOpt = None,
          alpha: Annotated[float, typer.Option(help="family-wise false-alarm level (Holm-corrected)")] = ALPHA,
          fail_on_shift: Annotated[bool, typer.Option("--fail-on-shift", help=f"exit {SHIFT_EXIT} when a shift is "
                                                      "detected (for pipelines)")] = False):
    """Test the site's images against the bundle's reference (at least 10 images):
    verdict fit / shift detected / too few images, what moved, and the next step."""
    from rich.console import Console
    from rich.markup import escape

    from covid_cxr.cli.common import open_bundle
    from covid_cxr.site.check import check_site, next_step, write_outputs
    from covid_cxr.site.shift import SHIFT, summary_words

    b = open_bundle(model)
    result = check_site(b, data, alpha, progress=False)
    write_outputs(result, out, json_path)
    con = Console(highlight=False)
    r = result.result
    colour = {"fit": "green", SHIFT: "bold red"}.get(r.verdict, "yellow")
    con.print(f"[{colour}]{r.verdict}[/] ({b.name} v{b.version} on {escape(str(data))}: {r.n} images, "
              f"{len(result.batch.skipped)} skipped)")
    con.print(escape(summary_words(r)))
    for s in r.signals:
        con.print(f"  {'*' if s.moved else ' '} {s.name}: p(Holm) {s.p_adjusted:.2g}, {s.effect_name} {s.effect:.2f}")
    con.print("next step: " + escape(next_step(result)))
    if out is not None:
        con.print(f"report: {escape(str(out / 'report.md'))}")
    if fail_on_shift and r.verdict == SHIFT:
        raise typer.Exit(SHIFT_EXIT)


def register(app: typer.Typer) -> None:
    app.add_typer(site_app, name="site")

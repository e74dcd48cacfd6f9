"""What every sub-command shares: one way to fail with a message, one way to open a bundle."""

from __future__ import annotations

import logging
import warnings
from pathlib import Path
from typing import Annotated, NoReturn, Optional

import typer
from rich.console import Console
from typer.core import TyperGroup

from covid_cxr.core.errors import UserError

err_console = Console(stderr=True)


def fail(msg: str, code: int = 2) -> NoReturn:
    """Print a red one-line error on stderr and exit (2: bad arguments or unusable input)."""
    from rich.markup import escape

    err_console.print(f"[bold red]error:[/] {escape(msg)}", soft_wrap=True, highlight=False)
    raise typer.Exit(code)


class Commands(TyperGroup):
    """The command group every sub-command runs under: a UserError raised anywhere below (bad data,
    a broken bundle, a wrong option value found late) becomes one `error:` line and exit 2, in one
    place rather than a try/except in each command."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except UserError as exc:
            fail(str(exc))


# `--json FILE` means one thing in every command: also write the command's result as JSON to FILE.
JsonOpt = Annotated[Optional[Path], typer.Option("--json", metavar="FILE",
                                                 help="Also write the result as JSON to FILE.")]


def write_json(path: Optional[Path], obj) -> None:
    """The --json FILE of every command: written atomically; nothing when not asked for."""
    if path is not None:
        from covid_cxr.core.files import atomic_write_json

        atomic_write_json(path, obj)
        err_console.print(f"json: {path}", highlight=False, soft_wrap=True)


def need_folders(paths) -> None:
    """Fail now, in one line, when a dataset folder given on the command line does not exist."""
    for p in [paths] if isinstance(paths, Path) else paths:
        if not Path(p).is_dir():
            fail(f"dataset folder not found: {p}")


def config_option(config: type, field: str, *names: str, with_default: bool = False, **kw):
    """A typer option whose help (and, `with_default`, default) is the config field's, so a default
    or its description is typed once, in the config class (TrainConfig, ServeSettings, LungConfig).
    Without `with_default` the option's value is None unless given and its help shows the config's
    default: the caller passes only what the user set."""
    info = config.model_fields[field]
    decls = names or (f"--{field.replace('_', '-')}",)
    if with_default:
        return typer.Option(info.get_default(call_default_factory=False), *decls, help=info.description, **kw)
    default = info.get_default(call_default_factory=True)
    if default is not None and not isinstance(default, bool) and "show_default" not in kw:
        kw["show_default"] = ",".join(map(str, default)) if isinstance(default, list) else str(default)
    return typer.Option(*decls, help=info.description or "", **kw)


def open_bundle(model: Path, check: bool = True):
    """MODELS/<name>[/<version>] -> Bundle, or one line naming the broken file and exit 2.

    `check` (what `bundle check` does): also open model.onnx, compare it with the metadata and run
    one image, so a broken bundle is reported here rather than as a traceback later."""
    from covid_cxr.bundle import check_bundle, load_bundle

    try:
        return check_bundle(model) if check else load_bundle(model)
    except OSError as exc:
        fail(f"{model}: {exc.strerror or exc}")


# Libraries whose progress chatter and deprecation notices are not the user's business. Only these
# are silenced (by logger and by the module a warning comes from), never warnings process-wide.
NOISY_LOGGERS = ("lightning", "lightning.pytorch", "lightning.fabric", "torch.onnx", "onnxscript")
NOISY_WARNING_MODULES = (r"lightning(_fabric)?(\.|$)", r"pytorch_lightning", r"torch\.onnx", r"onnxscript",
                         r"torch\.utils\.data", r"torchmetrics")


def quiet_libraries() -> None:
    """Keep the terminal for what the user asked: Lightning and torch.onnx are chatty."""
    for name in NOISY_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)
    for module in NOISY_WARNING_MODULES:
        warnings.filterwarnings("ignore", module=module)

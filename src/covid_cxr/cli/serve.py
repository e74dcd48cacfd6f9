"""`covid-cxr serve` (registered on the main Typer app by `register`).

Every option's default and help text comes from `ServeSettings`, the one home of serving defaults.
"""

from __future__ import annotations

from pathlib import Path

import typer

from covid_cxr.cli.common import config_option
from covid_cxr.serve.settings import MB, ServeSettings

F = ServeSettings.model_fields


def _opt(field: str, *names: str, **kw):
    return config_option(ServeSettings, field, *names, with_default=True, **kw)


def serve(
    models: Path = typer.Option(..., "--models", help=F["models"].description, exists=True, file_okay=False),
    host: str = _opt("host"),
    port: int = _opt("port"),
    api_key: str = _opt("api_key", "--api-key", envvar="COVID_CXR_API_KEY"),
    api_key_scope: str = _opt("api_key_scope"),
    public_metrics: bool = _opt("public_metrics", "--public-metrics"),
    max_body_mb: float = typer.Option(F["max_body_bytes"].default / MB, help="request body limit in MB (413 beyond it)"),
    max_concurrency: int = _opt("max_concurrency"),
    body_timeout_s: float = _opt("body_timeout_s"),
    header_timeout_s: float = _opt("header_timeout_s"),
    max_image_pixels: int = _opt("max_image_pixels"),
    decode_budget_pixels: int = _opt("decode_budget_pixels"),
    no_batching: bool = typer.Option(False, "--no-batching", help="answer each request alone (default: "
                                     f"{F['batching'].description})"),
    max_batch: int = _opt("max_batch"),
    max_wait_ms: float = _opt("max_wait_ms"),
    max_instances: int = _opt("max_instances"),
    rescan_seconds: float = _opt("rescan_seconds"),
    intra_op_threads: int = typer.Option(None, help=f"{F['intra_op_threads'].description} (default: CPU cores)"),
    inference_workers: int = _opt("inference_workers"),
    ort_spinning: bool = _opt("ort_spinning", "--ort-spinning"),
    runtime: str = _opt("runtime"),
    precision: str = _opt("precision"),
    default_model: str = _opt("default_model"),
    monitor_window: int = _opt("monitor_window"),
    lungs: Path = typer.Option(None, "--lungs", help=F["lungs"].description, exists=True, file_okay=False),
    access_log: bool = typer.Option(False, "--access-log", help="log every request"),
    log_level: str = typer.Option("info", help="uvicorn log level"),
) -> None:
    """Serve models over TF Serving REST, an upload API and a web page (FastAPI + ONNX Runtime)."""
    import uvicorn
    from pydantic import ValidationError

    from covid_cxr.cli.common import fail
    from covid_cxr.serve.app import create_app
    from covid_cxr.serve.transport import http_protocol

    given = dict(models=models, host=host, port=port, api_key=api_key or None, api_key_scope=api_key_scope,
                 public_metrics=public_metrics, max_body_bytes=int(max_body_mb * MB),
                 max_concurrency=max_concurrency, body_timeout_s=body_timeout_s, header_timeout_s=header_timeout_s,
                 max_image_pixels=max_image_pixels,
                 decode_budget_pixels=decode_budget_pixels, batching=not no_batching, max_batch=max_batch, max_wait_ms=max_wait_ms,
                 max_instances=max_instances, rescan_seconds=rescan_seconds, inference_workers=inference_workers,
                 ort_spinning=ort_spinning, default_model=default_model, lungs=lungs, intra_op_threads=intra_op_threads,
                 monitor_window=monitor_window, runtime=runtime, precision=precision)
    try:
        settings = ServeSettings(**{k: v for k, v in given.items() if v is not None})
    except ValidationError as exc:
        e = exc.errors()[0]
        fail(f"--{'-'.join(map(str, e['loc'])).replace('_', '-')}: {e['msg']}")
    _check_runtime(settings)
    _log_to_stderr(log_level)
    uvicorn.run(create_app(settings), host=host, port=port, access_log=access_log, log_level=log_level,
                timeout_graceful_shutdown=5, http=http_protocol(settings.header_timeout_s))


def _check_runtime(settings: ServeSettings) -> None:
    """A precision ONNX Runtime lacks, or OpenVINO not installed: say so now, not once per model load."""
    from covid_cxr.bundle.runtime import RuntimeRefused, check_choice, openvino_core
    from covid_cxr.cli.common import fail

    try:
        check_choice(settings.runtime, settings.precision)
        if settings.runtime == "openvino":
            openvino_core()
    except RuntimeRefused as exc:
        fail(str(exc))


def _log_to_stderr(level: str) -> None:
    """The server's own lines (models loaded and unloaded, folders skipped) beside uvicorn's, in
    uvicorn's format: without a handler they would be dropped below WARNING."""
    import logging

    log = logging.getLogger("covid_cxr")
    if not log.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(levelname)s:     %(message)s"))
        log.addHandler(handler)
    log.setLevel(level.upper())


def register(app: typer.Typer) -> None:
    app.command("serve")(serve)

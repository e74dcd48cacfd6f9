"""`covid-cxr serve` (registered on the main Typer app by `register`)."""

from __future__ import annotations

from pathlib import Path

import typer


def serve(
    models: Path = typer.Option(..., "--models", help="model repository: MODELS/<name>/<version>/",
                                exists=True, file_okay=False),
    host: str = typer.Option("127.0.0.1", help="interface to listen on (0.0.0.0: every interface)"),
    port: int = typer.Option(8501, help="TCP port (8501: TF Serving's REST port)"),
    api_key: str = typer.Option(None, "--api-key", envvar="COVID_CXR_API_KEY",
                                help="bearer token required on predict endpoints"),
    max_body_mb: float = typer.Option(20.0, help="request body limit in MB (413 beyond it)"),
    max_concurrency: int = typer.Option(64, help="in-flight predict requests before answering 503"),
    batching: bool = typer.Option(True, "--batching/--no-batching", help="micro-batch concurrent requests"),
    max_batch: int = typer.Option(4, help="most images in one ONNX Runtime call"),
    max_wait_ms: float = typer.Option(5.0, help="longest a batch waits for requests being decoded"),
    rescan_seconds: float = typer.Option(2.0, help="how often the model repository is re-read"),
    intra_op_threads: int = typer.Option(None, help="ONNX Runtime threads per call (default: CPU cores)"),
    inference_workers: int = typer.Option(1, help="batches run at the same time"),
    ort_spinning: bool = typer.Option(False, "--ort-spinning/--no-ort-spinning",
                                      help="let ONNX Runtime's idle threads busy-wait"),
    access_log: bool = typer.Option(False, "--access-log/--no-access-log", help="log every request"),
    log_level: str = typer.Option("info", help="uvicorn log level"),
) -> None:
    """Serve models over TF Serving REST, an upload API and a web page (FastAPI + ONNX Runtime)."""
    import uvicorn

    from covid_cxr.serve.app import create_app
    from covid_cxr.serve.settings import MB, ServeSettings

    settings = ServeSettings(models=models, host=host, port=port, api_key=api_key or None,
                             max_body_bytes=int(max_body_mb * MB), max_concurrency=max_concurrency,
                             batching=batching, max_batch=max_batch, max_wait_ms=max_wait_ms,
                             rescan_seconds=rescan_seconds, inference_workers=inference_workers,
                             ort_spinning=ort_spinning,
                             **({"intra_op_threads": intra_op_threads} if intra_op_threads else {}))
    uvicorn.run(create_app(settings), host=host, port=port, access_log=access_log, log_level=log_level,
                timeout_graceful_shutdown=5)


def register(app: typer.Typer) -> None:
    app.command("serve")(serve)

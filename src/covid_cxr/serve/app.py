"""FastAPI app factory: TF Serving REST, upload API, web page, health and metrics.

Everything the app holds lives on `app.state` (settings, metrics registry, model repository) and
reaches handlers through dependencies, so several apps can run in one process (tests, benchmarks)
without sharing anything.
"""

from __future__ import annotations

import asyncio
import base64
import hmac
import logging
import time
from contextlib import asynccontextmanager
from pathlib import Path

import anyio.to_thread
import numpy as np
from fastapi import Depends, FastAPI, File, Query, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException as StarletteHTTPException

from covid_cxr import __version__
from covid_cxr.bundle import load_bundle
from covid_cxr.serve.guard import Guard
from covid_cxr.serve.metrics import Metrics
from covid_cxr.serve.protocol import (
    BadRequest,
    ErrorResponse,
    ModelList,
    ModelSummary,
    TFColumnarResponse,
    TFModelMetadataResponse,
    TFModelStatusResponse,
    TFPredictRequest,
    TFPredictResponse,
    TFStatus,
    TFVersionStatus,
    UploadPrediction,
    decode_image,
    parse_predict,
    signature_def,
)
from covid_cxr.serve.repository import (
    InvalidModelName,
    LoadedModel,
    ModelNotFound,
    ModelRepository,
    ModelUnavailable,
)
from covid_cxr.serve.settings import ServeSettings

log = logging.getLogger("covid_cxr.serve")
STATIC = Path(__file__).parent / "static"
ERRORS = {400: {"model": ErrorResponse}, 401: {"model": ErrorResponse}, 404: {"model": ErrorResponse},
          413: {"model": ErrorResponse}, 503: {"model": ErrorResponse}}


class Unauthorized(Exception):
    pass


# ---------------------------------------------------------------------------------- dependencies

def get_settings(request: Request) -> ServeSettings:
    return request.app.state.settings


def get_repo(request: Request) -> ModelRepository:
    return request.app.state.repo


def get_metrics(request: Request) -> Metrics:
    return request.app.state.metrics


def require_api_key(request: Request, settings: ServeSettings = Depends(get_settings)) -> None:
    """Bearer-token check for predict endpoints (no-op when the server has no key)."""
    if not settings.api_key:
        return
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), settings.api_key.encode()):
        raise Unauthorized()


def parse_version(version: str) -> int:
    if not version.isdigit() or int(version) <= 0:
        raise BadRequest(f"malformed model version {version!r}: expected a positive integer")
    return int(version)


# ---------------------------------------------------------------------------------- factory

def create_app(settings: ServeSettings) -> FastAPI:
    metrics = Metrics()
    repo = ModelRepository(settings, metrics)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        scanner = asyncio.get_running_loop().create_task(repo.run_forever(), name="covid-cxr-rescan")
        try:
            yield
        finally:
            scanner.cancel()
            await repo.close()

    app = FastAPI(title="covid-cxr", version=__version__, lifespan=lifespan,
                  description="Chest X-ray classifier (COVID-19 / Normal / Viral Pneumonia). "
                              "Research use only, not for clinical diagnosis.")
    app.state.settings = settings
    app.state.metrics = metrics
    app.state.repo = repo
    app.add_middleware(Guard, metrics=metrics, max_body_bytes=settings.max_body_bytes,
                       max_concurrency=settings.max_concurrency)
    _add_error_handlers(app)
    _add_operations(app)
    _add_tf_serving(app)
    _add_upload_api(app)
    _add_web(app)
    return app


def _error(status: int, message: str, headers: dict | None = None) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status, headers=headers)


def _add_error_handlers(app: FastAPI) -> None:
    def handler(status: int):
        async def handle(request: Request, exc: Exception):
            return _error(status, str(exc))
        return handle

    for exc_type, status in ((BadRequest, 400), (InvalidModelName, 400), (ModelNotFound, 404),
                             (ModelUnavailable, 503)):
        app.add_exception_handler(exc_type, handler(status))

    @app.exception_handler(Unauthorized)
    async def unauthorized(request: Request, exc: Unauthorized):
        return _error(401, "missing or wrong API key: send 'Authorization: Bearer <key>'",
                      {"WWW-Authenticate": "Bearer"})

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError):
        first = exc.errors()[0] if exc.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ()))
        return _error(400, f"invalid request: {first.get('msg', 'malformed')} ({where})")

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):
        return _error(exc.status_code, str(exc.detail), getattr(exc, "headers", None))


# ---------------------------------------------------------------------------------- operations

def _add_operations(app: FastAPI) -> None:
    @app.get("/healthz", tags=["operations"])
    async def healthz() -> dict:
        """Liveness: the process answers."""
        return {"status": "ok"}

    @app.get("/readyz", tags=["operations"], responses={503: {"model": ErrorResponse}})
    async def readyz(repo: ModelRepository = Depends(get_repo)):
        """Readiness: at least one model version is loaded in ONNX Runtime."""
        loaded = repo.loaded()
        if not loaded:
            return _error(503, "no model loaded yet")
        return {"status": "ready", "models": sorted(f"{m.name}/{m.version}" for m in loaded)}

    @app.get("/metrics", tags=["operations"])
    async def prometheus(metrics: Metrics = Depends(get_metrics)) -> Response:
        return Response(metrics.render(), media_type=metrics.content_type)


# ---------------------------------------------------------------------------------- TF Serving

def _add_tf_serving(app: FastAPI) -> None:
    def status_response(repo: ModelRepository, name: str, only: int | None = None) -> TFModelStatusResponse:
        rows = repo.status(name)
        if only is not None:
            rows = [r for r in rows if r[0] == only]
            if not rows:
                raise ModelNotFound(f"Servable not found for request: Specific({name}, {only})")
        return TFModelStatusResponse(model_version_status=[
            TFVersionStatus(version=str(v), state=state,
                            status=TFStatus(error_code="UNKNOWN" if err else "OK", error_message=err))
            for v, state, err in rows])

    @app.get("/v1/models/{name}", response_model=TFModelStatusResponse, responses=ERRORS, tags=["tf-serving"])
    async def model_status(name: str, request: Request, repo: ModelRepository = Depends(get_repo)):
        status = status_response(repo, name)
        request.state.model = name
        return status

    @app.get("/v1/models/{name}/versions/{version}", response_model=TFModelStatusResponse, responses=ERRORS,
             tags=["tf-serving"])
    async def version_status(name: str, version: str, request: Request, repo: ModelRepository = Depends(get_repo)):
        status = status_response(repo, name, parse_version(version))
        request.state.model = name
        return status

    async def metadata(repo: ModelRepository, name: str, version: int | None) -> TFModelMetadataResponse:
        vs = repo.disk_versions(name)
        if version is not None and version not in vs:
            raise ModelNotFound(f"Servable not found for request: Specific({name}, {version})")
        bundle = await anyio.to_thread.run_sync(load_bundle, repo.root / name, version or vs[-1])
        h, w = bundle.input_hw
        meta = bundle.metadata
        extra = {k: meta[k] for k in ("classes", "input", "architecture", "test_metrics") if k in meta}
        return TFModelMetadataResponse(
            model_spec={"name": name, "signature_name": "", "version": str(version or vs[-1])},
            metadata={"signature_def": signature_def(h, w, len(bundle.classes)), **extra})

    @app.get("/v1/models/{name}/metadata", response_model=TFModelMetadataResponse, responses=ERRORS,
             tags=["tf-serving"])
    async def model_metadata(name: str, request: Request, repo: ModelRepository = Depends(get_repo)):
        out = await metadata(repo, name, None)
        request.state.model = name
        return out

    @app.get("/v1/models/{name}/versions/{version}/metadata", response_model=TFModelMetadataResponse,
             responses=ERRORS, tags=["tf-serving"])
    async def version_metadata(name: str, version: str, request: Request,
                               repo: ModelRepository = Depends(get_repo)):
        out = await metadata(repo, name, parse_version(version))
        request.state.model = name
        return out

    predict_doc = {"requestBody": {"required": True, "content": {
        "application/json": {"schema": TFPredictRequest.model_json_schema()}}}}

    async def predict(request: Request, repo: ModelRepository, settings: ServeSettings, name: str,
                      version: int | None):
        model = await repo.get(name, version)
        request.state.model = name
        h, w = model.input_hw
        body = await request.body()
        async with model.preparing():
            x, columnar = await anyio.to_thread.run_sync(parse_predict, body, h, w, settings.max_instances)
        rows = (await model.predict(x)).tolist()
        return TFColumnarResponse(outputs=rows) if columnar else TFPredictResponse(predictions=rows)

    @app.post("/v1/models/{name}:predict", response_model=TFPredictResponse | TFColumnarResponse,
              responses=ERRORS, openapi_extra=predict_doc, tags=["tf-serving"],
              dependencies=[Depends(require_api_key)])
    async def tfs_predict(name: str, request: Request, repo: ModelRepository = Depends(get_repo),
                          settings: ServeSettings = Depends(get_settings)):
        """TF Serving predict on the newest version: `instances` -> `predictions`, `inputs` -> `outputs`."""
        return await predict(request, repo, settings, name, None)

    @app.post("/v1/models/{name}/versions/{version}:predict", response_model=TFPredictResponse | TFColumnarResponse,
              responses=ERRORS, openapi_extra=predict_doc, tags=["tf-serving"],
              dependencies=[Depends(require_api_key)])
    async def tfs_predict_version(name: str, version: str, request: Request,
                                  repo: ModelRepository = Depends(get_repo),
                                  settings: ServeSettings = Depends(get_settings)):
        return await predict(request, repo, settings, name, parse_version(version))


# ---------------------------------------------------------------------------------- upload API

def _add_upload_api(app: FastAPI) -> None:
    @app.get("/api/v1/models", response_model=ModelList, tags=["upload"])
    async def list_models(repo: ModelRepository = Depends(get_repo)):
        out = []
        loaded = {(m.name, m.version): m for m in repo.loaded()}
        for name, vs in repo.scan().items():
            m = loaded.get((name, vs[-1]))
            out.append(ModelSummary(name=name, versions=vs, classes=m.classes if m else None,
                                    input=dict(zip(("height", "width"), m.input_hw)) if m else None))
        return ModelList(models=out)

    async def upload_model(repo: ModelRepository, settings: ServeSettings, name: str | None) -> LoadedModel:
        if name is None:
            names = repo.names()
            if not names:
                raise ModelNotFound("no model in the repository")
            name = settings.default_model if settings.default_model in names else names[0]
        return await repo.get(name)

    @app.post("/api/v1/predict", response_model=UploadPrediction, response_model_exclude_none=True,
              responses=ERRORS, tags=["upload"], dependencies=[Depends(require_api_key)])
    async def upload_predict(request: Request,
                             file: UploadFile = File(..., description="PNG, JPEG or DICOM file"),
                             model: str | None = Query(None, description="model name (default: the first)"),
                             gradcam: bool = Query(False, description="add a Grad-CAM overlay (PNG, base64)"),
                             repo: ModelRepository = Depends(get_repo),
                             settings: ServeSettings = Depends(get_settings)):
        """Classify one uploaded X-ray: label, every class probability, model, version, latency."""
        loaded = await upload_model(repo, settings, model)
        request.state.model = loaded.name
        data = await file.read()
        h, w = loaded.input_hw
        async with loaded.preparing():
            pixels = await anyio.to_thread.run_sync(decode_image, data, h, w, file.filename or "file")
        probs = (await loaded.predict(pixels[None, :, :, None]))[0]
        idx = int(np.argmax(probs))
        out = UploadPrediction(label=loaded.classes[idx],
                               probabilities={c: float(p) for c, p in zip(loaded.classes, probs)},
                               model=loaded.name, version=loaded.version, latency_ms=0.0)
        if gradcam:
            try:
                png = await anyio.to_thread.run_sync(loaded.gradcam_png, pixels, idx)
                out.gradcam_png = base64.b64encode(png).decode("ascii")
            except Exception as exc:  # the prediction stands; say why the picture is missing
                log.warning("Grad-CAM failed for %s/%s: %s", loaded.name, loaded.version, exc)
                out.gradcam_error = f"Grad-CAM unavailable: {type(exc).__name__}: {exc}"
        out.latency_ms = round((time.perf_counter() - request.state.t0) * 1000.0, 3)
        return out


# ---------------------------------------------------------------------------------- web page

def _add_web(app: FastAPI) -> None:
    @app.get("/", include_in_schema=False)
    async def index() -> FileResponse:
        return FileResponse(STATIC / "index.html", headers={"Cache-Control": "no-cache"})

    app.mount("/static", StaticFiles(directory=STATIC), name="static")

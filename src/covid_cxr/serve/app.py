"""FastAPI app factory: TF Serving REST, Open Inference Protocol (v2), upload API, web page, health and metrics.

Everything the app holds lives on `app.state` (settings, metrics registry, model repository) and
reaches handlers through dependencies (`serve.deps`); each protocol is its own router
(`serve.routes`), so several apps can run in one process (tests, benchmarks) without sharing anything.
"""

from __future__ import annotations

import asyncio
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException as StarletteHTTPException

from covid_cxr import __version__
from covid_cxr.serve.deps import Unauthorized
from covid_cxr.serve.guard import Guard
from covid_cxr.serve.limits import DecodeLimits, PixelBudget, return_large_frees_to_the_os
from covid_cxr.serve.metrics import Metrics
from covid_cxr.serve.protocol import BadRequest
from covid_cxr.serve.repository import InvalidModelName, ModelNotFound, ModelRepository, ModelUnavailable
from covid_cxr.serve.routes import browser, card, oip, operations, tf_serving, upload, web
from covid_cxr.serve.settings import ServeSettings

STATUS_OF = ((BadRequest, 400), (InvalidModelName, 400), (ModelNotFound, 404), (ModelUnavailable, 503))


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
    app.state.decode_limits = DecodeLimits(settings.max_image_pixels, PixelBudget(settings.decode_budget_pixels))
    return_large_frees_to_the_os()
    app.add_middleware(Guard, metrics=metrics, max_body_bytes=settings.max_body_bytes,
                       max_concurrency=settings.max_concurrency, body_timeout_s=settings.body_timeout_s,
                       model_label=repo.metric_label)
    add_error_handlers(app)
    for module in (operations, tf_serving, oip, upload, card, browser, web):
        app.include_router(module.router)
    app.mount("/static", StaticFiles(directory=web.STATIC), name="static")
    return app


def _error(status: int, message: str, headers: dict | None = None) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status, headers=headers)


def add_error_handlers(app: FastAPI) -> None:
    """Every error is `{"error": "..."}` with its status, as TF Serving answers."""
    def handler(status: int):
        async def handle(request: Request, exc: Exception):
            return _error(status, str(exc))
        return handle

    for exc_type, status in STATUS_OF:
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

"""Liveness, readiness and Prometheus metrics."""

from __future__ import annotations

from fastapi import APIRouter, Depends
from fastapi.responses import JSONResponse, PlainTextResponse, Response

from covid_cxr.serve.deps import get_metrics, get_repo, require_key_for_metrics
from covid_cxr.serve.metrics import Metrics
from covid_cxr.serve.protocol import ErrorResponse
from covid_cxr.serve.repository import ModelRepository

router = APIRouter(tags=["operations"])


@router.get("/healthz")
async def healthz() -> dict:
    """Liveness: the process answers."""
    return {"status": "ok"}


@router.get("/readyz", responses={503: {"model": ErrorResponse}})
async def readyz(repo: ModelRepository = Depends(get_repo)):
    """Readiness: at least one model version is loaded in ONNX Runtime."""
    loaded = repo.loaded()
    if not loaded:
        return JSONResponse({"error": "no model loaded yet"}, status_code=503)
    out = {"status": "ready", "models": sorted(f"{m.name}/{m.version}" for m in loaded)}
    broken = repo.unavailable()
    if broken:  # ready to serve the others; say which models are not
        out["unavailable"] = broken
    return out


@router.get("/metrics", response_class=PlainTextResponse, dependencies=[Depends(require_key_for_metrics)],
            responses={200: {"content": {"text/plain": {"schema": {"type": "string"}}},
                             "description": "Prometheus text exposition format"}})
async def prometheus(metrics: Metrics = Depends(get_metrics)) -> Response:
    return Response(metrics.render(), media_type=metrics.content_type)

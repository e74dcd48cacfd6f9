"""TensorFlow Serving REST, as its public API documents it: status, metadata, predict."""

from __future__ import annotations

import anyio.to_thread
from fastapi import APIRouter, Depends, Request

from covid_cxr.serve.deps import (ModelName, VersionText, get_limits, get_repo, get_settings, parse_version,
                                  require_api_key, require_key_to_read)
from covid_cxr.serve.limits import DecodeLimits
from covid_cxr.serve.protocol import (
    ERRORS,
    OOD_SIGNATURE,
    SIGNATURE,
    TFColumnarResponse,
    TFModelMetadataResponse,
    TFModelStatusResponse,
    TFNamedColumnarResponse,
    TFNamedPredictResponse,
    TFPredictRequest,
    TFPredictResponse,
    TFStatus,
    TFVersionStatus,
    parse_signed_predict,
    signature_def,
)
from covid_cxr.serve.repository import ModelNotFound, ModelRepository
from covid_cxr.serve.settings import ServeSettings

router = APIRouter(tags=["tf-serving"], responses=ERRORS)
PREDICTIONS = TFPredictResponse | TFColumnarResponse | TFNamedPredictResponse | TFNamedColumnarResponse
PREDICT_DOC = {"requestBody": {"required": True, "content": {
    "application/json": {"schema": TFPredictRequest.model_json_schema()}}}}


def status_response(repo: ModelRepository, name: str, only: int | None = None) -> TFModelStatusResponse:
    rows = repo.status(name)
    if only is not None:
        rows = [r for r in rows if r[0] == only]
        if not rows:
            raise ModelNotFound(f"Servable not found for request: Specific({name}, {only})")
    return TFModelStatusResponse(model_version_status=[
        TFVersionStatus(version=str(v), state=state, status=TFStatus(error_code="UNKNOWN" if err else "OK",
                                                                     error_message=err))
        for v, state, err in rows])


@router.get("/v1/models/{name}", response_model=TFModelStatusResponse)
async def model_status(name: ModelName, request: Request, repo: ModelRepository = Depends(get_repo)):
    request.state.model = name
    return status_response(repo, name)


@router.get("/v1/models/{name}/versions/{version}", response_model=TFModelStatusResponse)
async def version_status(name: ModelName, version: VersionText, request: Request, repo: ModelRepository = Depends(get_repo)):
    request.state.model = name
    return status_response(repo, name, parse_version(version))


async def metadata(repo: ModelRepository, name: str, version: int | None) -> TFModelMetadataResponse:
    """The metadata of the version that answers predictions (not whatever is newest on disk)."""
    model = await repo.get(name, version)
    meta = model.bundle.metadata
    h, w = meta.input_hw
    extra = meta.model_dump(mode="json", include={"classes", "input", "architecture", "test_metrics"})
    if model.monitor is not None:  # the window's shift tests (~ms): off the event loop, as predictions are
        extra["site_monitor"] = await anyio.to_thread.run_sync(model.monitor.snapshot)
    return TFModelMetadataResponse(
        model_spec={"name": name, "signature_name": "", "version": str(model.version)},
        metadata={"signature_def": signature_def(h, w, len(meta.classes), with_ood=meta.has_ood), **extra})


@router.get("/v1/models/{name}/metadata", response_model=TFModelMetadataResponse,
            dependencies=[Depends(require_key_to_read)])
async def model_metadata(name: ModelName, request: Request, repo: ModelRepository = Depends(get_repo)):
    request.state.model = name
    return await metadata(repo, name, None)


@router.get("/v1/models/{name}/versions/{version}/metadata", response_model=TFModelMetadataResponse,
            dependencies=[Depends(require_key_to_read)])
async def version_metadata(name: ModelName, version: VersionText, request: Request, repo: ModelRepository = Depends(get_repo)):
    request.state.model = name
    return await metadata(repo, name, parse_version(version))


async def predict(request: Request, repo: ModelRepository, settings: ServeSettings, name: str, version: int | None):
    model = await repo.get(name, version)
    request.state.model = name
    h, w = model.input_hw
    body = await request.body()
    limits: DecodeLimits = get_limits(request)
    signatures = (SIGNATURE, OOD_SIGNATURE) if model.bundle.has_ood else (SIGNATURE,)
    async with model.preparing():
        x, columnar, signature = await anyio.to_thread.run_sync(parse_signed_predict, body, h, w,
                                                                settings.max_instances, signatures, limits)
    if signature == OOD_SIGNATURE:
        return await predict_with_ood(model, x, columnar)
    rows = (await model.predict(x)).tolist()
    return TFColumnarResponse(outputs=rows) if columnar else TFPredictResponse(predictions=rows)


async def predict_with_ood(model, x, columnar: bool):
    """The with_ood signature: probabilities, ood_score and in_distribution, named as TF Serving
    names several outputs (one object per instance in row format, one batch per name in columnar)."""
    probs, score, inside = await model.predict_with_ood(x)
    cols = {"probabilities": probs.tolist(), "ood_score": score.tolist(), "in_distribution": inside.tolist()}
    if columnar:
        return TFNamedColumnarResponse(outputs=cols)
    return TFNamedPredictResponse(predictions=[dict(zip(cols, row)) for row in zip(*cols.values())])


@router.post("/v1/models/{name}:predict", response_model=PREDICTIONS,
             openapi_extra=PREDICT_DOC, dependencies=[Depends(require_api_key)])
async def tfs_predict(name: ModelName, request: Request, repo: ModelRepository = Depends(get_repo),
                      settings: ServeSettings = Depends(get_settings)):
    """TF Serving predict on the newest version: `instances` -> `predictions`, `inputs` -> `outputs`;
    `"signature_name": "with_ood"` adds `ood_score` and `in_distribution` (see /metadata)."""
    return await predict(request, repo, settings, name, None)


@router.post("/v1/models/{name}/versions/{version}:predict", response_model=PREDICTIONS,
             openapi_extra=PREDICT_DOC, dependencies=[Depends(require_api_key)])
async def tfs_predict_version(name: ModelName, version: VersionText, request: Request, repo: ModelRepository = Depends(get_repo),
                              settings: ServeSettings = Depends(get_settings)):
    return await predict(request, repo, settings, name, parse_version(version))

"""The Open Inference Protocol (KServe v2), as Triton and KServe clients speak it, beside TF Serving.

Server and model health and metadata, and infer with named outputs. The outputs are the bundle's
ONNX outputs as metadata.json lists them (`probabilities`, and any a bundle adds), so every model
answers with what its graph computes. Every request, whichever outputs it asks for, goes the way
TF Serving's predict goes (`Bundle.prepare`, the micro-batcher and its inference worker), so both
protocols give the same numbers, are counted alike and share the worker.
"""

from __future__ import annotations

import anyio.to_thread
from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, Response

from covid_cxr import __version__
from covid_cxr.serve.deps import (ModelName, VersionText, get_limits, get_repo, get_settings, parse_version,
                                  require_api_key, require_key_to_read)
from covid_cxr.serve.oip import HEADER_LENGTH, encode_response, image_batch, parse_infer, tensor_metadata
from covid_cxr.serve.protocol import ERRORS, BadRequest
from covid_cxr.serve.repository import ModelRepository
from covid_cxr.serve.settings import ServeSettings

router = APIRouter(tags=["open-inference-protocol"], responses=ERRORS)
PLATFORM = "onnxruntime_onnx"
INFER_DOC = {"requestBody": {"required": True, "content": {"application/json": {"schema": {
    "type": "object", "description": "KServe v2 inference request: inputs [{name: 'image', datatype: "
    "'FP32' (shape [N, H, W, 1]) or 'BYTES' (shape [N], encoded files; base64 strings in JSON), "
    "shape, data}], optional outputs [{name}]; Triton's binary tensor extension is accepted"}}}}}


@router.get("/v2")
async def server_metadata() -> dict:
    return {"name": "covid-cxr", "version": __version__, "extensions": ["binary_tensor_data"]}


@router.get("/v2/health/live")
async def live() -> dict:
    return {"live": True}


@router.get("/v2/health/ready")
async def ready(repo: ModelRepository = Depends(get_repo)):
    """Ready once at least one model version is loaded in ONNX Runtime."""
    if not repo.loaded():
        return JSONResponse({"error": "no model loaded yet"}, status_code=503)
    return {"ready": True}


def _model_ready(repo: ModelRepository, name: str, version: str | None):
    vs = repo.disk_versions(name)  # 404 for an unknown model
    want = [parse_version(version)] if version is not None else vs
    if want[0] not in vs:
        return JSONResponse({"error": f"model {name} has no version {want[0]}"}, status_code=404)
    if not any(m.name == name and m.version in want for m in repo.loaded()):
        return JSONResponse({"error": f"model {name} is not loaded (yet)"}, status_code=503)
    return {"name": name, "ready": True}


@router.get("/v2/models/{name}/ready")
async def model_ready(name: ModelName, repo: ModelRepository = Depends(get_repo)):
    return _model_ready(repo, name, None)


@router.get("/v2/models/{name}/versions/{version}/ready")
async def version_ready(name: ModelName, version: VersionText, repo: ModelRepository = Depends(get_repo)):
    return _model_ready(repo, name, version)


async def _metadata(repo: ModelRepository, name: str, version: str | None) -> dict:
    """The metadata of the version that answers (the served one, or the one named)."""
    model = await repo.get(name, None if version is None else parse_version(version))
    onnx = model.bundle.metadata.onnx
    return {"name": name, "versions": [str(v) for v in repo.disk_versions(name)], "platform": PLATFORM,
            "inputs": tensor_metadata(onnx.inputs), "outputs": tensor_metadata(onnx.outputs),
            "parameters": {"version": str(model.version), "classes": ",".join(model.classes),
                           "image_bytes": "the 'image' input also takes BYTES [N]: encoded PNG/JPEG/DICOM files"}}


@router.get("/v2/models/{name}", dependencies=[Depends(require_key_to_read)])
async def model_metadata(name: ModelName, repo: ModelRepository = Depends(get_repo)):
    return await _metadata(repo, name, None)


@router.get("/v2/models/{name}/versions/{version}", dependencies=[Depends(require_key_to_read)])
async def version_metadata(name: ModelName, version: VersionText, repo: ModelRepository = Depends(get_repo)):
    return await _metadata(repo, name, version)


async def _config(repo: ModelRepository, name: str, version: str | None) -> dict:
    """Triton's model configuration (GET .../config), as `covid-cxr export --format triton` writes it."""
    from covid_cxr.export.triton import model_config

    model = await repo.get(name, None if version is None else parse_version(version))
    return model_config(model.bundle.metadata, name=name)  # the served name: Triton's folder name


@router.get("/v2/models/{name}/config", dependencies=[Depends(require_key_to_read)])
async def model_config(name: ModelName, repo: ModelRepository = Depends(get_repo)):
    return await _config(repo, name, None)


@router.get("/v2/models/{name}/versions/{version}/config", dependencies=[Depends(require_key_to_read)])
async def version_config(name: ModelName, version: VersionText, repo: ModelRepository = Depends(get_repo)):
    return await _config(repo, name, version)


async def infer(request: Request, repo: ModelRepository, settings: ServeSettings, name: str,
                version: int | None) -> Response:
    model = await repo.get(name, version)
    request.state.model = name
    h, w = model.input_hw
    body = await request.body()
    available = [t.name for t in model.bundle.metadata.onnx.outputs]
    async with model.preparing():
        req = await anyio.to_thread.run_sync(parse_infer, body, request.headers.get(HEADER_LENGTH))
        x = await anyio.to_thread.run_sync(image_batch, req, h, w, settings.max_instances, get_limits(request))
    wanted = req.outputs if req.outputs is not None else [(n, req.binary_default) for n in available]
    unknown = [n for n, _ in wanted if n not in available]
    if unknown or not wanted:
        raise BadRequest(f"unknown output(s) {unknown}; this model's outputs are {available}")
    arrays = await model.outputs(x)  # the micro-batcher and worker, as TF Serving's predict
    content, header = encode_response(name, model.version, req.id, [(n, arrays[n], b) for n, b in wanted])
    if header is None:
        return Response(content, media_type="application/json")
    return Response(content, media_type="application/octet-stream", headers={HEADER_LENGTH: str(header)})


@router.post("/v2/models/{name}/infer", openapi_extra=INFER_DOC, dependencies=[Depends(require_api_key)])
async def model_infer(name: ModelName, request: Request, repo: ModelRepository = Depends(get_repo),
                      settings: ServeSettings = Depends(get_settings)):
    """Inference on the served version: FP32 [N, H, W, 1] or BYTES [N] in, named outputs out."""
    return await infer(request, repo, settings, name, None)


@router.post("/v2/models/{name}/versions/{version}/infer", openapi_extra=INFER_DOC,
             dependencies=[Depends(require_api_key)])
async def version_infer(name: ModelName, version: VersionText, request: Request, repo: ModelRepository = Depends(get_repo),
                        settings: ServeSettings = Depends(get_settings)):
    return await infer(request, repo, settings, name, parse_version(version))

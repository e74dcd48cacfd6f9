"""The upload API: one X-ray file in (multipart), label and probabilities out; used by the web page."""

from __future__ import annotations

import base64
import logging
import time

import anyio.to_thread
import numpy as np
from fastapi import APIRouter, Depends, File, Query, Request, UploadFile

from covid_cxr.serve.deps import ModelQuery, get_limits, get_repo, get_settings, require_api_key, require_key_to_read
from covid_cxr.serve.protocol import (
    ERRORS,
    BadRequest,
    LungFields,
    ModelList,
    ModelSummary,
    UploadPrediction,
    decode_image,
)
from covid_cxr.serve.repository import LoadedModel, ModelNotFound, ModelRepository, strip_paths
from covid_cxr.serve.settings import ServeSettings

log = logging.getLogger("covid_cxr.serve")
router = APIRouter(tags=["upload"])
OOD_WARNING = ("This image does not look like the chest X-rays the model was trained on (a photo, another body "
               "part, a screenshot, noise?). The model cannot judge it: no diagnosis is given.")


@router.get("/api/v1/models", response_model=ModelList, dependencies=[Depends(require_key_to_read)])
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


async def add_gradcam(out: UploadPrediction, loaded: LoadedModel, prepared: np.ndarray, idx: int) -> np.ndarray | None:
    """Adds the overlay of the classifier's own prepared pixels; returns the raw map (None when
    Grad-CAM failed)."""
    try:
        png, cam = await anyio.to_thread.run_sync(loaded.gradcam, prepared, idx, True)
        out.gradcam_png = base64.b64encode(png).decode("ascii")
        return cam
    except Exception as exc:  # the prediction stands; say why the picture is missing
        log.warning("Grad-CAM failed for %s/%s: %s", loaded.name, loaded.version, exc)
        out.gradcam_error = f"Grad-CAM unavailable: {type(exc).__name__}: {strip_paths(str(exc))}"
        return None


async def add_lungs(out: UploadPrediction, settings: ServeSettings, pixels: np.ndarray, cam: np.ndarray | None) -> None:
    """The lung model's check (and where Grad-CAM looks) when the server was given one."""
    from covid_cxr.lungs.zones import lung_report

    try:
        out.lungs = LungFields(**await anyio.to_thread.run_sync(lung_report, settings.lungs, pixels, cam))
    except Exception as exc:  # the prediction stands
        log.warning("lung fields failed: %s", exc)
        out.lungs = LungFields(check_ok=False, area=0.0, error=f"lung fields unavailable: {type(exc).__name__}: {strip_paths(str(exc))}")


@router.post("/api/v1/predict", response_model=UploadPrediction, response_model_exclude_none=True,
             responses=ERRORS, dependencies=[Depends(require_api_key)])
async def upload_predict(request: Request, file: UploadFile = File(..., description="PNG, JPEG or DICOM file"),
                         model: ModelQuery = None,
                         gradcam: bool = Query(False, description="add a Grad-CAM overlay (PNG, base64)"),
                         repo: ModelRepository = Depends(get_repo), settings: ServeSettings = Depends(get_settings)):
    """Classify one uploaded X-ray: label, every class probability, model, version, latency."""
    loaded = await upload_model(repo, settings, model)
    request.state.model = loaded.name
    if len((await request.form()).getlist("file")) != 1:  # the parsed form is cached: no second parse
        raise BadRequest("send exactly one file (form field 'file'); several were sent")
    data = await file.read()
    h, w = loaded.input_hw
    async with loaded.preparing():
        pixels = await anyio.to_thread.run_sync(decode_image, data, h, w, file.filename or "file",
                                                get_limits(request))
    x = pixels[None, :, :, None]
    if loaded.bundle.metadata.lung_crop is not None:  # once: the classifier and Grad-CAM see the same crop
        x = await anyio.to_thread.run_sync(loaded.prepare, x)
    ans = await loaded.answer(x, prepared=True)  # the bundle's operating point, else the argmax
    idx = int(ans.labels[0])
    row = ans.row(0, loaded.classes)
    out = UploadPrediction(label=row["label"], probabilities=row["probabilities"], model=loaded.name,
                           version=loaded.version, latency_ms=0.0)
    if row["in_distribution"] is not None:
        out.in_distribution, out.ood_score = row["in_distribution"], row["ood_score"]
        out.warning = None if out.in_distribution else OOD_WARNING
    cam = await add_gradcam(out, loaded, x[0, :, :, 0], idx) if gradcam else None
    if settings.lungs is not None:
        await add_lungs(out, settings, pixels, cam)
    out.latency_ms = round((time.perf_counter() - request.state.t0) * 1000.0, 3)
    return out

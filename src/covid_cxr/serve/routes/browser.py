"""The web page's in-browser mode: the bundle's model.onnx and what the page needs to run it itself.

The page decodes and resizes the image as `data.decode` does, runs model.onnx with onnxruntime-web
(WASM) and applies the bundle's operating point; the gate and the temperature are inside model.onnx.
So the image never leaves the user's machine; only the model travels, from this server (no CDN:
the runtime's files are served from static/vendor, fetched by `make web-runtime`).
"""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request
from fastapi.responses import FileResponse
from pydantic import BaseModel, Field

from covid_cxr.serve.deps import ModelName, ModelQuery, VersionText, get_repo, get_settings, parse_version, require_api_key
from covid_cxr.serve.protocol import ERRORS
from covid_cxr.serve.repository import LoadedModel, ModelRepository
from covid_cxr.serve.routes.upload import OOD_WARNING, upload_model
from covid_cxr.serve.routes.web import STATIC
from covid_cxr.serve.settings import ServeSettings

router = APIRouter(tags=["browser"], responses=ERRORS, dependencies=[Depends(require_api_key)])
RUNTIME_DIR = STATIC / "vendor" / "onnxruntime-web"
RUNTIME_URL = "static/vendor/onnxruntime-web/"
RUNTIME_FILES = ("ort.wasm.min.js", "ort-wasm-simd-threaded.mjs", "ort-wasm-simd-threaded.wasm")
NO_RUNTIME = ("this server has no onnxruntime-web files (run `make web-runtime` where it is installed): "
              "use server mode")
LUNG_CROP = ("this model first crops the lungs with its own lung model, which the in-browser mode does not "
             "run: use server mode")


class BrowserOperatingPoint(BaseModel):
    class_name: str
    threshold: float


class BrowserModel(BaseModel):
    """What the page needs to classify on the device exactly as the server does."""

    name: str
    version: int
    classes: list[str]
    height: int
    width: int
    max_pixels: int = Field(description="the server's decode limit, applied by the page too")
    temperature: float = Field(description="applied inside model.onnx (shown, not applied again)")
    gate: bool = Field(description="model.onnx also outputs ood_score and in_distribution")
    warning: str = Field(description="shown instead of a label when the gate rejects an image")
    operating_point: BrowserOperatingPoint | None = None
    onnx_url: str
    runtime_url: str | None = Field(description="where onnxruntime-web is served; None: not installed")
    unavailable: str | None = Field(None, description="why this model cannot run in the browser")


def runtime_present() -> bool:
    return all((RUNTIME_DIR / f).is_file() for f in RUNTIME_FILES)


def describe(loaded: LoadedModel, settings: ServeSettings) -> BrowserModel:
    meta = loaded.bundle.metadata
    op = meta.operating_point
    has_runtime = runtime_present()
    reason = LUNG_CROP if meta.lung_crop is not None else None if has_runtime else NO_RUNTIME
    h, w = loaded.input_hw
    return BrowserModel(
        name=loaded.name, version=loaded.version, classes=loaded.classes, height=h, width=w,
        max_pixels=settings.max_image_pixels, temperature=loaded.bundle.temperature, gate=loaded.bundle.has_ood,
        warning=OOD_WARNING, onnx_url=f"api/v1/browser/models/{loaded.name}/versions/{loaded.version}/model.onnx",
        operating_point=BrowserOperatingPoint(class_name=op.class_name, threshold=op.threshold) if op else None,
        runtime_url=RUNTIME_URL if has_runtime else None, unavailable=reason)


@router.get("/api/v1/browser/model", response_model=BrowserModel)
async def browser_model(request: Request, model: ModelQuery = None,
                        repo: ModelRepository = Depends(get_repo), settings: ServeSettings = Depends(get_settings)):
    """The model the page would use in server mode, described for the in-browser mode."""
    loaded = await upload_model(repo, settings, model)
    request.state.model = loaded.name
    return describe(loaded, settings)


@router.get("/api/v1/browser/models/{name}/versions/{version}/model.onnx", response_class=FileResponse)
async def browser_onnx(name: ModelName, version: VersionText, request: Request,
                       repo: ModelRepository = Depends(get_repo)):
    """The version's model.onnx, as loaded (and checked against its metadata) by this server."""
    request.state.model = name
    loaded = await repo.get(name, parse_version(version))
    return FileResponse(loaded.bundle.onnx_path, media_type="application/octet-stream",
                        filename=f"{name}-{loaded.version}.onnx")

"""A model's card (GET /api/v1/models/{name}/card): the bundle's MODEL_CARD.html, or .md on request.

Bundles written before cards existed get theirs rendered from metadata.json and report/ on the fly
(covid_cxr.bundle.card is torch-free), so every served model has one."""

from __future__ import annotations

from typing import Literal

import anyio.to_thread
from fastapi import APIRouter, Depends, Query
from fastapi.responses import Response

from covid_cxr.bundle import BundleError, load_bundle
from covid_cxr.bundle.card import CARD_HTML, CARD_MD, card_html, card_markdown
from covid_cxr.serve.deps import ModelName, get_repo, require_key_to_read
from covid_cxr.serve.protocol import ERRORS
from covid_cxr.serve.repository import ModelNotFound, ModelRepository, ModelUnavailable

router = APIRouter(tags=["upload"])
MEDIA = {"html": "text/html; charset=utf-8", "md": "text/markdown; charset=utf-8"}
# A card is a document: no scripts, no outside resources, whatever its text holds.
HEADERS = {"Cache-Control": "no-cache", "Content-Security-Policy": "default-src 'none'; style-src 'unsafe-inline'",
           "X-Content-Type-Options": "nosniff"}


def read_card(repo: ModelRepository, name: str, version: int, fmt: str) -> str:
    """The stored card of MODELS/<name>/<version>, or one rendered now for an older bundle."""
    bundle = load_bundle(repo.root / name, version)
    stored = bundle.path / (CARD_HTML if fmt == "html" else CARD_MD)
    if stored.is_file():
        return stored.read_text(encoding="utf-8")
    md = card_markdown(bundle.path, bundle.metadata)
    return md if fmt == "md" else card_html(md, f"Model card: {bundle.name} v{bundle.version}")


@router.get("/api/v1/models/{name}/card", response_class=Response, responses=ERRORS,
            dependencies=[Depends(require_key_to_read)],  # it carries test metrics, as metadata does
            summary="The model card (intended use, data, evaluation, calibration, gate, audit, limitations)")
async def model_card(name: ModelName, version: int | None = Query(None, ge=1, description="default: the newest"),
                     format: Literal["html", "md"] = Query("html", description="html (a page) or md (Markdown)"),
                     repo: ModelRepository = Depends(get_repo)) -> Response:
    vs = repo.disk_versions(name)
    if version is not None and version not in vs:
        raise ModelNotFound(f"Servable not found for request: Specific({name}, {version})")
    try:
        text = await anyio.to_thread.run_sync(read_card, repo, name, version or vs[-1], format)
    except (BundleError, OSError) as exc:
        raise ModelUnavailable(repo.public(f"model card of {name}: {exc}")) from None
    return Response(text, media_type=MEDIA[format], headers=HEADERS)

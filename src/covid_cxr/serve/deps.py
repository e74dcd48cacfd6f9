"""What handlers receive by injection: the app's settings, model repository and metrics (all on
`app.state`, so several apps can live in one process), the API-key check, version parsing."""

from __future__ import annotations

import hmac
from typing import Annotated

from fastapi import Depends, Path, Query, Request

from covid_cxr.bundle import parse_version as version_number
from covid_cxr.bundle.store import NAME_PATTERN, VERSION_PATTERN
from covid_cxr.serve.limits import DecodeLimits
from covid_cxr.serve.metrics import Metrics
from covid_cxr.serve.protocol import BadRequest
from covid_cxr.serve.repository import ModelRepository
from covid_cxr.serve.settings import ServeSettings


class Unauthorized(Exception):
    pass


# Path parameters as the OpenAPI document shows them. The patterns are documentation only (not
# FastAPI validation) so a bad value gets the handlers' own 400 message, the same as before.
ModelName = Annotated[str, Path(description="model name", json_schema_extra={"pattern": NAME_PATTERN})]
# ?model=NAME on the upload and browser routes; absent: the first model (checked by the route: 400 JSON)
ModelQuery = Annotated[str | None, Query(description="model name (default: the first)",
                                         json_schema_extra={"pattern": NAME_PATTERN})]
VersionText = Annotated[str, Path(description="model version: a positive integer",
                                  json_schema_extra={"pattern": VERSION_PATTERN})]


def get_settings(request: Request) -> ServeSettings:
    return request.app.state.settings


def get_repo(request: Request) -> ModelRepository:
    return request.app.state.repo


def get_limits(request: Request) -> DecodeLimits:
    return request.app.state.decode_limits


def get_metrics(request: Request) -> Metrics:
    return request.app.state.metrics


def require_api_key(request: Request, settings: ServeSettings = Depends(get_settings)) -> None:
    """Bearer-token check (no-op when the server has no key). The scheme is
    case-insensitive (RFC 6750 via RFC 7235: 'bearer' is as good as 'Bearer'); the token is not."""
    if not settings.api_key:
        return
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), settings.api_key.encode()):
        raise Unauthorized()


def require_key_to_read(request: Request, settings: ServeSettings = Depends(get_settings)) -> None:
    """The key check for what describes the models (lists, metadata with test metrics, Triton
    config): needed unless `api_key_scope` is 'predict'."""
    if settings.api_key_scope == "all":
        require_api_key(request, settings)


def require_key_for_metrics(request: Request, settings: ServeSettings = Depends(get_settings)) -> None:
    """/metrics shows every model's traffic: the key unless `public_metrics` or scope 'predict'."""
    if settings.api_key_scope == "all" and not settings.public_metrics:
        require_api_key(request, settings)


def parse_version(version: str) -> int:
    number = version_number(version)
    if number is None:
        shown = version if len(version) <= 20 else version[:20] + "..."
        raise BadRequest(f"malformed model version {shown!r}: expected a positive integer")
    return number

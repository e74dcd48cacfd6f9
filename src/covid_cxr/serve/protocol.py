"""Request/response models and the TensorFlow Serving REST predict format, turned into one batch.

A predict body is parsed off the event loop (a batch of 224 x 224 float tensors is megabytes of
JSON). Whatever the client sent, the model gets one float32 array N x H x W x 1: tensors as given
(H x W, H x W x 1, or H x W x 3 averaged to gray), `{"b64": ...}` image files decoded and resized
exactly as in training (`covid_cxr.data.decode.load_for_model`).
"""

from __future__ import annotations

import base64
import binascii
import json
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from covid_cxr.bundle import ONNX_INPUT
from covid_cxr.data.decode import VALUE_RANGE, DecodeError
from covid_cxr.serve.limits import DecodeLimits

SIGNATURE = "serving_default"
OOD_SIGNATURE = "with_ood"  # probabilities, ood_score, in_distribution (bundles with an OOD gate)


class BadRequest(ValueError):
    """Anything wrong with what the client sent: 400 with this message."""


# ---------------------------------------------------------------------------------- models

class ErrorResponse(BaseModel):
    error: str


ERRORS = {s: {"model": ErrorResponse} for s in (400, 401, 404, 408, 413, 500, 503)}  # OpenAPI: what errors look like


class TFStatus(BaseModel):
    error_code: str = "OK"
    error_message: str = ""


class TFVersionStatus(BaseModel):
    version: str
    state: str
    status: TFStatus = TFStatus()


class TFModelStatusResponse(BaseModel):
    model_version_status: list[TFVersionStatus]


class TFPredictRequest(BaseModel):
    """TF Serving's predict body: exactly one of `instances` (row format) or `inputs` (columnar)."""

    model_config = ConfigDict(extra="ignore")
    signature_name: str | None = None
    instances: list[Any] | None = None
    inputs: Any = None


class TFPredictResponse(BaseModel):
    predictions: list[list[float]]


class TFColumnarResponse(BaseModel):
    outputs: list[list[float]]


class TFNamedPredictResponse(BaseModel):
    """Row format with several named outputs (TF Serving): one object per instance."""

    predictions: list[dict[str, Any]]


class TFNamedColumnarResponse(BaseModel):
    """Columnar format with several named outputs: output name -> batch."""

    outputs: dict[str, list]


class TFModelMetadataResponse(BaseModel):
    model_spec: dict[str, Any]
    metadata: dict[str, Any]


class LungFields(BaseModel):
    """The lung segmentation's view of the upload: its sanity check (a failed one is an
    out-of-distribution signal) and, with Grad-CAM, where the map looks."""

    check_ok: bool = Field(description="two lung fields side by side, plausible area")
    problems: list[str] = Field([], description="why the check failed: the image may be unlike the training films")
    area: float = Field(description="lung area / image area")
    inside_share: float | None = Field(None, description="share of the Grad-CAM map's mass inside the lungs")
    strongest_zone: str | None = Field(None, description="patient's right/left x upper/middle/lower")
    summary: str | None = Field(None, description="e.g. '72 % inside the lungs; strongest: left lower zone'")
    error: str | None = Field(None, description="why no lung fields came back")


class UploadPrediction(BaseModel):
    label: str | None = Field(description="the diagnosis label; null when the gate rejects the image (no "
                              "label is given for an image unlike the training X-rays: see warning)")
    in_distribution: bool | None = Field(None, description="false: the image is unlike the training X-rays "
                                         "(a photo, noise, another body part...); do not trust the label. "
                                         "Absent for bundles without an out-of-distribution gate")
    ood_score: float | None = Field(None, description="distance from the training images (larger: less alike)")
    warning: str | None = Field(None, description="shown instead of a confident label when out of distribution")
    probabilities: dict[str, float] = Field(description="every class, in the model's class order")
    model: str
    version: int
    latency_ms: float = Field(description="server time from request arrival to this answer")
    gradcam_png: str | None = Field(None, description="base64 PNG: Grad-CAM of the label over the image")
    gradcam_error: str | None = Field(None, description="why no overlay came back, when one was asked for")
    lungs: LungFields | None = Field(None, description="lung fields (when the server has a lung model)")


class ModelSummary(BaseModel):
    name: str
    versions: list[int]
    classes: list[str] | None = None
    input: dict[str, int] | None = None


class ModelList(BaseModel):
    models: list[ModelSummary]


# ---------------------------------------------------------------------------------- metadata

def signature_def(h: int, w: int, n_classes: int, with_ood: bool = False) -> dict:
    """The model's signatures as TF Serving's GetModelMetadata shows a SavedModel's: serving_default
    (probabilities only, unchanged for the study's client) and, with an OOD gate, with_ood."""
    def shape(*dims: int) -> dict:
        return {"dim": [{"size": str(d), "name": ""} for d in dims], "unknown_rank": False}

    def signature(name: str, outputs: dict) -> dict:
        return {"inputs": {ONNX_INPUT: {"dtype": "DT_FLOAT", "tensor_shape": shape(-1, h, w, 1),
                                        "name": f"{name}_{ONNX_INPUT}:0"}},
                "outputs": {k: {"dtype": dtype, "tensor_shape": shape(*dims), "name": f"{k}:0"}
                            for k, (dtype, dims) in outputs.items()},
                "method_name": "tensorflow/serving/predict"}

    probs = {"probabilities": ("DT_FLOAT", (-1, n_classes))}
    sigs = {SIGNATURE: signature(SIGNATURE, probs)}
    if with_ood:
        sigs[OOD_SIGNATURE] = signature(OOD_SIGNATURE, {**probs, "ood_score": ("DT_FLOAT", (-1,)),
                                                         "in_distribution": ("DT_BOOL", (-1,))})
    return {"signature_def": sigs}


# ---------------------------------------------------------------------------------- parsing

def parse_predict(body: bytes, height: int, width: int, max_instances: int,
                  limits: DecodeLimits = DecodeLimits()) -> tuple[np.ndarray, bool]:
    """Body of a :predict call -> (float32 N x H x W x 1 batch, columnar?). Raises BadRequest."""
    x, columnar, _ = parse_signed_predict(body, height, width, max_instances, limits=limits)
    return x, columnar


def parse_signed_predict(body: bytes, height: int, width: int, max_instances: int,
                         signatures: tuple[str, ...] = (SIGNATURE,),
                         limits: DecodeLimits = DecodeLimits()) -> tuple[np.ndarray, bool, str]:
    """parse_predict, also accepting and returning the signature named (one of `signatures`)."""
    obj = parse_json(body)
    if not isinstance(obj, dict):
        raise BadRequest("request body must be a JSON object with 'instances' or 'inputs'")
    try:
        req = TFPredictRequest.model_validate(obj)
    except ValidationError as exc:
        raise BadRequest(f"malformed request: {exc.errors()[0]['msg']} at {exc.errors()[0]['loc']}") from None
    if req.signature_name not in (None, "", *signatures):
        raise BadRequest(f"serving signature name {req.signature_name!r} not found; this model has "
                         f"{', '.join(map(repr, signatures))}")
    if (req.instances is None) == ("inputs" not in obj):
        raise BadRequest("request must hold exactly one of 'instances' (row format) or 'inputs' (columnar)")
    columnar = req.instances is None
    items = _columnar_items(req.inputs) if columnar else [_unwrap(i) for i in req.instances]
    if not items:
        raise BadRequest("no instances in request")
    if len(items) > max_instances:
        raise BadRequest(f"{len(items)} instances in one request; at most {max_instances}")
    return to_batch(items, height, width, limits, may_hold_bools(body)), columnar, req.signature_name or SIGNATURE


def may_hold_bools(text: bytes) -> bool:
    """Whether JSON text could hold a boolean: a `true` or `false` literal anywhere (inside strings
    too, so never a false "no"). Where it cannot, as_numbers skips its per-leaf check, a second
    conversion of the whole tensor (~0.1 s for 8 x 224 x 224)."""
    return b"true" in text or b"false" in text


def parse_json(body: bytes) -> Any:
    """JSON text -> Python; BadRequest for anything else. Nesting is bounded by the parser's own
    recursion guard (RecursionError, about 1,000 levels; a tensor needs 5)."""
    try:
        return json.loads(body)
    except RecursionError:
        raise BadRequest("malformed JSON: nested too deeply") from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise BadRequest(f"malformed JSON: {exc}") from None


def _unwrap(value: Any) -> Any:
    """An instance may name the model's one input: {"image": tensor-or-b64}."""
    if isinstance(value, dict) and "b64" not in value:
        if set(value) != {ONNX_INPUT}:
            raise BadRequest(f"unknown input name(s) {sorted(value)}; the model's one input is {ONNX_INPUT!r}")
        return value[ONNX_INPUT]
    return value


def _columnar_items(inputs: Any) -> list:
    inputs = _unwrap(inputs)
    if isinstance(inputs, dict):  # {"b64": ...}: one encoded image
        return [inputs]
    if not isinstance(inputs, list):
        raise BadRequest("'inputs' must be a batch (a list) of tensors or of {'b64': ...} images")
    return inputs


def to_batch(items: list, height: int, width: int, limits: DecodeLimits = DecodeLimits(),
             bools: bool = True) -> np.ndarray:
    """Instances -> float32 N x H x W x 1, checking shape, finiteness and range (`bools`: see as_numbers)."""
    if all(isinstance(i, list) for i in items):  # the common case: one numpy conversion for all
        return check_values(_shape_batch(as_numbers(items, bools=bools), height, width))
    out = []
    for k, item in enumerate(items):
        if isinstance(item, dict):
            out.append(decode_b64(item, height, width, k, limits)[..., None])
        elif isinstance(item, list):
            out.append(_shape_batch(as_numbers([item], bools=bools), height, width, k)[0])
        else:
            raise BadRequest(f"instance {k}: expected a tensor (nested list) or {{'b64': ...}}, "
                             f"got {type(item).__name__}")
    return check_values(np.stack(out))


def as_numbers(value: list, what: str = "instances", bools: bool = True) -> np.ndarray:
    """Nested lists of JSON numbers -> float32; strings and booleans are refused, as TF Serving
    refuses them (numpy would read "0.5" as text and quietly turn true into 1 beside numbers).
    `bools` False: the caller knows the JSON held no boolean (may_hold_bools), so none is looked for."""
    try:
        arr = np.asarray(value)
    except (ValueError, TypeError, OverflowError, RecursionError):
        raise BadRequest(f"{what} must be rectangular arrays of numbers "
                         "(ragged or mixed nesting found)") from None
    kind = "b" if bools and arr.dtype.kind in "fiu" and _holds_bool(value, arr.ndim) else arr.dtype.kind
    if kind not in "fiu":
        found = {"U": "strings", "S": "strings", "b": "booleans"}.get(kind, "non-numeric values")
        raise BadRequest(f"{what} must hold numbers, found {found}")
    with np.errstate(over="ignore"):
        return arr.astype(np.float32, copy=False)


def _holds_bool(value: list, ndim: int) -> bool:
    """Whether a rectangular nested list has a boolean among its numbers (one pass in C)."""
    leaves = value if ndim == 1 else np.asarray(value, dtype=object).ravel()
    return bool in set(map(type, leaves))


def _shape_batch(arr: np.ndarray, h: int, w: int, index: int | None = None) -> np.ndarray:
    """N x H x W, N x H x W x 1 or N x H x W x 3 -> N x H x W x 1."""
    where = "instances" if index is None else f"instance {index}"
    if arr.ndim == 3:
        arr = arr[..., None]
    elif arr.ndim == 4 and arr.shape[-1] == 3:
        arr = arr.mean(axis=-1, keepdims=True, dtype=np.float32)
    if arr.ndim != 4 or arr.shape[1:] != (h, w, 1):
        got = list(arr.shape[1:]) if arr.ndim >= 1 else []
        raise BadRequest(f"{where}: shape {got} does not match the model's input [{h}, {w}, 1] "
                         f"(also accepted: [{h}, {w}] and [{h}, {w}, 3])")
    return np.ascontiguousarray(arr, dtype=np.float32)


def check_values(arr: np.ndarray) -> np.ndarray:
    """The model was trained on [0, 1] pixels: 0-255 values would give a confident wrong answer."""
    if not np.isfinite(arr).all():
        raise BadRequest("instances hold NaN or infinite values (or numbers too large for float32)")
    lo, hi = float(arr.min()), float(arr.max())
    if lo < VALUE_RANGE[0] or hi > VALUE_RANGE[1]:
        raise BadRequest(f"instance values must lie in [{VALUE_RANGE[0]:g}, {VALUE_RANGE[1]:g}], found "
                         f"[{lo:g}, {hi:g}] (8-bit pixels: divide by 255)")
    return arr


def decode_b64(item: dict, height: int, width: int, index: int = 0,
               limits: DecodeLimits = DecodeLimits()) -> np.ndarray:
    """{"b64": "<base64 PNG/JPEG/DICOM file>"} -> float32 H x W in [0, 1], resized as in training."""
    if set(item) != {"b64"} or not isinstance(item["b64"], str):
        raise BadRequest(f"instance {index}: a binary value must be {{'b64': '<base64 string>'}}")
    text = item["b64"].strip().replace("-", "+").replace("_", "/")  # web-safe alphabet too
    text += "=" * (-len(text) % 4)
    try:
        data = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise BadRequest(f"instance {index}: invalid base64: {exc}") from None
    return decode_image(data, height, width, f"instance {index}", limits)


def decode_image(data: bytes, height: int, width: int, what: str = "image",
                 limits: DecodeLimits = DecodeLimits()) -> np.ndarray:
    try:
        return limits.load(data, height, width)
    except DecodeError as exc:
        raise BadRequest(f"{what}: undecodable image: {exc}") from None

"""The Open Inference Protocol (KServe v2) infer request and response, with Triton's binary tensor
extension, turned into one image batch and back.

A request is a JSON header, optionally followed by raw tensor bytes (`Inference-Header-Content-Length`
says where the JSON ends; each input's `parameters.binary_data_size` says how many bytes are its).
The model's one input, `image`, is either FP32 [N, H, W, 1] in [0, 1], already resized as metadata
says, or BYTES [N] (or [N, 1]): encoded PNG/JPEG/DICOM files the server decodes and resizes exactly
as training did (`covid_cxr.data.decode` via `protocol.decode_image`, as TF Serving's `b64` path).
In JSON (no binary extension) a BYTES element is a string, so it carries the file in base64.
"""

from __future__ import annotations

import base64
import binascii
import json
import struct
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict, ValidationError

from covid_cxr.bundle import ONNX_INPUT
from covid_cxr.export.tensors import oip_datatype
from covid_cxr.serve.limits import DecodeLimits
from covid_cxr.serve.protocol import BadRequest, as_numbers, check_values, decode_image, may_hold_bools, parse_json

HEADER_LENGTH = "Inference-Header-Content-Length"


class InferInput(BaseModel):
    model_config = ConfigDict(extra="ignore")
    name: str
    shape: list[int]
    datatype: str
    parameters: dict[str, Any] = {}
    data: Any = None


class InferOutput(BaseModel):
    model_config = ConfigDict(extra="ignore")
    name: str
    parameters: dict[str, Any] = {}


class InferRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")
    id: str | None = None
    parameters: dict[str, Any] = {}
    inputs: list[InferInput]
    outputs: list[InferOutput] | None = None


@dataclass
class ParsedRequest:
    id: str | None
    image: InferInput
    raw: bytes | None  # the input's binary data, when sent with the binary extension
    outputs: list[tuple[str, bool]] | None = field(default=None)  # (name, binary?) asked for; None: all
    binary_default: bool = False
    bools: bool = True  # the JSON may hold a boolean (protocol.may_hold_bools)


def parse_infer(body: bytes, header_length: str | None) -> ParsedRequest:
    """Body of POST .../infer -> the `image` input and the outputs asked for. Raises BadRequest."""
    try:
        n = len(body) if header_length is None else int(header_length)
    except ValueError:
        raise BadRequest(f"{HEADER_LENGTH} must be an integer, got {header_length!r}") from None
    if not 0 < n <= len(body):
        raise BadRequest(f"{HEADER_LENGTH} {n} is outside the body ({len(body)} bytes)")
    obj = parse_json(body[:n])  # BadRequest for bad or too deeply nested JSON, as TF Serving's parser
    try:
        req = InferRequest.model_validate(obj)
    except (ValueError, RecursionError) as exc:
        msg = exc.errors()[0] if isinstance(exc, ValidationError) else "nested too deeply"
        raise BadRequest(f"malformed inference request: {msg}") from None
    blobs = _binary_inputs(req.inputs, body[n:])
    names = [i.name for i in req.inputs]
    if names != [ONNX_INPUT]:
        raise BadRequest(f"inputs {names}: this model has one input, {ONNX_INPUT!r}")
    outs = None if req.outputs is None else [
        (o.name, bool(o.parameters.get("binary_data", req.parameters.get("binary_data_output", False))))
        for o in req.outputs]
    return ParsedRequest(req.id, req.inputs[0], blobs.get(ONNX_INPUT), outs,
                         bool(req.parameters.get("binary_data_output", False)), may_hold_bools(body[:n]))


def _binary_inputs(inputs: list[InferInput], rest: bytes) -> dict[str, bytes]:
    """Split the bytes after the JSON header among the inputs that declare binary_data_size."""
    out, pos = {}, 0
    for i in inputs:
        size = i.parameters.get("binary_data_size")
        if size is None:
            continue
        if not isinstance(size, int) or size < 0 or pos + size > len(rest):
            raise BadRequest(f"input {i.name!r}: binary_data_size {size!r} does not fit the "
                             f"{len(rest) - pos} bytes left after the JSON header")
        out[i.name] = rest[pos:pos + size]
        pos += size
    if pos != len(rest):
        raise BadRequest(f"{len(rest) - pos} bytes after the inputs' binary data belong to no input")
    return out


def image_batch(req: ParsedRequest, height: int, width: int, max_instances: int,
                limits: DecodeLimits = DecodeLimits()) -> np.ndarray:
    """The `image` input as float32 N x H x W x 1 (FP32 as given, BYTES decoded within the server's
    decode limits). Raises BadRequest."""
    t = req.image
    n = t.shape[0] if t.shape else 0
    if not 0 < n <= max_instances:
        raise BadRequest(f"input {t.name!r}: batch of {n}; between 1 and {max_instances} images per request")
    if t.datatype == "BYTES":
        if t.shape not in ([n], [n, 1]):
            raise BadRequest(f"BYTES input {t.name!r}: shape {t.shape}, expected [N] or [N, 1] (one file each)")
        files = _bytes_elements(t, req.raw, n)
        return np.stack([decode_image(f, height, width, f"image {k}", limits) for k, f in enumerate(files)])[..., None]
    if t.datatype != "FP32":
        raise BadRequest(f"input {t.name!r}: datatype {t.datatype}; expected FP32 [N, {height}, {width}, 1] "
                         "or BYTES [N] (encoded image files)")
    if t.shape != [n, height, width, 1]:
        raise BadRequest(f"input {t.name!r}: shape {t.shape} does not match the model's [N, {height}, {width}, 1]")
    return check_values(_fp32_elements(t, req.raw, req.bools).reshape(t.shape))


def _fp32_elements(t: InferInput, raw: bytes | None, bools: bool = True) -> np.ndarray:
    count = int(np.prod(t.shape))
    if raw is not None:
        if len(raw) != 4 * count:
            raise BadRequest(f"input {t.name!r}: {len(raw)} bytes of binary data for {count} FP32 values")
        return np.frombuffer(raw, dtype="<f4").astype(np.float32)
    if not isinstance(t.data, list):
        raise BadRequest(f"input {t.name!r}: 'data' must be a list of numbers")
    x = as_numbers(t.data, f"input {t.name!r}: 'data'", bools).reshape(-1)
    if x.size != count:
        raise BadRequest(f"input {t.name!r}: {x.size} values in 'data' for shape {t.shape}")
    return x


def _bytes_elements(t: InferInput, raw: bytes | None, n: int) -> list[bytes]:
    """BYTES elements: binary (4-byte little-endian length, then the bytes, per element) or JSON
    strings holding base64."""
    if raw is None:
        data = t.data if isinstance(t.data, list) else [t.data]
        data = [d[0] if isinstance(d, list) and len(d) == 1 else d for d in data]
        if len(data) != n or not all(isinstance(d, str) for d in data):
            raise BadRequest(f"BYTES input {t.name!r}: 'data' must be {n} base64 strings (one file each)")
        try:
            return [base64.b64decode(d, validate=True) for d in data]
        except (binascii.Error, ValueError) as exc:
            raise BadRequest(f"BYTES input {t.name!r}: invalid base64: {exc}") from None
    out, pos = [], 0
    while pos < len(raw):
        if pos + 4 > len(raw):
            raise BadRequest(f"BYTES input {t.name!r}: truncated element length")
        (size,) = struct.unpack_from("<I", raw, pos)
        out.append(raw[pos + 4:pos + 4 + size])
        pos += 4 + size
    if pos != len(raw) or len(out) != n:
        raise BadRequest(f"BYTES input {t.name!r}: {len(out)} elements in its binary data for shape {t.shape}")
    return out


def encode_response(model: str, version: int, request_id: str | None,
                    outputs: list[tuple[str, np.ndarray, bool]]) -> tuple[bytes, int | None]:
    """(name, array, binary?) per output -> response body and, when any output is binary, the JSON
    header's length (for `Inference-Header-Content-Length`)."""
    tensors, blobs = [], []
    for name, arr, binary in outputs:
        arr = np.ascontiguousarray(arr)
        t = {"name": name, "datatype": oip_datatype(arr.dtype), "shape": list(arr.shape)}
        if binary:
            blob = arr.astype(arr.dtype.newbyteorder("<"), copy=False).tobytes()
            t["parameters"] = {"binary_data_size": len(blob)}
            blobs.append(blob)
        else:
            t["data"] = arr.reshape(-1).tolist()
        tensors.append(t)
    head = {"model_name": model, "model_version": str(version), "outputs": tensors}
    if request_id is not None:
        head["id"] = request_id
    header = json.dumps(head).encode()
    return (header + b"".join(blobs), len(header)) if blobs else (header, None)


def tensor_metadata(specs) -> list[dict]:
    """metadata.onnx tensors -> the protocol's [{name, datatype, shape}]."""
    return [{"name": t.name, "datatype": oip_datatype(t.dtype), "shape": list(t.shape)} for t in specs]


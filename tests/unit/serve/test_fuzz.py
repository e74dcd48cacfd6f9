"""Property-based fuzzing (Hypothesis) of what the server parses from strangers: the TF Serving
predict body and the image decoder. Whatever the bytes, the only exceptions allowed are the
documented ones (BadRequest -> 400, DecodeError -> 400), and what comes back is what the model may
be fed: float32, the model's shape, finite, in [0, 1]."""

from __future__ import annotations

import base64
import io
import json
import os

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from covid_cxr.data.decode import DecodeError, decode_gray, load_for_model
from covid_cxr.serve.limits import DecodeLimits
from covid_cxr.serve.protocol import BadRequest, parse_predict
from tests.unit.images import _dicom_bytes

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")  # pydicom's notes on broken elements
H = W = 4
EXAMPLES = int(os.environ.get("COVID_CXR_FUZZ_EXAMPLES", "300"))  # more for a longer campaign
FUZZ = settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow],
                derandomize=True)  # the same draws every run: a CI failure is a finding, not luck
LIMITS = DecodeLimits(max_pixels=4_000_000)


def _image(fmt: str, mode: str) -> bytes:
    rng = np.random.default_rng(0)
    img = Image.fromarray(rng.integers(0, 255, (24, 24), dtype=np.uint8)).convert(mode)
    buf = io.BytesIO()
    img.save(buf, fmt)
    return buf.getvalue()


SEEDS = [_image("PNG", "L"), _image("PNG", "RGBA"), _image("PNG", "P"), _image("JPEG", "RGB"),
         _image("PNG", "I;16"), _dicom_bytes(np.arange(24 * 24, dtype=np.uint16).reshape(24, 24))]


@st.composite
def mutated_images(draw) -> bytes:
    """A valid PNG/JPEG/DICOM with bytes flipped, cut off or spliced: the interesting corruptions."""
    data = bytearray(draw(st.sampled_from(SEEDS)))
    for _ in range(draw(st.integers(0, 6))):
        data[draw(st.integers(0, len(data) - 1))] = draw(st.integers(0, 255))
    if draw(st.booleans()):
        data = data[: draw(st.integers(0, len(data)))]
    if draw(st.booleans()):
        at = draw(st.integers(0, len(data)))
        data[at:at] = draw(st.binary(max_size=64))
    return bytes(data)


any_bytes = st.one_of(st.binary(max_size=2048), mutated_images(),
                      st.binary(max_size=200).map(lambda b: b"\0" * 128 + b"DICM" + b),
                      st.binary(max_size=200).map(lambda b: b"\x02\x00" + b))


def _check_pixels(x: np.ndarray) -> None:
    assert x.dtype == np.float32 and np.isfinite(x).all() and x.min() >= 0 and x.max() <= 1


def test_decoder_raises_only_decode_error():
    """Every draw either decodes to valid pixels or raises DecodeError; and the run must include
    both, or it proved nothing (a decoder that refuses everything would pass the first half)."""
    outcomes = {"decoded": 0, "refused": 0}

    @FUZZ
    @given(any_bytes)
    def check(data):
        try:
            dec = decode_gray(data, max_pixels=LIMITS.max_pixels)
        except DecodeError:
            outcomes["refused"] += 1
            return
        _check_pixels(dec.pixels)
        _check_pixels(load_for_model(data, H, W, LIMITS.max_pixels))
        outcomes["decoded"] += 1

    check()
    # both branches ran (valid inputs decoding for sure: test_every_unmutated_seed_decodes)
    assert outcomes["decoded"] >= 1 and outcomes["refused"] >= EXAMPLES // 20, outcomes


@pytest.mark.parametrize("seed", range(len(SEEDS)), ids=["png-L", "png-RGBA", "png-P", "jpeg-RGB", "png-I16", "dicom"])
def test_every_unmutated_seed_decodes(seed):
    _check_pixels(load_for_model(SEEDS[seed], H, W, LIMITS.max_pixels))


numbers = st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.integers(-10**30, 10**30),
                    st.floats(0, 1), st.just(0.5))
json_values = st.recursive(st.none() | st.booleans() | numbers | st.text(max_size=8),
                           lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=6), inner, max_size=4),
                           max_leaves=40)


SHAPES = [(H, W), (H, W, 1), (H, W, 3), (W, H + 1), (H,), (H, W, 2)]
tensors = st.sampled_from(SHAPES).flatmap(
    lambda shape: st.lists(st.floats(-0.5, 1.5), min_size=int(np.prod(shape)), max_size=int(np.prod(shape)))
    .map(lambda values: np.asarray(values).reshape(shape).tolist()))


@st.composite
def predict_bodies(draw) -> bytes:
    """Near-valid bodies (the parser's real branches) and arbitrary JSON, encoded or raw."""
    instance = st.one_of(st.builds(lambda b: {"b64": base64.b64encode(b).decode()}, any_bytes),
                         st.just({"b64": "!!not base64"}), json_values,
                         st.builds(lambda t: {"image": t}, st.lists(st.just(0.5), max_size=3)),
                         tensors)
    body = draw(st.one_of(
        st.builds(lambda i, s: {"instances": i, "signature_name": s}, st.lists(instance, max_size=3),
                  st.sampled_from([None, "", "serving_default", "other", 3])),
        st.builds(lambda i: {"inputs": i}, st.one_of(instance, st.lists(instance, max_size=3))),
        st.dictionaries(st.sampled_from(["instances", "inputs", "signature_name", "x"]), json_values, max_size=3),
        json_values))
    text = json.dumps(body)  # NaN and Infinity included: Python's parser accepts them
    return draw(st.one_of(st.just(text.encode()), st.just(text.encode("utf-16")),
                          st.binary(max_size=256), st.just(("[" * draw(st.integers(1, 3000))).encode())))


@pytest.mark.slow  # many Hypothesis examples through the parser
def test_predict_parser_raises_only_bad_request():
    """Every body either parses to valid instances or raises BadRequest, and the cases ran (valid
    bodies are rare among the draws: test_valid_predict_bodies_parse holds the accepting side)."""
    outcomes = {"parsed": 0, "refused": 0}

    @FUZZ
    @given(predict_bodies())
    def check(body):
        try:
            x, columnar = parse_predict(body, H, W, max_instances=8, limits=LIMITS)
        except BadRequest:
            outcomes["refused"] += 1
            return
        assert isinstance(columnar, bool) and x.shape[1:] == (H, W, 1) and 1 <= len(x) <= 8
        _check_pixels(x)
        outcomes["parsed"] += 1

    check()
    assert outcomes["parsed"] + outcomes["refused"] >= EXAMPLES // 2, outcomes


VALID_BODIES = [{"instances": [[[0.5] * W] * H]}, {"inputs": [[[0.25] * W] * H, [[1.0] * W] * H]},
                {"signature_name": "serving_default", "instances": [[[[0.5]] * W] * H]},
                {"instances": [{"b64": base64.b64encode(SEEDS[0]).decode()}]}]


@pytest.mark.parametrize("body", VALID_BODIES, ids=["row", "columnar-2", "signature-hw1", "b64-png"])
def test_valid_predict_bodies_parse(body):
    x, columnar = parse_predict(json.dumps(body).encode(), H, W, max_instances=8, limits=LIMITS)
    assert x.shape[1:] == (H, W, 1) and 1 <= len(x) <= 2 and columnar == ("inputs" in body)
    _check_pixels(x)


@pytest.mark.parametrize("depth", [10, 999, 1000, 100_000])
def test_any_nesting_depth_is_a_bad_request(depth):
    with pytest.raises(BadRequest):
        parse_predict(('{"instances": ' + "[" * depth + "0" + "]" * depth + "}").encode(), H, W, 8)

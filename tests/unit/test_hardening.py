"""What a hostile or unlucky client found (issue 7), one regression test per finding.

Data-free: tiny generated images and the session's tiny bundle (MODELS/tiny/1, 64 px). Tests that
need a live server run one on loopback (`running_server`); the slow scenarios (thousands of
requests, 7,000 x 7,000 images) are in benchmarks/stress_serve.py.
"""

from __future__ import annotations

import asyncio
import http.client
import io
import json
import os
import shutil
import socket
import threading
import time
import zipfile
from pathlib import Path
from urllib.parse import quote, urlsplit

import numpy as np
import pytest
import requests
from PIL import Image

from covid_cxr.data.decode import DecodeError, decode_gray, load_for_model
from covid_cxr.serve.settings import ServeSettings
from covid_cxr.serve.testing import running_server
from tests.unit.images import _dicom_bytes

KEY = "k3y"
AUTH = {"Authorization": f"Bearer {KEY}"}
TENSOR = {"instances": [[[0.5] * 64] * 64]}


def png(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def server(tiny_models):
    settings = ServeSettings(models=tiny_models, api_key=KEY, body_timeout_s=1.0, max_concurrency=4,
                             rescan_seconds=0.5)
    with running_server(settings) as base:
        yield base


def connection(base: str) -> http.client.HTTPConnection:
    u = urlsplit(base)
    return http.client.HTTPConnection(u.hostname, u.port, timeout=10)


# ---------------------------------------------------------------------------------- 1. stalled clients

def stalled_clients(base: str, n: int) -> list[socket.socket]:
    """n connections that send predict headers promising 1,000 bytes, then one byte, then nothing."""
    u = urlsplit(base)
    socks = []
    for _ in range(n):
        s = socket.create_connection((u.hostname, u.port), timeout=10)
        s.sendall(b"POST /v1/models/tiny:predict HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  b"Content-Length: 1000\r\n\r\n{")
        socks.append(s)
    return socks


def test_stalled_clients_hold_no_predict_slot_and_get_408(server):
    socks = stalled_clients(server, 8)  # twice max_concurrency, and no API key
    try:
        time.sleep(0.2)
        t0 = time.perf_counter()
        r = requests.post(f"{server}/v1/models/tiny:predict", json=TENSOR, headers=AUTH, timeout=10)
        assert r.status_code == 200, r.text
        assert time.perf_counter() - t0 < 1.0
        socks[0].settimeout(5)
        answer = b""
        while chunk := socks[0].recv(4096):  # until the server closes it (a timeout here: it did not)
            answer += chunk
        assert answer.startswith(b"HTTP/1.1 408"), answer
        assert b"connection: close" in answer.lower()
    finally:
        for s in socks:
            s.close()


# ---------------------------------------------------------------------------------- 3. no 500, keep-alive

@pytest.mark.parametrize("version", ["²", "①", "1" * 5000, "٣"])
def test_non_ascii_and_huge_versions_are_400(server, version):
    r = requests.post(f"{server}/v1/models/tiny/versions/{quote(version)}:predict", json=TENSOR, headers=AUTH)
    assert r.status_code == 400 and "malformed model version" in r.json()["error"]
    assert requests.get(f"{server}/v1/models/tiny/versions/{quote(version)}/metadata").status_code == 400


def test_deep_json_is_400_and_the_connection_stays_usable(server):
    conn = connection(server)
    deep = '{"instances": ' + "[" * 5000 + "]" * 5000 + "}"
    conn.request("POST", "/v1/models/tiny:predict", body=deep, headers={**AUTH, "Content-Type": "application/json"})
    r = conn.getresponse()
    assert r.status == 400 and "nested too deeply" in json.loads(r.read())["error"]
    conn.request("POST", "/v1/models/tiny:predict", body=json.dumps(TENSOR), headers=AUTH)
    assert conn.getresponse().status == 200
    conn.close()


def test_an_unexpected_error_is_json_500_and_keeps_the_connection(server, monkeypatch):
    from covid_cxr.serve.routes import tf_serving

    def boom(*a, **k):
        raise RuntimeError("bug at /srv/secret/path.py")

    monkeypatch.setattr(tf_serving, "parse_signed_predict", boom)
    conn = connection(server)
    conn.request("POST", "/v1/models/tiny:predict", body=json.dumps(TENSOR), headers=AUTH)
    r = conn.getresponse()
    body = r.read()
    assert r.status == 500 and r.getheader("content-type") == "application/json"
    assert b"secret" not in body and "error" in json.loads(body)
    conn.request("GET", "/healthz")  # same socket: before the fix, the server had dropped it
    assert conn.getresponse().status == 200
    conn.close()


# ---------------------------------------------------------------------------------- 11. smaller findings

def test_head_index_and_lowercase_bearer(server):
    assert requests.head(f"{server}/").status_code == 200
    r = requests.post(f"{server}/v1/models/tiny:predict", json=TENSOR, headers={"Authorization": f"bearer {KEY}"})
    assert r.status_code == 200  # RFC 6750/7235: the scheme is case-insensitive
    r = requests.post(f"{server}/v1/models/tiny:predict", json=TENSOR, headers={"Authorization": "Bearer K3Y"})
    assert r.status_code == 401  # the token is not


def test_upload_with_two_files_is_400(server):
    img = png(np.zeros((64, 64), np.uint8))
    files = [("file", ("a.png", img, "image/png")), ("file", ("b.png", img, "image/png"))]
    r = requests.post(f"{server}/api/v1/predict", files=files, headers=AUTH)
    assert r.status_code == 400 and "exactly one file" in r.json()["error"]
    r = requests.post(f"{server}/api/v1/predict", files=files[:1], headers=AUTH)
    assert r.status_code == 200


def test_tensor_values_outside_0_1_are_400(server):
    for bad in (255.0, -0.5):
        r = requests.post(f"{server}/v1/models/tiny:predict", json={"instances": [[[bad] * 64] * 64]}, headers=AUTH)
        assert r.status_code == 400 and "[0, 1]" in r.json()["error"]
        oip = {"inputs": [{"name": "image", "datatype": "FP32", "shape": [1, 64, 64, 1], "data": [bad] * 4096}]}
        r = requests.post(f"{server}/v2/models/tiny/infer", json=oip, headers=AUTH)
        assert r.status_code == 400 and "[0, 1]" in r.json()["error"]


# ---------------------------------------------------------------------------------- 4, 5, 7. repository

def test_odd_folders_are_ignored_and_the_api_keeps_working(bundle_copy):
    models = bundle_copy.parents[1]
    for odd in ("²", "①", "00", "1x"):
        (models / "tiny" / odd).mkdir()
        shutil.copy(bundle_copy / "metadata.json", models / "tiny" / odd / "metadata.json")
    (models / "bad name").mkdir()
    with running_server(ServeSettings(models=models, rescan_seconds=0.2)) as base:
        listing = requests.get(f"{base}/api/v1/models")
        assert listing.status_code == 200
        assert listing.json()["models"][0]["versions"] == [1]
        assert requests.get(f"{base}/v1/models/tiny").status_code == 200
        assert requests.get(f"{base}/v1/models/tiny/metadata").status_code == 200
        assert requests.post(f"{base}/v1/models/tiny:predict", json=TENSOR).status_code == 200


def test_metadata_describes_the_served_version(bundle_copy):
    v2 = bundle_copy.parent / "2"
    shutil.copytree(bundle_copy, v2)
    text = (v2 / "metadata.json").read_text()
    (v2 / "metadata.json").write_text(text[: len(text) // 2])  # truncated newest version
    with running_server(ServeSettings(models=bundle_copy.parents[1], rescan_seconds=0.2)) as base:
        r = requests.get(f"{base}/v1/models/tiny/metadata")
        assert r.status_code == 200 and r.json()["model_spec"]["version"] == "1"
        assert requests.post(f"{base}/v1/models/tiny:predict", json=TENSOR).status_code == 200


def test_no_loadable_version_is_503_without_filesystem_paths(bundle_copy, tmp_path):
    (bundle_copy / "model.onnx").write_bytes(b"not onnx")
    settings = ServeSettings(models=bundle_copy.parents[1], api_key=KEY, rescan_seconds=0.2)
    with running_server(settings, wait_ready=False) as base:
        deadline = time.monotonic() + 20
        while requests.get(f"{base}/v1/models/tiny").json()["model_version_status"][0]["state"] == "LOADING":
            assert time.monotonic() < deadline
            time.sleep(0.1)
        status = requests.get(f"{base}/v1/models/tiny")  # no key: public
        meta = requests.get(f"{base}/v1/models/tiny/metadata")
        assert meta.status_code == 503 and "error" in meta.json()
        assert requests.get(f"{base}/readyz").status_code == 503
        for r in (status, meta):
            assert str(tmp_path) not in r.text and "/tmp" not in r.text, r.text
            assert "model.onnx" in r.text  # still says which file


# ---------------------------------------------------------------------------------- 6. max_batch

def test_no_onnx_call_is_larger_than_max_batch():
    from concurrent.futures import ThreadPoolExecutor

    from covid_cxr.serve.batching import MicroBatcher

    sizes = []

    def run(x):
        sizes.append(len(x))
        return x.reshape(len(x), -1)[:, :2] * 2

    async def main():
        with ThreadPoolExecutor(1) as pool:
            b = MicroBatcher(run, pool, max_batch=4, max_wait_s=0.001)
            x = np.arange(10 * 4, dtype=np.float32).reshape(10, 2, 2, 1)
            out = await b.submit(x)
            await b.close()
            return x, out

    x, out = asyncio.run(main())
    assert max(sizes) <= 4 and sum(sizes) == 10
    np.testing.assert_array_equal(out, x.reshape(10, -1)[:, :2] * 2)  # in order


def test_unbatched_model_also_splits(tiny_models):
    from covid_cxr.bundle import load_bundle
    from covid_cxr.serve.repository import LoadedModel

    sizes = []

    class Session:
        def run(self, names, feeds):  # probabilities, then the trust outputs when the bundle has them
            n = len(feeds["image"])
            sizes.append(n)
            return [np.zeros((n, 3), np.float32)] + [np.zeros(n, np.float32) for _ in names[1:]]

    m = LoadedModel("tiny", 1, load_bundle(tiny_models / "tiny"), Session(), max_batch=4)
    out = asyncio.run(m.predict(np.zeros((9, 64, 64, 1), np.float32)))
    assert out.shape == (9, 3) and sizes == [4, 4, 1]


def test_oip_named_outputs_are_split_too(tiny_models):
    """v2 infer takes every output from LoadedModel.outputs, the path predict takes (issue 17), so
    its ONNX calls are split at max_batch as well."""
    from covid_cxr.bundle import load_bundle
    from covid_cxr.serve.repository import LoadedModel

    sizes = []

    class Session:
        def run(self, names, feeds):
            n = len(feeds["image"])
            sizes.append(n)
            return [np.full((n, 3), 1 / 3, np.float32) if name == "probabilities" else np.ones(n, np.float32)
                    for name in names]

    m = LoadedModel("tiny", 1, load_bundle(tiny_models / "tiny"), Session(), max_batch=4)
    out = asyncio.run(m.outputs(np.zeros((6, 64, 64, 1), np.float32)))
    assert sizes == [4, 2] and list(out) == ["probabilities", "ood_score", "in_distribution"]
    assert out["probabilities"].shape == (6, 3) and out["in_distribution"].tolist() == [1.0] * 6


# ---------------------------------------------------------------------------------- 2. decode memory

def test_large_images_decode_reduced_and_the_cap_takes_real_radiographs():
    side = 4300  # the largest real radiographs
    arr = np.zeros((side, side), np.uint8)
    arr[::8] = 200
    data = png(arr)
    dec = decode_gray(data, target=(64, 64))
    assert (dec.width, dec.height) == (side, side)
    assert dec.pixels.shape[0] < side // 10  # reduced before any float copy
    assert load_for_model(data, 64, 64).shape == (64, 64)
    with pytest.raises(DecodeError, match="too many pixels"):
        decode_gray(png(np.zeros((4800, 4800), np.uint8)))  # 23 MP > the 20 MP default cap


def test_reduced_decoding_matches_full_resolution():
    y, x = np.mgrid[0:800, 0:800]
    arr = ((np.sin(x / 40) + np.cos(y / 55) + 2) / 4 * 255).astype(np.uint8)
    full = np.asarray(Image.fromarray(decode_gray(png(arr)).pixels, mode="F").resize((64, 64), Image.BILINEAR))
    assert np.abs(load_for_model(png(arr), 64, 64) - full).max() < 0.01


def test_pixel_budget_bounds_concurrent_decodes():
    from covid_cxr.serve.limits import PixelBudget

    budget, peak, lock = PixelBudget(100), [0], threading.Lock()

    def work(n):
        with budget.hold(n):
            with lock:
                peak[0] = max(peak[0], budget.in_use)
            time.sleep(0.01)

    threads = [threading.Thread(target=work, args=(n,)) for n in (60, 60, 30, 200, 10) * 3]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert peak[0] <= 100 and budget.in_use == 0


# ---------------------------------------------------------------------------------- 11. decode details

def test_exif_orientation_is_applied():
    img = Image.new("L", (128, 64), 0)
    img.paste(255, (0, 0, 64, 64))  # left half white
    exif = img.getexif()
    exif[0x0112] = 6  # the viewer turns it 90 degrees clockwise: the white half on top
    buf = io.BytesIO()
    img.save(buf, "JPEG", exif=exif.tobytes(), quality=95)
    px = load_for_model(buf.getvalue(), 64, 64)
    assert px[:24].mean() > 0.9 and px[40:].mean() < 0.1


def test_dicom_without_preamble_and_reduced_16_bit_dicom():
    arr = (np.indices((600, 600)).sum(0) * 3).astype(np.uint16)  # 12-bit values
    full = _dicom_bytes(arr)
    bare = full[132:]  # no 128-byte preamble, no 'DICM'
    assert bare[:2] == b"\x02\x00"
    np.testing.assert_array_equal(load_for_model(bare, 64, 64), load_for_model(full, 64, 64))
    dec = decode_gray(full, target=(64, 64))
    assert dec.format == "DICOM" and dec.width == 600 and dec.pixels.shape[0] < 600


def test_special_files_are_refused_not_read(tmp_path):
    from covid_cxr.data.manifest import scan_file

    fifo = tmp_path / "x.png"
    os.mkfifo(fifo)
    with pytest.raises(DecodeError, match="FIFO"):
        load_for_model(fifo, 64, 64)  # before the fix: blocked forever
    rec = scan_file(fifo, "x.png", "Normal")
    assert rec.status == "skipped" and "FIFO" in rec.reason


# ---------------------------------------------------------------------------------- 8. staging leftovers

def test_stale_staging_folders_are_cleaned(tmp_path):
    from covid_cxr.bundle.store import clean_stale, new_staging_dir

    model_dir = tmp_path / "m"
    old, fresh = model_dir / ".tmp-old", model_dir / ".tmp-fresh"
    for d in (old, fresh):
        d.mkdir(parents=True)
        (d / "model.onnx").write_bytes(b"x" * 10)
    hour_ago = time.time() - 7200
    for p in (old / "model.onnx", old):
        os.utime(p, (hour_ago, hour_ago))
    (model_dir / ".tmp-link").symlink_to(old)
    staging = new_staging_dir(model_dir)  # a writer cleans first
    assert not old.exists() and fresh.exists() and staging.exists()
    assert clean_stale(model_dir) == []  # a live writer's folder is kept


def test_server_scan_cleans_stale_staging(bundle_copy):
    stale = bundle_copy.parent / ".tmp-killed"
    stale.mkdir()
    os.utime(stale, (time.time() - 7200,) * 2)
    with running_server(ServeSettings(models=bundle_copy.parents[1], rescan_seconds=0.2)):
        deadline = time.monotonic() + 10
        while stale.exists():
            assert time.monotonic() < deadline
            time.sleep(0.1)


# ---------------------------------------------------------------------------------- 9, 10. pipeline files

class MeanFeatures:
    """A stand-in backbone: the image's row means are its features."""

    def eval(self):
        return self

    def to(self, **kw):
        return self

    def features(self, x):
        return x.mean(dim=(1, 3))


def feature_items(tmp_path: Path, n: int = 4) -> list[tuple[Path, str]]:
    items = []
    for i in range(n):
        p = tmp_path / f"{i}.png"
        p.write_bytes(png(np.full((16, 16), 40 * i, np.uint8)))
        items.append((p, f"sha{i}"))
    return items


def test_feature_cache_keys_live_in_the_file_and_a_mismatch_rebuilds(tmp_path):
    import torch
    from safetensors.torch import save_file

    from covid_cxr.train.features import FeatureCache, extract

    items = feature_items(tmp_path)
    cache = FeatureCache(tmp_path / "c.safetensors")
    feats = extract(MeanFeatures(), items, 16, cache, progress=False)
    again = FeatureCache(tmp_path / "c.safetensors")
    assert set(again.rows) == {s for _, s in items}
    torch.testing.assert_close(torch.stack([again.rows[s] for _, s in items]), feats)
    # the old layout (a separate key list that can go out of step with the rows) is not trusted
    save_file({"features": feats[:3]}, str(tmp_path / "old.safetensors"))
    (tmp_path / "old.keys.json").write_text(json.dumps([s for _, s in items]))
    assert FeatureCache(tmp_path / "old.safetensors").rows == {}
    save_file({"features": feats[:3]}, str(tmp_path / "short.safetensors"),
              metadata={"keys": json.dumps([s for _, s in items])})
    assert FeatureCache(tmp_path / "short.safetensors").rows == {}


def test_feature_cache_rows_that_do_not_match_their_images_are_caught(tmp_path):
    import torch

    from covid_cxr.train.features import FeatureCache, extract, spot_check

    items = feature_items(tmp_path)
    cache = FeatureCache(tmp_path / "c.safetensors")
    extract(MeanFeatures(), items, 16, cache, progress=False)
    reread = FeatureCache(tmp_path / "c.safetensors")
    assert spot_check(MeanFeatures(), reread, items, 16, "fp32")
    keys = list(reread.rows)
    reread.rows = dict(zip(keys, torch.stack([reread.rows[k] for k in reversed(keys)])))
    assert not spot_check(MeanFeatures(), reread, items, 16, "fp32")


def test_truncated_cache_and_checkpoint_are_user_errors(tmp_path):
    import torch

    from covid_cxr.errors import UserError
    from covid_cxr.train.features import FeatureCache, extract
    from covid_cxr.train.fit import check_checkpoint

    extract(MeanFeatures(), feature_items(tmp_path), 16, FeatureCache(tmp_path / "c.safetensors"), progress=False)
    data = (tmp_path / "c.safetensors").read_bytes()
    (tmp_path / "c.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(UserError, match="delete it"):
        FeatureCache(tmp_path / "c.safetensors")
    ckpt = tmp_path / "last.ckpt"
    torch.save({"state_dict": {"w": torch.zeros(1000)}}, ckpt)
    check_checkpoint(ckpt)
    ckpt.write_bytes(ckpt.read_bytes()[:2000])
    with pytest.raises(UserError, match="--resume"):
        check_checkpoint(ckpt)
    assert zipfile.is_zipfile(ckpt) is False

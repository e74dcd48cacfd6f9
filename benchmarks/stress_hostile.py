"""Issue 17's hostile inputs for benchmarks/stress_serve.py: builders for each payload and the
scenario that sends them while good traffic (TF Serving, v2 infer, DICOM uploads) must keep
answering. Imported by stress_serve.py; not a script of its own."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import secrets
import shutil
import time
import zlib
from pathlib import Path

import numpy as np
from PIL import Image

from bench_serve import memory

MIB = 2**20


# ---------------------------------------------------------------------------------- payloads

def dicom_from_png(png: bytes) -> bytes:
    """The X-ray as a 16-bit MONOCHROME2 Part-10 DICOM file (explicit VR little endian)."""
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    arr = np.asarray(Image.open(io.BytesIO(png)).convert("L"), np.uint16) * 16
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = "1.2.840.10008.5.1.4.1.1.1", generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset("x.dcm", {}, file_meta=meta, preamble=b"\0" * 128)
    ds.Modality, ds.PhotometricInterpretation = "CR", "MONOCHROME2"
    ds.Rows, ds.Columns = arr.shape
    ds.SamplesPerPixel, ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 1, 16, 12, 11, 0
    ds.PixelData = arr.tobytes()
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def deflate_bomb(zeros: int = 2**30) -> bytes:
    """A Part-10 file with the deflated transfer syntax whose data set holds one OB element of
    `zeros` zero bytes (1 GiB: about 1 MB on the wire), streamed through zlib (never in memory)."""
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.filereader import _read_file_meta_info, read_preamble
    from pydicom.uid import DeflatedExplicitVRLittleEndian, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = "1.2.840.10008.5.1.4.1.1.1", generate_uid()
    meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    ds = FileDataset("x.dcm", {}, file_meta=meta, preamble=b"\0" * 128)
    ds.Modality = "CR"
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    data = buf.getvalue()
    fp = io.BytesIO(data)
    read_preamble(fp, False)
    _read_file_meta_info(fp)
    head = data[:fp.tell()]
    dataset = zlib.decompress(data[fp.tell():], -zlib.MAX_WBITS)
    z = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    start = z.compress(dataset + b"\x09\x00\x10\x10OB\0\0" + zeros.to_bytes(4, "little"))
    start += z.flush(zlib.Z_FULL_FLUSH)
    chunk = bytes(16 * MIB)
    block = z.compress(chunk) + z.flush(zlib.Z_FULL_FLUSH)  # a full flush resets the window: the
    return head + start + block * (zeros // len(chunk)) + z.flush()  # same bytes for every chunk


def scan_bomb(side: int = 4472, repeats: int = 10_000) -> bytes:
    """A progressive JPEG of side x side whose last (small) scan is repeated `repeats` times:
    libjpeg decodes the whole frame once per scan."""
    arr = np.zeros((side, side), np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "JPEG", progressive=True, quality=50)
    data = buf.getvalue()
    last = data[data.rfind(b"\xff\xda"):-2]
    return data[:-2] + last * repeats + b"\xff\xd9"


def deep_metadata() -> str:
    return "[" * 100_000 + "]" * 100_000


# ---------------------------------------------------------------------------------- requests

def tfs(port: int, model: str, files: list[bytes]) -> bytes:
    from stress_serve import http
    return http(port, "POST", f"/v1/models/{model}:predict",
                json.dumps({"instances": [{"b64": base64.b64encode(f).decode()} for f in files]}).encode())


def v2_bytes(port: int, model: str, f: bytes) -> bytes:
    """KServe v2 infer with a BYTES input and no `outputs` (what tritonclient sends)."""
    from stress_serve import http
    body = {"inputs": [{"name": "image", "datatype": "BYTES", "shape": [1], "data": [base64.b64encode(f).decode()]}]}
    return http(port, "POST", f"/v2/models/{model}/infer", json.dumps(body).encode())


def upload(port: int, model: str, f: bytes, name: str, gradcam: bool = False) -> bytes:
    from stress_serve import http
    b = secrets.token_hex(8)
    body = (f"--{b}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"{name}\"\r\n"
            "Content-Type: application/octet-stream\r\n\r\n").encode() + f + f"\r\n--{b}--\r\n".encode()
    q = "&gradcam=true" if gradcam else ""
    return http(port, "POST", f"/api/v1/predict?model={model}{q}", body, f"multipart/form-data; boundary={b}")


async def exchange(port: int, raw: bytes, timeout: float = 120.0) -> tuple[int, float]:
    """One request on its own connection: (status, seconds); status 0 if the connection broke."""
    from stress_serve import read_response
    t0 = time.perf_counter()
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            writer.write(raw)
            status, _, _ = await asyncio.wait_for(read_response(reader), timeout)
        finally:
            writer.close()
    except (asyncio.IncompleteReadError, ConnectionError, asyncio.TimeoutError):
        status = 0
    return status, time.perf_counter() - t0


# ---------------------------------------------------------------------------------- scenario

async def _stall_one(port: int, stop: asyncio.Event, t0: float) -> float | None:
    """A client trickling a partial header, one byte every 0.5 s: seconds until the server closed it."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"POST /v1/models/m:predict HTTP/1.1\r\nHost: x\r\n")
    closed = asyncio.ensure_future(reader.read(1))
    try:
        while not stop.is_set():
            done, _ = await asyncio.wait({closed}, timeout=0.5)
            if done:
                return time.monotonic() - t0
            try:
                writer.write(b"X")
                await writer.drain()
            except ConnectionError:
                return time.monotonic() - t0
        return None
    finally:
        closed.cancel()
        writer.close()


async def _repeat(port: int, raw: bytes, stop: asyncio.Event, out: list) -> None:
    """Send `raw` again and again (one connection each) until stopped: a bomb always in flight."""
    while not stop.is_set():
        out.append(await exchange(port, raw))


async def _good(port: int, raws: list[tuple[str, bytes]], total: int, concurrency: int, out: list) -> None:
    todo = iter(range(total))

    async def worker(k: int):
        for n in todo:
            kind, raw = raws[(n + k) % len(raws)]
            status, seconds = await exchange(port, raw, 60.0)
            out.append((kind, status, seconds))
    await asyncio.gather(*(worker(k) for k in range(concurrency)))


async def hostile_mix(port: int, pid: int, repo: Path, model: str, png: bytes, total: int, concurrency: int,
                      stallers: int = 64) -> dict:
    """Good TF/v2/DICOM traffic while two scan bombs and three deflate bombs are always in flight,
    `stallers` clients trickle headers, and a model folder with a 100,000-bracket metadata.json appears."""
    good = [("tfs", tfs(port, model, [png])), ("v2", v2_bytes(port, model, png)),
            ("dicom", upload(port, model, dicom_from_png(png), "x.dcm"))]
    scan, deflate = tfs(port, model, [scan_bomb()]), upload(port, model, deflate_bomb(), "bomb.dcm")
    stop, bombs, results, calm = asyncio.Event(), {"scan": [], "deflate": []}, [], []
    await _good(port, good, total, concurrency, calm)  # the same traffic alone first: the baseline
    Path(f"/proc/{pid}/clear_refs").write_text("5")  # reset VmHWM
    t0 = time.monotonic()
    background = [asyncio.ensure_future(_repeat(port, scan, stop, bombs["scan"])) for _ in range(2)]
    background += [asyncio.ensure_future(_repeat(port, deflate, stop, bombs["deflate"])) for _ in range(3)]
    stalls = [asyncio.ensure_future(_stall_one(port, stop, t0)) for _ in range(stallers)]
    await asyncio.sleep(1.0)
    shutil.copytree(repo / model, repo / "evil")
    for meta in (repo / "evil").glob("*/metadata.json"):
        meta.write_text(deep_metadata())
    await _good(port, good, total, concurrency, results)
    stop.set()
    await asyncio.gather(*background)
    closed = [t for t in await asyncio.gather(*stalls) if t is not None]
    lat = np.array([s for _, st, s in results if st == 200]) if results else np.zeros(1)
    base = np.array([s for _, st, s in calm if st == 200]) if calm else np.zeros(1)
    return {"calm_p50_ms": 1000 * float(np.percentile(base, 50)), "calm_p99_ms": 1000 * float(np.percentile(base, 99)),
            "calm_failed": sum(st != 200 for _, st, _ in calm), "good": len(results), "good_failed": sum(st != 200 for _, st, _ in results),
            "by_kind": {k: sum(1 for kk, st, _ in results if kk == k and st == 200) for k, _ in good},
            "p50_ms": 1000 * float(np.percentile(lat, 50)), "p99_ms": 1000 * float(np.percentile(lat, 99)),
            "bombs": {k: sorted({st for st, _ in v}) for k, v in bombs.items()},
            "bomb_max_s": {k: max((s for _, s in v), default=0.0) for k, v in bombs.items()},
            "bomb_count": {k: len(v) for k, v in bombs.items()},
            "server_errors": sum(st >= 500 for _, st, _ in results) + sum(st >= 500 for v in bombs.values() for st, _ in v),
            "stallers": stallers, "stallers_closed": len(closed), "stall_closed_max_s": max(closed, default=0.0),
            "peak": memory(pid)["VmHWM"], "seconds": time.monotonic() - t0}


async def metrics_flood(port: int, names: int = 10_000, concurrency: int = 16) -> dict:
    """`names` GETs of /v1/models/<random name> (keep-alive), then /metrics' size and scrape time."""
    from stress_serve import http, read_response
    todo, statuses = iter(range(names)), {}

    async def worker():
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        for _ in todo:
            writer.write(http(port, "GET", f"/v1/models/{secrets.token_hex(32)}"))
            status, _, _ = await read_response(reader)
            statuses[status] = statuses.get(status, 0) + 1
        writer.close()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    t0 = time.perf_counter()
    writer.write(http(port, "GET", "/metrics"))
    _, _, body = await read_response(reader)
    writer.close()
    return {"names": names, "statuses": statuses, "metrics_bytes": len(body),
            "scrape_ms": 1000 * (time.perf_counter() - t0)}


async def gradcam_settle(port: int, pid: int, model: str, png: bytes, settle_s: float = 5.0) -> dict:
    status, seconds = await exchange(port, upload(port, model, png, "x.png", gradcam=True), 300.0)
    await asyncio.sleep(settle_s)
    return {"status": status, "seconds": seconds, "settled": memory(pid)["VmRSS"]}


def report_hostile(mix: dict, flood: dict, cam: dict, ready: dict, settled: int) -> dict[str, bool]:
    print(f"\n4. hostile mix: {mix['good']} good requests (TF predict PNG, v2 infer BYTES, DICOM upload) at "
          f"{mix['seconds']:.0f} s; 2 scan bombs + 3 deflate bombs always in flight "
          f"({mix['bomb_count']['scan']} + {mix['bomb_count']['deflate']} sent), {mix['stallers']} header stallers, "
          "a model folder with a 100,000-bracket metadata.json added after 1 s")
    print(f"   the same {mix['good']} good requests alone first: p50 {mix['calm_p50_ms']:.0f} ms, "
          f"p99 {mix['calm_p99_ms']:.0f} ms, failed {mix['calm_failed']}")
    print(f"   good failed: {mix['good_failed']} (200s by door: {mix['by_kind']}); 5xx: {mix['server_errors']}; "
          f"good p50 {mix['p50_ms']:.0f} ms, p99 {mix['p99_ms']:.0f} ms")
    print(f"   scan bombs: statuses {mix['bombs']['scan']}, slowest {mix['bomb_max_s']['scan'] * 1000:.0f} ms; "
          f"deflate bombs: statuses {mix['bombs']['deflate']}, slowest {mix['bomb_max_s']['deflate'] * 1000:.0f} ms")
    print(f"   header stallers closed by the server: {mix['stallers_closed']}/{mix['stallers']} "
          f"(last after {mix['stall_closed_max_s']:.1f} s); peak RSS {mix['peak'] / MIB:.0f} MiB; "
          f"settled {settled / MIB:.0f} MiB")
    print(f"   /readyz afterwards: models {ready.get('models')}, unavailable {list(ready.get('unavailable', {}))}")
    print(f"5. /metrics after {flood['names']} random model names: {flood['metrics_bytes'] / 1024:.0f} kB, "
          f"scrape {flood['scrape_ms']:.0f} ms (statuses {flood['statuses']})")
    print(f"6. one Grad-CAM upload: status {cam['status']}, {cam['seconds']:.1f} s; settled RSS 5 s later "
          f"{cam['settled'] / MIB:.0f} MiB")
    return {"hostile mix: 0 good failed": mix["good_failed"] + mix["calm_failed"] == 0,
            "hostile mix: 0 5xx": mix["server_errors"] == 0,
            "good p99 < 1 s with 2 scan + 3 deflate bombs in flight": mix["p99_ms"] < 1000,
            "header stallers all closed": mix["stallers_closed"] == mix["stallers"],
            "bad model folder: only that model unavailable": "evil" in ready.get("unavailable", {}) and bool(ready.get("models")),
            "peak RSS < 1 GiB (hostile mix)": mix["peak"] < 2**30,
            "settled RSS < 600 MiB (hostile mix)": settled < 600 * MIB,
            "/metrics < 1 MiB after 10,000 names": flood["metrics_bytes"] < MIB,
            "settled RSS < 600 MiB after Grad-CAM": cam["settled"] < 600 * MIB}

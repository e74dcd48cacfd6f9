"""Stress test of `covid-cxr serve` as a hostile or unlucky client would drive it (issue 7).

Starts the real server (`python -m covid_cxr serve`, uvicorn) on loopback and runs three scenarios:

1. mixed load: good predicts interleaved with bad requests (deep JSON, non-ASCII and huge versions,
   odd names, bad base64, wrong shapes, out-of-range values, garbage, two-file and empty uploads,
   oversized bodies...) over keep-alive connections at concurrency 32; a good request fails if it
   gets anything but 200 or its connection breaks. Any 5xx counts against the server.
2. slow clients: 64 connections send predict headers promising 1,000 bytes, send one, and stall;
   meanwhile good predicts must answer within a second, and the stalled ones must get 408 and be
   dropped once the body timeout passes.
3. large images: 16 concurrent 7,000 x 7,000 PNGs (refused: over the pixel cap), then 16 concurrent
   4,300 x 4,300 PNGs (the largest real radiographs: decoded), then one request holding 16 of them,
   then, on a second server allowing 50 MP (the old cap), the 7,000 x 7,000 ones decoded; peak RSS
   (VmHWM, reset before each part) and RSS once the server has settled.
4. hostile mix (issue 17): good TF predicts, v2 infer (BYTES, no `outputs`) and DICOM uploads while
   two progressive-JPEG scan bombs and three 1 GiB DICOM deflate bombs are always in flight, 64
   clients trickle partial headers, and a model folder whose metadata.json holds 100,000 nested
   brackets appears in the repository; p50/p99 of the good requests, peak and settled RSS.
5. /metrics size and scrape time after 10,000 GETs of random model names.
6. one Grad-CAM upload, then the settled RSS.

    python benchmarks/stress_serve.py [--models MODELS] [--requests 2000] [--concurrency 32] [--parts 1,2,3,4]
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import json
import shutil
import sys
import tempfile
import time
import urllib.request
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from bench_serve import DATA, Server, default_models, memory, model_name

TARGET_PEAK = 1.5 * 2**30
TARGET_SETTLED = 600 * 2**20
BODY_TIMEOUT_S = 5.0
HEADER_TIMEOUT_S = 2.0


# ---------------------------------------------------------------------------------- HTTP client

def http(port: int, method: str, path: str, body: bytes = b"", ctype: str = "application/json",
         extra: str = "") -> bytes:
    head = (f"{method} {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: {ctype}\r\n"
            f"Content-Length: {len(body)}\r\n{extra}\r\n")
    return head.encode() + body


def multipart(port: int, model: str, files: list[bytes]) -> bytes:
    b = uuid.uuid4().hex
    body = b"".join(f"--{b}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"x.png\"\r\n"
                    f"Content-Type: image/png\r\n\r\n".encode() + f + b"\r\n" for f in files) + f"--{b}--\r\n".encode()
    return http(port, "POST", f"/api/v1/predict?model={model}", body, f"multipart/form-data; boundary={b}")


async def read_response(reader: asyncio.StreamReader, head_request: bool = False) -> tuple[int, dict[str, str], bytes]:
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, _, v in (ln.partition(":") for ln in lines[1:] if ln)}
    length = 0 if head_request else int(headers.get("content-length", "0"))  # HEAD: headers only
    body = await reader.readexactly(length)
    return int(lines[0].split()[1]), headers, body


# ---------------------------------------------------------------------------------- 1. mixed load

def request_mix(port: int, model: str, png: bytes) -> list[tuple[str, bytes]]:
    """(kind, raw request): 'good' ones must answer 200; the rest are what hostile clients send."""
    good = http(port, "POST", f"/v1/models/{model}:predict",
                json.dumps({"instances": [{"b64": base64.b64encode(png).decode()}]}).encode())
    bad = [
        http(port, "POST", f"/v1/models/{model}:predict", b'{"instances": ' + b"[" * 5000 + b"]" * 5000 + b"}"),
        http(port, "POST", f"/v1/models/{model}/versions/%C2%B2:predict", b'{"instances": [[0]]}'),
        http(port, "POST", f"/v1/models/{model}/versions/%E2%91%A0:predict", b'{"instances": [[0]]}'),
        http(port, "GET", f"/v1/models/{model}/versions/{'9' * 5000}"),
        http(port, "GET", "/v1/models/%C2%B2/metadata"),
        http(port, "POST", f"/v1/models/{model}:predict", b'{"instances": [{"b64": "@@@"}]}'),
        http(port, "POST", f"/v1/models/{model}:predict", b'{"instances": [[[0.5, 0.5]]]}'),
        http(port, "POST", f"/v1/models/{model}:predict", b'{"instances": [[[255, 255], [0, 0]]]}'),
        http(port, "POST", f"/v1/models/{model}:predict", b"\xff\xfe garbage"),
        http(port, "POST", f"/v1/models/{model}:predict", json.dumps(
            {"instances": [{"b64": base64.b64encode(png[: len(png) // 2]).decode()}]}).encode()),
        http(port, "POST", "/v1/models/nope:predict", b'{"instances": [[0]]}'),
        http(port, "POST", "/v1/models/..%2Fetc:predict", b'{"instances": [[0]]}'),
        multipart(port, model, [png, png]),
        multipart(port, model, [b""]),
        http(port, "POST", f"/v1/models/{model}:predict", b"x" * (21 * 2**20)),  # 413, connection closed
        http(port, "DELETE", f"/v1/models/{model}"),
        http(port, "HEAD", "/"),
    ]
    mix = []
    for i in range(len(bad)):
        mix += [("good", good), ("bad", bad[i])]
    return mix


@dataclass
class Tally:
    good: int = 0
    good_failed: int = 0
    bad: int = 0
    server_errors: int = 0
    statuses: dict[int, int] = field(default_factory=dict)
    examples: list[str] = field(default_factory=list)


async def mixed_load(port: int, mix: list[tuple[str, bytes]], total: int, concurrency: int) -> Tally:
    tally = Tally()
    counter = iter(range(total))

    async def worker(offset: int):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            for n in counter:
                kind, raw = mix[(n + offset) % len(mix)]
                setattr(tally, kind, getattr(tally, kind) + 1)
                try:
                    writer.write(raw)
                    status, headers, body = await read_response(reader, raw.startswith(b"HEAD "))
                except (asyncio.IncompleteReadError, ConnectionError) as exc:  # status 0: connection lost
                    status, headers, body = 0, {"connection": "close"}, repr(exc).encode()
                tally.statuses[status] = tally.statuses.get(status, 0) + 1
                tally.server_errors += status >= 500
                if kind == "good" and status != 200:
                    tally.good_failed += 1
                    tally.examples.append(f"{status}: {body[:160]!r}")
                if headers.get("connection", "").lower() == "close":  # as HTTP says: open another
                    writer.close()
                    reader, writer = await asyncio.open_connection("127.0.0.1", port)
        finally:
            writer.close()

    await asyncio.gather(*(worker(i) for i in range(concurrency)))
    return tally


# ---------------------------------------------------------------------------------- 2. slow clients

async def slow_clients(port: int, model: str, good: bytes, stalled: int = 64, probes: int = 5) -> dict:
    conns = []
    for _ in range(stalled):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(f"POST /v1/models/{model}:predict HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     "Content-Length: 1000\r\n\r\n{".encode())
        await writer.drain()
        conns.append((reader, writer))
    await asyncio.sleep(0.5)
    latencies, statuses = [], []
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    for _ in range(probes):
        t0 = time.perf_counter()
        writer.write(good)
        status, _, _ = await read_response(reader)
        latencies.append(time.perf_counter() - t0)
        statuses.append(status)
    writer.close()
    dropped = 0
    for r, w in conns:  # within the body timeout, each must be answered 408 and closed
        try:
            status, headers, _ = await asyncio.wait_for(read_response(r), BODY_TIMEOUT_S + 5)
            closed = await asyncio.wait_for(r.read(1), 5) == b""
            dropped += status == 408 and closed and headers.get("connection") == "close"
        except (asyncio.TimeoutError, asyncio.IncompleteReadError, ConnectionError):
            pass
        w.close()
    return {"statuses": statuses, "max_s": max(latencies), "dropped": dropped, "stalled": stalled}


# ---------------------------------------------------------------------------------- 3. large images

def big_png(side: int) -> bytes:
    """A compressible side x side grayscale PNG (a few hundred kB at most): cheap to send, costly to decode."""
    import numpy as np
    from PIL import Image

    arr = np.zeros((side, side), np.uint8)
    arr[::8] = 200
    arr[:, ::16] = 90
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "PNG", optimize=False, compress_level=9)
    return buf.getvalue()


def reset_peak(pid: int) -> None:
    """Reset VmHWM (Linux: writing 5 to clear_refs), so each part reports its own peak."""
    Path(f"/proc/{pid}/clear_refs").write_text("5")


async def concurrent(port: int, raw: bytes, n: int) -> list[int]:
    async def one():
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(raw)
        status, _, _ = await read_response(reader)
        writer.close()
        return status
    return await asyncio.gather(*(one() for _ in range(n)))


def large_images(server: Server, model: str, parts=((7000, 1), (4300, 1), (4300, 16)), note: str = "") -> list[dict]:
    out = []
    for side, per_request in parts:
        png = base64.b64encode(big_png(side)).decode()
        raw = http(server.port, "POST", f"/v1/models/{model}:predict",
                   json.dumps({"instances": [{"b64": png}] * per_request}).encode())
        n = 16 if per_request == 1 else 1
        reset_peak(server.proc.pid)
        t0 = time.perf_counter()
        statuses = asyncio.run(concurrent(server.port, raw, n))
        seconds = time.perf_counter() - t0
        peak = memory(server.proc.pid)["VmHWM"]
        time.sleep(3)
        out.append({"what": f"{n} x {per_request} instance(s) of {side}x{side} PNG ({len(png) * 3 // 4 // 1024} kB){note}",
                    "statuses": sorted(set(statuses)), "seconds": seconds, "peak": peak,
                    "settled": memory(server.proc.pid)["VmRSS"]})
    return out


# ---------------------------------------------------------------------------------- main

def report(tally: Tally, total: int, concurrency: int, slow: dict, large: list[dict]) -> bool:
    mib = 2**20
    print(f"\n1. mixed load: {total} requests at concurrency {concurrency} ({tally.good} good, {tally.bad} bad)")
    print(f"   statuses: {dict(sorted(tally.statuses.items()))} (0: connection closed before an answer)")
    print(f"   good requests failed: {tally.good_failed}; 5xx responses: {tally.server_errors}")
    for e in tally.examples[:5]:
        print(f"     {e}")
    print(f"\n2. slow clients: {slow['stalled']} stalled; good predicts meanwhile: statuses {slow['statuses']}, "
          f"slowest {1000 * slow['max_s']:.0f} ms; stalled ones answered 408 and dropped: "
          f"{slow['dropped']}/{slow['stalled']}")
    print("\n3. large images (peak = VmHWM during the part; settled = VmRSS 3 s later):")
    for r in large:
        print(f"   {r['what']}: statuses {r['statuses']}, {r['seconds']:.1f} s, peak {r['peak'] / mib:.0f} MiB, "
              f"settled {r['settled'] / mib:.0f} MiB")
    peak, settled = max(r["peak"] for r in large), max(r["settled"] for r in large)
    checks = {"0 good requests failed": tally.good_failed == 0, "0 5xx": tally.server_errors == 0,
              "good predict < 1 s with 64 stalled": slow["max_s"] < 1.0 and set(slow["statuses"]) == {200},
              "stalled clients get 408 and are dropped": slow["dropped"] == slow["stalled"],
              f"peak RSS < {TARGET_PEAK / mib:.0f} MiB": peak < TARGET_PEAK,
              f"settled RSS < {TARGET_SETTLED / mib:.0f} MiB": settled < TARGET_SETTLED}
    print()
    for name, ok in checks.items():
        print(f"target {name}: {'met' if ok else 'NOT met'}")
    return all(checks.values())


def hostile(models: Path, model: str, png: bytes, requests: int) -> dict[str, bool]:
    """Parts 4-6 on a copy of the model's folder (part 4 adds a broken model folder to it)."""
    from stress_hostile import gradcam_settle, hostile_mix, metrics_flood, report_hostile

    with tempfile.TemporaryDirectory(prefix="stress-hostile-") as tmp:
        repo = Path(tmp) / "models"
        shutil.copytree(models / model, repo / model)
        server = Server(repo, True, ["--header-timeout-s", str(HEADER_TIMEOUT_S), "--body-timeout-s",
                                     str(BODY_TIMEOUT_S), "--rescan-seconds", "1"])
        try:
            pid = server.proc.pid
            mix = asyncio.run(hostile_mix(server.port, pid, repo, model, png, requests, 8))
            time.sleep(3)
            settled = memory(pid)["VmRSS"]
            with urllib.request.urlopen(f"http://127.0.0.1:{server.port}/readyz", timeout=10) as r:
                ready = json.loads(r.read())
            flood = asyncio.run(metrics_flood(server.port))
            cam = asyncio.run(gradcam_settle(server.port, pid, model, png))
        finally:
            server.stop()
    return report_hostile(mix, flood, cam, ready, settled)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", type=Path, help="model repository (default: train a small one on the real data)")
    p.add_argument("--data", type=Path, default=DATA, help="real X-rays (class folders of PNGs)")
    p.add_argument("--requests", type=int, default=2000)
    p.add_argument("--concurrency", type=int, default=32)
    p.add_argument("--hostile-requests", type=int, default=600, help="good requests in part 4")
    p.add_argument("--model", help="the served model the good requests go to (default: the first)")
    p.add_argument("--parts", default="1,2,3,4", help="which parts to run: 1-3 (issue 7), 4 (issue 17: 4-6)")
    args = p.parse_args(argv)
    parts = {int(x) for x in args.parts.split(",")}
    ok = True
    with tempfile.TemporaryDirectory(prefix="stress-serve-") as tmp:
        models = args.models or default_models(args.data, Path(tmp))
        model = args.model or model_name(models)
        png = sorted((args.data / "COVID").glob("*.png"))[0].read_bytes()
        if parts & {1, 2, 3}:
            ok = first_round(models, model, png, args)
        if 4 in parts:
            checks = hostile(models, model, png, args.hostile_requests)
            print()
            for name, met in checks.items():
                print(f"target {name}: {'met' if met else 'NOT met'}")
            ok = ok and all(checks.values())
    return 0 if ok else 1


def first_round(models: Path, model: str, png: bytes, args) -> bool:
    """Parts 1-3 (issue 7)."""
    server = Server(models, True, ["--body-timeout-s", str(BODY_TIMEOUT_S)])
    try:
        print(f"server pid {server.proc.pid}, model {model}; RSS at start "
              f"{memory(server.proc.pid)['VmRSS'] / 2**20:.0f} MiB", flush=True)
        tally = asyncio.run(mixed_load(server.port, request_mix(server.port, model, png), args.requests,
                                       args.concurrency))
        good = request_mix(server.port, model, png)[0][1]
        slow = asyncio.run(slow_clients(server.port, model, good))
        large = large_images(server, model)
    finally:
        server.stop()
    # The same 7,000 x 7,000 PNGs decoded, not refused: the old 50 MP cap, to show what reduced
    # decoding and the decode budget do on their own.
    server = Server(models, True, ["--max-image-pixels", "50000000"])
    try:
        large += large_images(server, model, ((7000, 1),), " with --max-image-pixels 50000000")
    finally:
        server.stop()
    return report(tally, args.requests, args.concurrency, slow, large)


if __name__ == "__main__":
    sys.exit(main())

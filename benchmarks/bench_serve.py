"""Load benchmark of `covid-cxr serve`: latency and throughput, micro-batching on vs off.

Starts the real server (`python -m covid_cxr serve`, uvicorn) on loopback twice, once with
micro-batching and once without, and sends the same bounded load to each: one real 256x256 PNG
X-ray per request (multipart upload to /api/v1/predict, or with --path tfs a TF Serving predict
with one {"b64": ...} instance). Reports p50/p99 latency at concurrency 1, images/second at
concurrency 1, 8 and 32, failed requests (must be zero), and the server's resident memory
(VmRSS now, VmHWM peak, from /proc/PID/status) with one model loaded.

The load generator is a minimal asyncio HTTP/1.1 client on keep-alive connections that sends
pre-built request bytes (like wrk): on a 2-core machine the client shares the CPU with the
server, so a heavier client (requests, httpx) would measure itself as much as the server.

    python benchmarks/bench_serve.py [--models MODELS] [--path upload|tfs] [--requests 400]
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("COVID_CXR_DATA", REPO.parent / "shared" / "data" / "covid19-radiography"))
TARGET_P50_MS = 40.0
TARGET_RATIO = 1.5
TARGET_RSS = 1024 ** 3


# ---------------------------------------------------------------------------------- model

def default_models(data_dir: Path, workdir: Path) -> Path:
    """No --models: train a small efficientnet_lite0 bundle on the real data (40 images per class)."""
    from covid_cxr.train.fit import TrainConfig, train

    out = workdir / "models"
    cfg = TrainConfig(arch="efficientnet_lite0", weights="imagenet", epochs=15, batch_size=32,
                      balance="undersample", max_per_class=40, seed=0, image_size=224, progress=False)
    print(f"training a benchmark model (efficientnet_lite0, 40 images per class) into {out} ...", flush=True)
    train(data_dir, out, cfg, workdir=workdir / "work")
    return out


def model_name(models: Path) -> str:
    from covid_cxr.bundle import valid_name, versions

    names = sorted(p.name for p in models.iterdir() if p.is_dir() and valid_name(p.name) and versions(p))
    if not names:
        sys.exit(f"no model bundle under {models}")
    return names[0]


# ---------------------------------------------------------------------------------- requests

def upload_request(port: int, png: bytes, model: str) -> bytes:
    boundary = uuid.uuid4().hex
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"xray.png\"\r\n"
            f"Content-Type: image/png\r\n\r\n").encode() + png + f"\r\n--{boundary}--\r\n".encode()
    head = (f"POST /api/v1/predict?model={model} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
            f"Content-Type: multipart/form-data; boundary={boundary}\r\nContent-Length: {len(body)}\r\n\r\n")
    return head.encode() + body


def tfs_request(port: int, png: bytes, model: str) -> bytes:
    body = json.dumps({"signature_name": "serving_default",
                       "instances": [{"b64": base64.b64encode(png).decode()}]}).encode()
    head = (f"POST /v1/models/{model}:predict HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n")
    return head.encode() + body


async def _read_response(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    length = next(int(v) for k, _, v in (ln.partition(":") for ln in lines[1:]) if k.lower() == "content-length")
    return status, await reader.readexactly(length)


@dataclass
class Load:
    concurrency: int
    requests: int
    seconds: float = 0.0
    latencies: list[float] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    mean_batch: float = 1.0  # images per ONNX Runtime call during this load (from /metrics)
    onnx_ms: float = float("nan")  # ONNX Runtime wall time per image (calls may overlap when unbatched)
    cpu_ms: float = float("nan")  # server CPU time per request: efficiency, whatever else runs on the machine

    @property
    def throughput(self) -> float:
        return len(self.latencies) / self.seconds if self.seconds else 0.0

    def pct(self, q: float) -> float:
        xs = sorted(self.latencies)
        return 1000.0 * xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))] if xs else float("nan")


async def run_load(port: int, request: bytes, concurrency: int, total: int, expect: bytes) -> Load:
    """`total` requests over `concurrency` keep-alive connections, each sending the next when answered."""
    load = Load(concurrency, total)
    remaining = [total]

    async def worker():
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            while remaining[0] > 0:
                remaining[0] -= 1
                t0 = time.perf_counter()
                writer.write(request)
                try:
                    status, body = await _read_response(reader)
                except (asyncio.IncompleteReadError, ConnectionError) as exc:
                    load.failures.append(f"connection: {exc!r}")
                    writer.close()
                    reader, writer = await asyncio.open_connection("127.0.0.1", port)
                    continue
                if status != 200 or expect not in body:
                    load.failures.append(f"{status}: {body[:200]!r}")
                else:
                    load.latencies.append(time.perf_counter() - t0)
        finally:
            writer.close()

    t0 = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    load.seconds = time.perf_counter() - t0
    return load


# ---------------------------------------------------------------------------------- server

def cpu_seconds(pid: int) -> float:
    """User + system CPU time the server process has used (all its threads)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def memory(pid: int) -> dict[str, int]:
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            out[key] = int(value.split()[0]) * 1024
    return out


class Server:
    def __init__(self, models: Path, batching: bool, extra: list[str]):
        from covid_cxr.serve.testing import free_port

        self.port = free_port()
        cmd = [sys.executable, "-m", "covid_cxr", "serve", "--models", str(models), "--port", str(self.port),
               "--log-level", "warning", *([] if batching else ["--no-batching"]), *extra]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 120
        while True:
            if self.proc.poll() is not None:
                sys.exit(f"server exited: {self.proc.stderr.read().decode()[-2000:]}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/readyz", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                self.stop()
                sys.exit("server did not become ready in 120 s")
            time.sleep(0.2)

    def metrics(self) -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/metrics", timeout=10) as r:
            return r.read().decode()

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def bench_server(models: Path, model: str, png: bytes, batching: bool, args) -> dict:
    extra = ["--max-batch", str(args.max_batch), "--max-wait-ms", str(args.max_wait_ms), *args.server_args.split()]
    server = Server(models, batching, extra)
    try:
        make = upload_request if args.path == "upload" else tfs_request
        request = make(server.port, png, model)
        expect = b'"label"' if args.path == "upload" else b'"predictions"'
        asyncio.run(run_load(server.port, request, 4, args.warmup, expect))  # warm-up: arenas, caches
        results = {}
        for c in args.concurrency:
            n = args.latency_requests if c == 1 else args.requests
            before, cpu0 = server.metrics(), cpu_seconds(server.proc.pid)
            results[c] = asyncio.run(run_load(server.port, request, c, n, expect))
            results[c].cpu_ms = 1000 * (cpu_seconds(server.proc.pid) - cpu0) / n
            results[c].mean_batch, results[c].onnx_ms = onnx_stats(before, server.metrics())
        mem = memory(server.proc.pid)
    finally:
        server.stop()
    return {"loads": results, "memory": mem}


def merge(runs: list[dict]) -> dict:
    """Several rounds of one server setting: latencies pooled, throughput the median round's."""
    loads = {}
    for c in runs[0]["loads"]:
        parts = [r["loads"][c] for r in runs]
        ld = Load(c, sum(p.requests for p in parts))
        ld.latencies = [x for p in parts for x in p.latencies]
        ld.failures = [f for p in parts for f in p.failures]
        ld.seconds = len(ld.latencies) / statistics.median(p.throughput for p in parts)
        ld.mean_batch = statistics.median(p.mean_batch for p in parts)
        ld.onnx_ms = statistics.median(p.onnx_ms for p in parts)
        ld.cpu_ms = statistics.median(p.cpu_ms for p in parts)
        loads[c] = ld
    peak = max(runs, key=lambda r: r["memory"]["VmHWM"])
    return {"loads": loads, "memory": peak["memory"]}


def onnx_stats(before: str, after: str) -> tuple[float, float]:
    """(images per ONNX Runtime call, ONNX Runtime ms per image) between two /metrics snapshots."""
    def sums(text):
        out = {"covid_cxr_batch_size_sum": 0.0, "covid_cxr_batch_size_count": 0.0,
               "covid_cxr_inference_seconds_sum": 0.0}
        for line in text.splitlines():
            key = line.split("{", 1)[0]
            if key in out:
                out[key] += float(line.rsplit(" ", 1)[1])
        return out

    a, b = sums(before), sums(after)
    images = b["covid_cxr_batch_size_sum"] - a["covid_cxr_batch_size_sum"]
    calls = b["covid_cxr_batch_size_count"] - a["covid_cxr_batch_size_count"]
    seconds = b["covid_cxr_inference_seconds_sum"] - a["covid_cxr_inference_seconds_sum"]
    return (images / calls if calls else float("nan"), 1000 * seconds / images if images else float("nan"))


def onnx_cpu_by_batch(models: Path, model: str, sizes=(1, 2, 4, 8, 16, 32), images: int = 64) -> dict[int, float]:
    """ONNX Runtime alone, one thread: CPU ms per image at each batch size (what batching can save
    in the model itself; CPU time, so other work on the machine does not skew it)."""
    import numpy as np

    from covid_cxr.bundle import load_bundle, open_session

    bundle = load_bundle(models / model)
    h, w = bundle.input_hw
    sess = open_session(bundle.onnx_path, threads=1)
    x = np.random.default_rng(0).random((max(sizes), h, w, 1), dtype=np.float32)
    out = {}
    for n in sizes:
        sess.run(None, {"image": x[:n]})  # warm-up: memory plan for this shape
        calls = max(1, images // n)
        t0 = time.process_time()
        for _ in range(calls):
            sess.run(None, {"image": x[:n]})
        out[n] = 1000 * (time.process_time() - t0) / (calls * n)
    return out


# ---------------------------------------------------------------------------------- main

def load_options(p: argparse.ArgumentParser, concurrency: list[int], requests: int, latency_requests: int,
                 warmup: int) -> None:
    """The load and server options bench_server reads (this benchmark's and bench_serve_models')."""
    p.add_argument("--concurrency", type=lambda s: [int(x) for x in s.split(",")], default=concurrency)
    p.add_argument("--requests", type=int, default=requests, help="requests per concurrency level > 1")
    p.add_argument("--latency-requests", type=int, default=latency_requests, help="requests at concurrency 1")
    p.add_argument("--warmup", type=int, default=warmup)
    p.add_argument("--max-batch", type=int, default=4)
    p.add_argument("--max-wait-ms", type=float, default=5.0)
    p.add_argument("--rounds", type=int, default=2, help="server runs per setting (medians reported)")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", type=Path, help="model repository (default: train a small one on the real data)")
    p.add_argument("--data", type=Path, default=DATA, help="real X-rays (class folders of PNGs)")
    p.add_argument("--image", type=Path, help="the PNG to send (default: the first COVID X-ray)")
    p.add_argument("--path", choices=["upload", "tfs"], default="upload",
                   help="upload: multipart /api/v1/predict; tfs: TF Serving :predict with a b64 instance")
    load_options(p, concurrency=[1, 8, 32], requests=480, latency_requests=300, warmup=40)
    p.add_argument("--order", choices=["on,off", "off,on"], default="on,off", help="which server runs first")
    p.add_argument("--no-ort-table", dest="ort_table", action="store_false",
                   help="skip timing ONNX Runtime alone at each batch size")
    p.add_argument("--server-args", default="", help="more `covid-cxr serve` options for both runs")
    args = p.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="bench-serve-") as tmp:
        models = args.models or default_models(args.data, Path(tmp))
        model = model_name(models)
        image = args.image or sorted((args.data / "COVID").glob("*.png"))[0]
        png = image.read_bytes()
        from PIL import Image

        size = Image.open(image).size
        print(f"model {model} from {models}; image {image.name} {size[0]}x{size[1]} PNG ({len(png)} bytes); "
              f"path {args.path}; {os.cpu_count()} CPUs; load average before {os.getloadavg()[0]:.2f}", flush=True)
        ort_table = onnx_cpu_by_batch(models, model) if args.ort_table else {}
        rounds: dict[bool, list[dict]] = {True: [], False: []}
        first = args.order == "on,off"
        for r in range(args.rounds):  # alternate which server goes first: the machine's load drifts
            order = [first, not first] if r % 2 == 0 else [not first, first]
            for batching in order:
                rounds[batching].append(bench_server(models, model, png, batching, args))
                print(f"  round {r + 1}: batching {'on ' if batching else 'off'} done; "
                      f"load average {os.getloadavg()[0]:.2f}", flush=True)
        runs = {b: merge(rs) for b, rs in rounds.items()}

    on, off = runs[True]["loads"], runs[False]["loads"]
    print()
    print(f"{args.rounds} round(s) per setting; img/s and ms/img: median round; latency percentiles: all rounds")
    print(f"{'concurrency':>11} | {'batching':>8} | {'requests':>8} | {'img/s':>7} | {'p50 ms':>7} | {'p99 ms':>7} | "
          f"{'mean batch':>10} | {'ORT ms/img':>10} | {'CPU ms/img':>10} | failed")
    print("-" * 112)
    for c in args.concurrency:
        for label, loads in (("on", on), ("off", off)):
            ld = loads[c]
            print(f"{c:>11} | {label:>8} | {ld.requests:>8} | {ld.throughput:7.1f} | {ld.pct(0.5):7.1f} | "
                  f"{ld.pct(0.99):7.1f} | {ld.mean_batch:10.2f} | {ld.onnx_ms:10.2f} | {ld.cpu_ms:10.2f} | "
                  f"{len(ld.failures)}")
    print()
    for label, run in (("on", runs[True]), ("off", runs[False])):
        m = run["memory"]
        print(f"server memory, batching {label:>3}: VmRSS {m['VmRSS'] / 2**20:.0f} MiB, "
              f"VmHWM (peak) {m['VmHWM'] / 2**20:.0f} MiB")

    if ort_table:
        print()
        print("ONNX Runtime alone (1 thread), CPU ms per image by batch size: " +
              ", ".join(f"{n}: {ms:.2f}" for n, ms in ort_table.items()))

    failures = sum(len(ld.failures) for loads in (on, off) for ld in loads.values())
    top = max(args.concurrency)
    ratio = on[top].throughput / off[top].throughput if off[top].throughput else float("nan")
    peak = max(r["memory"]["VmHWM"] for r in runs.values())
    print()
    print(f"throughput ratio batched/unbatched at concurrency {top}: {ratio:.2f}x")
    print(f"target p50 < {TARGET_P50_MS:.0f} ms at concurrency 1: batching on {on[1].pct(0.5):.1f} ms, "
          f"off {off[1].pct(0.5):.1f} ms -> {'met' if on[1].pct(0.5) < TARGET_P50_MS else 'NOT met'}")
    print(f"target batching >= {TARGET_RATIO}x unbatched at concurrency {top}: {ratio:.2f}x -> "
          f"{'met' if ratio >= TARGET_RATIO else 'NOT met'}")
    print(f"target server RSS < 1 GiB: peak {peak / 2**20:.0f} MiB -> {'met' if peak < TARGET_RSS else 'NOT met'}")
    print(f"failed requests: {failures}")
    for loads in (on, off):
        for ld in loads.values():
            for f in ld.failures[:3]:
                print("  failure:", f)
    assert failures == 0, f"{failures} requests failed"
    return 0


if __name__ == "__main__":
    sys.exit(main())

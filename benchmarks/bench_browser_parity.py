"""The web page's in-browser mode against the server, per image kind, in real chromium.

For each picture: the largest |p_browser - p_server| over the classes, whether the gate agrees, and
the time each side takes (the browser's from choosing the file to the answer, the model already
loaded; the server's from the upload API's latency_ms). Picture kinds: real X-rays (PNG, as the
dataset ships them), uniform noise, a large tinted RGB PNG (decode.py's box reduce), and the kinds
outside the 1e-4 promise, measured to say how far off they are: JPEG (grayscale, colour, and a large
colour JPEG, 2691 px, that the server decodes at 1/4 scale in libjpeg's DCT, `Image.draft`, where the
browser decodes it whole and box-reduces; a colour JPEG's luma is its Y plane on both sides, through
WebCodecs in the browser) and PNG with transparency (the browser composites it before the box
reduce, PIL after).

Needs Debian's chromium and `make web-runtime`.
Usage: python benchmarks/bench_browser_parity.py --models MODELS --data DIR [--per-class 3]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import requests
from PIL import Image

from covid_cxr.serve.settings import ServeSettings
from covid_cxr.serve.testing import running_server

CHROMIUM = "/usr/bin/chromium"
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run"]


def pictures(data: Path, per_class: int, out: Path) -> list[tuple[str, Path]]:
    xrays = [p for d in sorted(x for x in data.iterdir() if x.is_dir()) for p in sorted(d.glob("*.png"))[:per_class]]
    rng = np.random.default_rng(0)
    first = Image.open(xrays[0])
    def tinted(img: Image.Image) -> Image.Image:  # a colour picture: R, G and B differ everywhere
        rgb = np.asarray(img.convert("RGB"), np.int16) + np.array([12, -5, 3], np.int16)
        return Image.fromarray(np.clip(rgb, 0, 255).astype(np.uint8))

    made = {
        "noise.png": Image.fromarray(rng.integers(0, 256, (299, 299, 3), dtype=np.uint8)),
        "large-rgb.png": tinted(first.resize((1401, 1503))),
        "gray.jpg": first.convert("L"),
        "colour.jpg": tinted(first),
        "large-colour.jpg": tinted(first.resize((2691, 2691))),
        "alpha.png": first.convert("RGBA"),
    }
    w, h = first.size
    made["alpha.png"].putalpha(Image.fromarray(np.linspace(60, 255, w * h).reshape(h, w).astype(np.uint8)))
    for name, img in made.items():
        img.save(out / name, quality=90) if name.endswith(".jpg") else img.save(out / name)
    return [("X-ray PNG", p) for p in xrays] + [(n.split(".")[0] if "jpg" not in n else "JPEG " + n, out / n)
                                                for n in made]


def browser_answer(page, file: Path) -> tuple[dict, float]:
    page.evaluate("delete document.getElementById('result').dataset.answer")
    t0 = time.perf_counter()
    page.locator("#file").set_input_files(str(file))
    page.wait_for_function("document.getElementById('result').dataset.answer", timeout=120_000)
    ms = (time.perf_counter() - t0) * 1000
    return json.loads(page.locator("#result").get_attribute("data-answer")), ms


def run(models: Path, data: Path, per_class: int) -> list[dict]:
    from playwright.sync_api import sync_playwright

    rows = []
    with tempfile.TemporaryDirectory() as tmp, running_server(ServeSettings(models=models)) as base, \
            sync_playwright() as pw:
        files = pictures(data, per_class, Path(tmp))
        chromium = pw.chromium.launch(executable_path=CHROMIUM, args=ARGS, headless=True)
        page = chromium.new_page()
        page.goto(base + "/")
        page.locator("#mode-device").check()
        warm = Path(tmp) / "warm-up.png"  # not files[0]: choosing the same file again fires no change event
        warm.write_bytes(files[0][1].read_bytes())
        browser_answer(page, warm)  # loads the runtime and the model once
        for kind, f in files:
            s = requests.post(base + "/api/v1/predict", files={"file": (f.name, f.read_bytes())}, timeout=120).json()
            d, ms = browser_answer(page, f)
            rows.append({"kind": kind, "image": f.name, "ms_browser": ms, "ms_server": s["latency_ms"],
                         "diff": max(abs(s["probabilities"][c] - d["probabilities"][c]) for c in s["probabilities"]),
                         "gate_agrees": s.get("in_distribution") == d.get("in_distribution")})
        chromium.close()
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", type=Path, required=True)
    ap.add_argument("--data", type=Path, required=True)
    ap.add_argument("--per-class", type=int, default=3)
    args = ap.parse_args()
    rows = run(args.models, args.data, args.per_class)
    print(f"{'kind':<16} {'image':<26} {'max |dp|':>10} {'gate':>6} {'browser ms':>11} {'server ms':>10}")
    for r in rows:
        print(f"{r['kind']:<16} {r['image'][:26]:<26} {r['diff']:>10.2e} {'same' if r['gate_agrees'] else 'DIFF':>6} "
              f"{r['ms_browser']:>11.0f} {r['ms_server']:>10.0f}")


if __name__ == "__main__":
    main()

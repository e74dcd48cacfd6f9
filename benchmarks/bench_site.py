"""Issue 16's tables: how often `site check` cries wolf on the development database, how often it
catches a different site, what a check of 500 images costs, and what the serving monitor adds per
request.

- false alarms: random batches of the bundle's own test split (n = 10 / 20 / 50), target <= 2 %;
- power, real proxies: the lung-mask collection's sources (quex adults, crdvp children, v7 adult
  COVID-19), films that are also in the development database left out; target >= 95 % at n = 20;
- power, synthetic acquisition shifts of test-split films at graded severities (gamma, contrast,
  blur, noise, JPEG quality, down-sampling, border crops, burnt-in text);
- timings: `site check` on 500 images (end to end: decode, ONNX, tests, report), target < 60 s;
  `ShiftMonitor.append` per request, target < 0.2 ms.

Every pool is measured once (the model's answers and image statistics per image); batches are then
drawn from it, so thousands of batches cost seconds.

Usage: python benchmarks/bench_site.py --model MODELS/efficientnet_lite0 [--batches 500] [--report DIR]
"""

from __future__ import annotations

import argparse
import csv
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from covid_cxr.bundle import load_bundle
from covid_cxr.site.check import check_site, measure, write_outputs
from covid_cxr.site.monitor import ShiftMonitor
from covid_cxr.site.reference import Sample, build_reference
from covid_cxr.site.shift import SHIFT, compare

REPO = Path(__file__).resolve().parents[1]
MASKS = REPO.parent / "shared" / "data" / "lung-masks"
SIZES = (10, 20, 50)


def shifted(img: Image.Image, kind: str, level: float) -> tuple[Image.Image, str]:
    """One synthetic acquisition shift of an 8-bit grayscale film: (image, file format)."""
    x = np.asarray(img, np.float32) / 255
    if kind == "gamma":
        x = x ** level
    elif kind == "contrast":
        x = x.mean() + level * (x - x.mean())
    elif kind == "noise":
        x = x + np.random.default_rng(int(x.sum() * 1000) % 2**32).normal(0, level, x.shape)
    elif kind == "blur":
        return img.filter(ImageFilter.GaussianBlur(level)), "PNG"
    elif kind == "jpeg":
        return img, f"JPEG{int(level)}"
    elif kind == "downsample":
        return img.resize((img.width // int(level), img.height // int(level)), Image.Resampling.BILINEAR), "PNG"
    elif kind == "crop":
        d = int(level * min(img.size))
        return img.crop((d, d, img.width - d, img.height - d)).resize(img.size, Image.Resampling.BILINEAR), "PNG"
    elif kind == "text":
        out = img.copy()
        draw = ImageDraw.Draw(out)
        draw.text((8, 8), "R  PORTABLE  AP", fill=255, font_size=int(level))
        draw.text((8, img.height - int(level) - 8), "05-12-2026 14:31", fill=255, font_size=int(level))
        return out, "PNG"
    return Image.fromarray((np.clip(x, 0, 1) * 255).round().astype(np.uint8)), "PNG"


SHIFTS = {"gamma": (1.3, 1.7, 2.5), "contrast": (0.85, 0.7, 0.5), "blur": (1, 2, 4), "noise": (0.02, 0.05, 0.1),
          "jpeg": (50, 30, 10), "downsample": (2, 4, 8), "crop": (0.05, 0.1, 0.2), "text": (12, 20, 32)}


def write_shifted(paths: list[Path], kind: str, level: float, folder: Path) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for i, p in enumerate(paths):
        img, fmt = shifted(Image.open(p).convert("L"), kind, level)
        dest = folder / f"{i}.{'jpg' if fmt.startswith('JPEG') else 'png'}"
        if fmt.startswith("JPEG"):
            img.save(dest, format="JPEG", quality=int(fmt[4:]))
        else:
            img.save(dest, format="PNG")
        out.append(dest)
    return out


def draw(pool: Sample, n: int, rng) -> Sample:
    idx = rng.choice(pool.n, n, replace=False)
    bits = next(iter(pool.bit_depth))  # every pool here has one bit depth (asserted in `pools`)
    return Sample(pool.probs[idx], None if pool.ood_score is None else pool.ood_score[idx],
                  {k: v[idx] for k, v in pool.images.items()}, None, {bits: n})


def flagged(ref, pool: Sample, classes, n: int, batches: int, seed: int = 0) -> tuple[float, dict]:
    """Share of `batches` random n-image batches of `pool` called SHIFT, and how often each signal moved."""
    rng = np.random.default_rng(seed)
    hits, moved = 0, {}
    for _ in range(batches):
        r = compare(ref, draw(pool, n, rng), classes)
        hits += r.verdict == SHIFT
        for s in r.moved:
            moved[s.name] = moved.get(s.name, 0) + 1
    return hits / batches, {k: v / batches for k, v in sorted(moved.items(), key=lambda kv: -kv[1])}


def proxy_paths(per_source: int, seed: int = 0) -> dict[str, list[Path]]:
    """The lung-mask collection by source, without films that are also in the development database."""
    rows = list(csv.DictReader(open(MASKS / "manifest.csv", encoding="utf-8")))
    rng = np.random.default_rng(seed)
    out = {}
    for src in ("quex", "crdvp", "v7"):
        ids = [r["id"] for r in rows if r["source"] == src and r["in_cls_data"] != "1"]
        pick = rng.choice(len(ids), min(per_source, len(ids)), replace=False)
        out[src] = [MASKS / "images" / f"{ids[i]}.png" for i in sorted(pick)]
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", type=Path, required=True)
    ap.add_argument("--batches", type=int, default=500)
    ap.add_argument("--per-source", type=int, default=200)
    ap.add_argument("--per-shift", type=int, default=100)
    ap.add_argument("--report", type=Path, default=None, help="write one site check's report here")
    ap.add_argument("--selective-only", action="store_true", help="only the test split's risk-coverage figures")
    ap.add_argument("--timings-only", action="store_true", help="only the timings (needs a bundle with a reference)")
    args = ap.parse_args()
    from covid_cxr.publish.ensemble import shared_split

    b = load_bundle(args.model)
    t0 = time.perf_counter()
    prepared = shared_split([b])
    split = {s: [prepared.manifest.root / r.path for r in prepared.splits[s]] for s in ("val", "test")}
    if args.selective_only:
        return selective_table(b, prepared, split["test"])
    if args.timings_only:
        return timings(b, split, args.report)
    ref = b.metadata.site_reference
    if ref is None:  # a bundle written before the reference: the same numbers, through ONNX
        ref = build_reference(measure(b, split["val"])[0], b.classes)
    test = measure(b, split["test"])[0]
    print(f"# bundle {b.name} v{b.version}; reference {ref.computed_on} n={ref.n}; test split n={test.n}; "
          f"setup {time.perf_counter() - t0:.0f} s\n")
    false_alarms(ref, test, b.classes, args.batches)
    real_power(b, ref, args)
    synthetic_power(b, ref, split["test"], args)
    timings(b, split, args.report)


def selective_table(b, prepared, paths) -> None:
    """Risk-coverage figures of the bundle on its own test split (what `evaluate` reports)."""
    from covid_cxr.evaluate.selective import selective_metrics
    from covid_cxr.site.images import read_images

    y = np.array([b.classes.index(r.label) for r in prepared.splits["test"]])
    h, w = b.input_hw
    outs = [b.predict_with_ood(read_images(paths[i:i + 64], h, w)[1]) for i in range(0, len(paths), 64)]
    probs = np.concatenate([o[0] for o in outs])
    inside = np.concatenate([o[2] for o in outs]) if outs[0][2] is not None else None
    s = selective_metrics(y, probs, inside)
    print(f"## Selective prediction on the test split (n = {len(y)})\n")
    print(f"- AURC {s['aurc']:.4f}; accuracy at full coverage {s['full_coverage_accuracy']:.3f}")
    for c, e in s["at_coverage"].items():
        print(f"- coverage {float(c):.0%}: accuracy {e['accuracy']:.3f} ({e['images']} images, confidence >= "
              f"{e['min_confidence']:.3f})")
    if s.get("gate"):
        g = s["gate"]
        print(f"- OOD gate accepts {g['accepted_share']:.1%}: accuracy among accepted {g['accuracy_accepted']:.3f}, "
              f"among rejected {g['accuracy_rejected']}")


def false_alarms(ref, test, classes, batches: int) -> None:
    print("## False alarms: random batches of the test split (target <= 2 %)\n")
    print("| n | flagged | signals that moved (share of batches) |\n|---|---|---|")
    for n in SIZES:
        rate, moved = flagged(ref, test, classes, n, batches)
        print(f"| {n} | {rate:.1%} | {', '.join(f'{k} {v:.1%}' for k, v in moved.items()) or '-'} |")
    print()


def real_power(b, ref, args) -> None:
    print(f"## Power: real proxy sites ({args.per_source} films each; target >= 95 % at n = 20)\n")
    print("| site | images | " + " | ".join(f"n = {n}" for n in SIZES) + " | signals at n = 20 |")
    print("|---|---|" + "---|" * len(SIZES) + "---|")
    for src, paths in proxy_paths(args.per_source).items():
        pool = measure(b, paths)[0]
        assert len(pool.bit_depth) == 1, pool.bit_depth
        rates = [flagged(ref, pool, b.classes, n, args.batches) for n in SIZES]
        top = ", ".join(f"{k} {v:.0%}" for k, v in list(rates[1][1].items())[:4])
        print(f"| {src} | {pool.n} | " + " | ".join(f"{r:.1%}" for r, _ in rates) + f" | {top} |")
    print()


def synthetic_power(b, ref, test_paths, args) -> None:
    print(f"## Power: synthetic shifts of test-split films ({args.per_shift} films per cell; share of "
          f"{args.batches} batches flagged, n = 10 / 20 / 50)\n")
    print("| shift | mild | moderate | strong |\n|---|---|---|---|")
    rng = np.random.default_rng(1)
    base = [test_paths[i] for i in sorted(rng.choice(len(test_paths), args.per_shift, replace=False))]
    with tempfile.TemporaryDirectory() as tmp:
        for kind, levels in SHIFTS.items():
            cells = []
            for level in levels:
                pool = measure(b, write_shifted(base, kind, level, Path(tmp) / f"{kind}-{level}"))[0]
                rates = [flagged(ref, pool, b.classes, n, args.batches)[0] for n in SIZES]
                cells.append(f"{level}: " + " / ".join(f"{r:.0%}" for r in rates))
            print(f"| {kind} | " + " | ".join(cells) + " |")
    print()


def timings(b, split, report: Path | None) -> None:
    print("## Timings\n")
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "site500"
        folder.mkdir()
        for i, p in enumerate((split["test"] + split["val"])[:500]):
            (folder / f"{i}{p.suffix}").symlink_to(p)
        t0 = time.perf_counter()
        check = check_site(b, folder)
        write_outputs(check, Path(tmp) / "out", Path(tmp) / "r.json")
        print(f"- site check on {check.result.n} images: {time.perf_counter() - t0:.1f} s "
              f"(verdict {check.result.verdict}; target < 60 s)")
    m = ShiftMonitor(b.metadata.site_reference or None, b.classes, 200)
    row = np.array([[0.9, 0.05, 0.05, 0.8, 1.0]])
    k = 200_000
    t0 = time.perf_counter()
    for _ in range(k):
        m.append(row)
    per = (time.perf_counter() - t0) / k
    t0 = time.perf_counter()
    m.append(row)
    m.snapshot()
    print(f"- monitor append per request: {per * 1e6:.2f} µs (target < 200 µs); one snapshot (tests of "
          f"the 200-answer window, off the request path): {(time.perf_counter() - t0) * 1e3:.1f} ms")
    if report is not None:
        v7 = proxy_paths(50)["v7"]
        with tempfile.TemporaryDirectory() as tmp:
            folder = Path(tmp) / "v7-site"
            folder.mkdir()
            for p in v7[:40]:
                (folder / p.name).symlink_to(p)
            check = check_site(b, folder)
            write_outputs(check, report, report / "site_check.json")
        print(f"- one site check (40 v7 films) written to {report}")


if __name__ == "__main__":
    main()

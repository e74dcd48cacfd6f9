"""Out-of-distribution gate on the real data: rejection rate per offline test set, one column per
bundle's gate (as its model.onnx answers), beside the energy score (the alternative), and ECE
before/after temperature.

Test sets, all built from what is offline: natural photos (scikit-learn's two sample photos and
matplotlib's sample photos, cropped and flipped), noise (uniform, Gaussian, salt-and-pepper,
blurred), blank images and gradients, non-chest images (matplotlib's MRI slice and terrain maps),
and test-split X-rays rotated 90°, inverted, or cropped to a corner. In distribution: the test split.
Targets (issue 8): photos, noise, blank and non-chest rejected >= 99 %; test split accepted >= 93 %.

`--refit DIR` first writes the first bundle again with the current trust layer (same weights, same
split: its training config) to DIR/<name>, and measures it beside the original: the before/after
table of docs/results/trust.md. `--dev` measures the dev sets instead, on which the gate's
stages and combination were chosen (never on the test sets above): noise with another seed, blank
levels, gradient angles and contrasts not in the test set, and the *validation* split's X-rays
rotated, inverted and cropped (there is no second offline source of photos or non-chest images).

Usage: python benchmarks/bench_ood.py --model MODELS/<name> [--model ...] --data DIR --workdir MODELS/.work
       [--refit DIR] [--dev] [--threads N] [--out ood.json]
"""

from __future__ import annotations

import argparse
import gzip
import json
from pathlib import Path

import numpy as np
from covid_cxr.bundle.schema import BundleContent
from covid_cxr.models.loading import load_torch
from PIL import Image, ImageFilter

SIZE = 224  # main() sets it to the bundles' input size


def _gray(img: Image.Image) -> np.ndarray:
    return np.asarray(img.convert("L").resize((SIZE, SIZE), Image.Resampling.BILINEAR), np.float32) / 255.0


def _crops(img: Image.Image, n: int, rng) -> list[np.ndarray]:
    """The whole picture, then random crops (30-90 % of the side) and mirror images."""
    out = [_gray(img)]
    w, h = img.size
    while len(out) < n:
        s = rng.uniform(0.3, 0.9)
        cw, ch = int(w * s), int(h * s)
        x0, y0 = rng.integers(0, w - cw + 1), rng.integers(0, h - ch + 1)
        c = img.crop((x0, y0, x0 + cw, y0 + ch))
        out.append(_gray(c.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if rng.random() < 0.5 else c))
    return out


def natural_photos(rng) -> np.ndarray:
    import matplotlib
    from sklearn.datasets import load_sample_images

    photos = [Image.fromarray(a) for a in load_sample_images().images]
    sample = Path(matplotlib.get_data_path()) / "sample_data"
    photos += [Image.open(sample / "grace_hopper.jpg"), Image.open(sample / "Minduka_Present_Blue_Pack.png").convert("RGB")]
    return np.stack([x for p in photos for x in _crops(p, 25, rng)])


def noise(rng) -> np.ndarray:
    out = []
    for k in range(60):
        kind = k % 4
        if kind == 0:
            x = rng.random((SIZE, SIZE))
        elif kind == 1:
            x = rng.normal(rng.uniform(0.2, 0.8), rng.uniform(0.05, 0.3), (SIZE, SIZE))
        elif kind == 2:
            x = (rng.random((SIZE, SIZE)) < rng.uniform(0.05, 0.5)).astype(float)
        else:
            img = Image.fromarray((rng.random((SIZE, SIZE)) * 255).astype(np.uint8))
            x = np.asarray(img.filter(ImageFilter.GaussianBlur(rng.uniform(2, 12))), float) / 255.0
            x = (x - x.min()) / max(x.max() - x.min(), 1e-6)
        out.append(np.clip(x, 0, 1))
    return np.stack(out).astype(np.float32)


def blank_and_gradients(rng, dev: bool = False) -> np.ndarray:
    """Flat images and linear and radial gradients; `dev`: other levels, angles and contrasts."""
    yy, xx = np.mgrid[0:SIZE, 0:SIZE] / (SIZE - 1)
    out = [np.full((SIZE, SIZE), v) for v in (np.linspace(0.05, 0.95, 10) if dev else np.linspace(0, 1, 11))]
    for a in np.linspace(0, np.pi, 12, endpoint=False) + (np.pi / 24 if dev else 0):
        g = np.cos(a) * xx + np.sin(a) * yy
        g = (g - g.min()) / (g.max() - g.min())
        c = rng.uniform(0.3, 1, 2) if dev else (1.0, 1.0)
        out += [g * c[0], 1 - g * c[1]]
    for _ in range(5):
        cy, cx = rng.uniform(0.2, 0.8, 2)
        r = np.sqrt((yy - cy) ** 2 + (xx - cx) ** 2)
        out += [r / r.max(), 1 - r / r.max()]
    return np.stack(out).astype(np.float32)


def non_chest(rng) -> np.ndarray:
    """matplotlib's MRI slice (s1045.ima: 256 x 256, 16-bit), its terrain and bathymetry maps."""
    import matplotlib

    sample = Path(matplotlib.get_data_path()) / "sample_data"
    mri = np.frombuffer(gzip.open(sample / "s1045.ima.gz").read(), np.uint16).reshape(256, 256).astype(float)
    dem = np.load(sample / "jacksboro_fault_dem.npz")["elevation"].astype(float)
    topo = np.load(sample / "topobathy.npz")["topo"].astype(float)
    out = []
    for arr in (mri, dem, topo):
        img = Image.fromarray(((arr - arr.min()) / (arr.max() - arr.min()) * 255).astype(np.uint8))
        out += _crops(img, 20, rng)
    return np.stack(out)


def xray_variants(images: np.ndarray, prefix: str = "X-rays") -> dict[str, np.ndarray]:
    corners = []
    for k, x in enumerate(images):
        q = SIZE // 2
        c = [x[:q, :q], x[:q, q:], x[q:, :q], x[q:, q:]][k % 4]
        corners.append(np.asarray(Image.fromarray(c).resize((SIZE, SIZE), Image.Resampling.BILINEAR)))
    return {f"{prefix} rotated 90°": np.rot90(images, 1, axes=(1, 2)).copy(),
            f"{prefix} inverted": 1.0 - images, f"{prefix}, one corner (a quarter)": np.stack(corners)}


def split_images(prepared, split: str) -> np.ndarray:
    from covid_cxr.data.decode import load_batch

    return load_batch([prepared.manifest.root / r.path for r in prepared.splits[split]], SIZE, SIZE)


def test_sets(prepared) -> dict[str, np.ndarray]:
    """The test split and the OOD test sets (seed 0: the sets issue 8's figures were measured on)."""
    rng = np.random.default_rng(0)
    test_x = split_images(prepared, "test")
    return {"test split (in distribution)": test_x, "natural photos": natural_photos(rng), "noise": noise(rng),
            "blank and gradients": blank_and_gradients(rng), "non-chest (MRI slice, terrain maps)": non_chest(rng),
            **xray_variants(test_x)}


def dev_sets(prepared) -> dict[str, np.ndarray]:
    """Where the gate's stages were chosen: seed 1, other blank levels and angles, the val split's X-rays."""
    rng = np.random.default_rng(1)
    val_x = split_images(prepared, "val")
    return {"val split (in distribution)": val_x, "noise": noise(rng), "blank and gradients": blank_and_gradients(rng, dev=True),
            **xray_variants(val_x, "val X-rays")}


def training_split(bundle, data: Path, workdir: Path):
    """The bundle's split (its training config) and every split's pooled features from the training
    run's feature cache (no backbone pass)."""
    from covid_cxr.data import prepare
    from covid_cxr.features.cache import cached_features

    cfg = bundle.metadata.training.config.model_copy(update={"progress": False})
    prepared = prepare(data, cfg.classes, cfg.balance, cfg.max_per_class, cfg.seed, progress=False)
    model = load_torch(bundle)
    feats = cached_features(model, prepared, cfg, bundle.metadata.architecture.weights, workdir / "feature-cache")
    return cfg, prepared, model, {s: (f.numpy(), y.numpy()) for s, (f, y) in feats.items()}


def refit(bundle, model, cfg, prepared, feats, out: Path, threads: int):
    """The bundle written again to out/<name> with the current trust layer: same weights, same split."""
    from covid_cxr.publish.writer import write_bundle
    from covid_cxr.trust.fit import fit_trust
    from covid_cxr.trust.stages import stage_features

    stages = stage_features(model, prepared, cfg, out / ".work" / "feature-cache", threads)
    trust = fit_trust(model, feats, stages)
    meta = bundle.metadata.model_dump(mode="json", include=set(BundleContent.model_fields) - {"lung_crop"})
    meta["trust"] = trust.info
    meta["test_metrics"]["ood_rate"] = 1 - trust.info["ood"]["test_accept_rate"]
    meta = BundleContent.model_validate(meta)
    parity = split_images(prepared, "test")[:8]
    return write_bundle(out, bundle.metadata.name, model.eval(), meta, parity, trust=trust)


def gate_rates(bundle, sets: dict[str, np.ndarray], workdir: Path, threads: int) -> dict[str, dict]:
    """Each set's share rejected by the bundle's model.onnx, and how often the numpy scorer (on
    StageStats from their own ONNX Runtime graph; an ensemble's: each member's) gives the same verdict."""
    from covid_cxr.bundle.reader import open_checked_session, run_classifier
    from covid_cxr.trust.ood import EnsembleOOD, gate_from_arrays
    from covid_cxr.trust.stages import stage_runner

    session = open_checked_session(bundle, threads)
    gate = gate_from_arrays(bundle.trust_arrays())
    model = load_torch(bundle)
    parts = list(zip(model.members, gate.members)) if isinstance(gate, EnsembleOOD) else [(model, gate)]
    tag = f"{bundle.metadata.name}-{bundle.metadata.version}"
    runners = [stage_runner(m, g.indices, bundle.input_hw[0], workdir / f"stages-{tag}-{k}-{len(g.indices)}.onnx", threads)
               for k, (m, g) in enumerate(parts)]
    out = {}
    for name, x in sets.items():
        batches = [x[i:i + 32] for i in range(0, len(x), 32)]
        score, inside = (np.concatenate(v) for v in zip(*(run_classifier(bundle, session, b[..., None])[1:] for b in batches)))
        feats = [np.concatenate([run(np.ascontiguousarray(b[:, None])) for b in batches]) for run in runners]
        numpy_accepts = gate.accepts(feats) if isinstance(gate, EnsembleOOD) else gate.accepts(feats[0])
        ratio = score / gate.threshold  # the margin: how far past the threshold (1) the set lies
        out[name] = {"n": len(x), "rejected": float(1 - inside.mean()), "score_over_threshold_min_median":
                     [float(ratio.min()), float(np.median(ratio))],
                     "numpy_agreement": float((numpy_accepts == inside).mean()),
                     "pooled": feats[0][:, :parts[0][1].stages[0].stop]}
    return out


def label(bundle) -> str:
    m = bundle.metadata
    return f"{m.name} v{m.version} ({m.trust.ood.method})"


def main() -> None:
    from covid_cxr.bundle import load_bundle
    from covid_cxr.trust.fit import head_logits
    from covid_cxr.trust.ood import energy

    global SIZE
    args = _args()
    bundles = [load_bundle(m) for m in args.model]
    SIZE = bundles[0].input_hw[0]  # every set is made at the models' input size (224 unless trained otherwise)
    cfg, prepared, model, feats = training_split(bundles[0], args.data, args.workdir)
    if args.refit:
        bundles.append(refit(bundles[0], model, cfg, prepared, feats, args.refit, args.threads))
    sets = dev_sets(prepared) if args.dev else test_sets(prepared)
    scratch = (args.refit or args.workdir) / ".bench-ood"
    scratch.mkdir(parents=True, exist_ok=True)
    cols = {label(b): gate_rates(b, sets, scratch, args.threads) for b in bundles}
    e_threshold = float(np.quantile(energy(head_logits(model, feats["val"][0])), 0.95))  # accepts 95 % of val
    first = next(iter(cols.values()))
    rows = {name: {"n": len(x), **{c: {k: v for k, v in r[name].items() if k != "pooled"} for c, r in cols.items()},
                   "energy_rejected": float((energy(head_logits(model, first[name]["pooled"])) > e_threshold).mean())}
            for name, x in sets.items()}
    print(f"| set | n | {' | '.join(f'rejected: {c}' for c in cols)} | rejected: energy score |")
    print("|---|---|" + "---|" * (len(cols) + 1))
    for name, r in rows.items():
        print(f"| {name} | {r['n']} | " + " | ".join(f"{r[c]['rejected']:.1%}" for c in cols) + f" | {r['energy_rejected']:.1%} |")
    calib = calibration(bundles[0], model, feats)
    print(json.dumps(calib, indent=1))
    if args.out:
        args.out.write_text(json.dumps({"sets": rows, "calibration": calib, "energy_threshold": e_threshold,
                                        "thresholds": {label(b): b.metadata.trust.ood.threshold for b in bundles}}, indent=1))


def calibration(bundle, model, feats) -> dict:
    from covid_cxr.trust.calibration import brier, ece, softmax
    from covid_cxr.trust.fit import head_logits

    t = bundle.temperature
    y, logits = feats["test"][1], head_logits(model, feats["test"][0])
    return {"temperature": t, "test_ece_before": ece(y, softmax(logits)), "test_ece_after": ece(y, softmax(logits / t)),
            "test_brier_before": brier(y, softmax(logits)), "test_brier_after": brier(y, softmax(logits / t))}


def _args():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", type=Path, action="append", required=True, help="a bundle (repeat: one column each)")
    ap.add_argument("--data", type=Path, required=True)
    ap.add_argument("--workdir", type=Path, required=True, help="the first bundle's training work folder")
    ap.add_argument("--refit", type=Path, help="write the first bundle again with the current gate here")
    ap.add_argument("--dev", action="store_true", help="the dev sets (where the gate was chosen)")
    ap.add_argument("--threads", type=int, default=0, help="ONNX Runtime threads (0: all cores)")
    ap.add_argument("--out", type=Path)
    return ap.parse_args()


if __name__ == "__main__":
    main()

"""Out-of-distribution gate on the real data: rejection rate per offline test set, Mahalanobis (what
the bundle ships) beside the energy score (the alternative), and ECE before/after temperature.

Test sets, all built from what is offline: natural photos (scikit-learn's two sample photos and
matplotlib's sample photos, cropped and flipped), noise (uniform, Gaussian, salt-and-pepper,
blurred), blank images and gradients, non-chest images (matplotlib's MRI slice and terrain maps),
and test-split X-rays rotated 90°, inverted, or cropped to a corner. In distribution: the test split.
Targets (issue 8): photos, noise, blank and non-chest rejected >= 99 %; test split accepted >= 93 %.

Usage: python benchmarks/bench_ood.py --model MODELS/<name> --data DIR --workdir MODELS/.work [--out ood.json]
"""

from __future__ import annotations

import argparse
import gzip
import json
from pathlib import Path

import numpy as np
from PIL import Image, ImageFilter

SIZE = 224


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


def blank_and_gradients(rng) -> np.ndarray:
    yy, xx = np.mgrid[0:SIZE, 0:SIZE] / (SIZE - 1)
    out = [np.full((SIZE, SIZE), v) for v in np.linspace(0, 1, 11)]
    for a in np.linspace(0, np.pi, 12, endpoint=False):
        g = np.cos(a) * xx + np.sin(a) * yy
        out += [(g - g.min()) / (g.max() - g.min()), 1 - (g - g.min()) / (g.max() - g.min())]
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


def xray_variants(test_images: np.ndarray) -> dict[str, np.ndarray]:
    corners = []
    for k, x in enumerate(test_images):
        q = SIZE // 2
        c = [x[:q, :q], x[:q, q:], x[q:, :q], x[q:, q:]][k % 4]
        corners.append(np.asarray(Image.fromarray(c).resize((SIZE, SIZE), Image.Resampling.BILINEAR)))
    return {"X-rays rotated 90°": np.rot90(test_images, 1, axes=(1, 2)).copy(),
            "X-rays inverted": 1.0 - test_images, "X-rays, one corner (a quarter)": np.stack(corners)}


def split_features(bundle, data: Path, workdir: Path):
    """Pooled features of every split from the training run's feature cache (no backbone pass)."""
    from covid_cxr.data import prepare
    from covid_cxr.train.features import cached_features

    cfg = bundle.metadata.training.config.model_copy(update={"progress": False})
    prepared = prepare(data, cfg.classes, cfg.balance, cfg.max_per_class, cfg.seed, progress=False)
    model = bundle.load_torch()
    feats = cached_features(model, prepared, cfg, bundle.metadata.architecture.weights, workdir / "feature-cache")
    return prepared, model, {s: (f.numpy(), y.numpy()) for s, (f, y) in feats.items()}


def torch_features(model, x: np.ndarray) -> np.ndarray:
    import torch

    with torch.inference_mode():
        return torch.cat([model.features(torch.from_numpy(x[i:i + 32])[:, None]) for i in range(0, len(x), 32)]).numpy()


def main() -> None:
    from covid_cxr.bundle import load_bundle
    from covid_cxr.data.decode import load_batch
    from covid_cxr.trust.calibration import brier, ece, softmax
    from covid_cxr.trust.fit import head_logits
    from covid_cxr.trust.ood import OODStats, energy

    ap = argparse.ArgumentParser()
    ap.add_argument("--model", type=Path, required=True)
    ap.add_argument("--data", type=Path, required=True)
    ap.add_argument("--workdir", type=Path, required=True)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    b = load_bundle(args.model)
    arrays = b.trust_arrays()
    stats = OODStats(arrays["means"], arrays["chol"], float(arrays["threshold"][0]))
    t = float(arrays["temperature"][0])
    prepared, model, feats = split_features(b, args.data, args.workdir)
    val_energy = energy(head_logits(model, feats["val"][0]))
    e_threshold = float(np.quantile(val_energy, 0.95))  # energy: higher = less like training (accept 95 % of val)
    test_paths = [prepared.manifest.root / r.path for r in prepared.splits["test"]]
    test_x = load_batch(test_paths, SIZE, SIZE)
    sets = {"natural photos": natural_photos(rng), "noise": noise(rng), "blank and gradients": blank_and_gradients(rng),
            "non-chest (MRI slice, terrain maps)": non_chest(rng), **xray_variants(test_x)}
    rows = {"test split (in distribution)": {"n": len(test_x), **_rates(b, stats, model, test_x, e_threshold, accept=True)}}
    for name, x in sets.items():
        rows[name] = {"n": len(x), **_rates(b, stats, model, x, e_threshold, accept=False)}
    y, logits = feats["test"][1], head_logits(model, feats["test"][0])
    calib = {"temperature": t, "test_ece_before": ece(y, softmax(logits)), "test_ece_after": ece(y, softmax(logits / t)),
             "test_brier_before": brier(y, softmax(logits)), "test_brier_after": brier(y, softmax(logits / t))}
    print("| set | n | rejected (Mahalanobis, ONNX) | rejected (energy) |\n|---|---|---|---|")
    for name, r in rows.items():
        print(f"| {name} | {r['n']} | {r['mahalanobis_rejected']:.1%} | {r['energy_rejected']:.1%} |")
    print(json.dumps(calib, indent=1))
    if args.out:
        args.out.write_text(json.dumps({"sets": rows, "calibration": calib, "energy_threshold": e_threshold,
                                        "mahalanobis_threshold": stats.threshold}, indent=1))


def _rates(bundle, stats, model, x: np.ndarray, e_threshold: float, accept: bool) -> dict:
    """Share rejected by the shipped gate (ONNX), by numpy on torch features (must agree), by energy."""
    from covid_cxr.trust.fit import head_logits
    from covid_cxr.trust.ood import energy

    inside = np.concatenate([bundle.predict_with_ood(x[i:i + 32])[2] for i in range(0, len(x), 32)])
    f = torch_features(model, x)
    agree = float((stats.accepts(f) == inside).mean())
    return {"mahalanobis_rejected": float(1 - inside.mean()), "numpy_agreement": agree,
            "energy_rejected": float((energy(head_logits(model, f)) > e_threshold).mean())}


if __name__ == "__main__":
    main()

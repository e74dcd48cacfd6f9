"""Site adaptation's depth beyond the head: does unfreezing the backbone's last stage (blocks.6 +
conv_head + bn2, as staged --finetune trains it) pay with 20 labelled films per class?

Same draws and sites as site_adapt_heads.py (macro-F1 on the rest of each site). The frozen trunk
(stem + blocks 0-5) runs once per film through ONNX Runtime (train/finetune.py's trunk_extractor);
labelled films also get augmented views (train/finetune.py's augment_each, seeded by the film).
The top (last stage + head, from the bundle's weights) then trains full batch for a fixed budget,
classes weighted to balance, one random view per film per step, BatchNorm statistics kept; the
stage at lr x 0.1 (as --finetune), the head at lr.

Usage: python benchmarks/site_adapt_depth.py [--bundle runs/adapt-models/efficientnet_lite0/1] [--draws 3]
"""
from __future__ import annotations

import argparse
import copy
import hashlib
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
from site_adapt_heads import MASKS, SITES, draw, logits, lr_baseline, macro, pools  # noqa: E402

from covid_cxr.bundle import load_bundle  # noqa: E402
from covid_cxr.data.decode import load_batch  # noqa: E402
from covid_cxr.models.loading import load_torch  # noqa: E402
from covid_cxr.train.adapt import SITE_DEPTH, SITE_PRIOR, SITE_STEPS, balanced_weights, fit_site_head  # noqa: E402
from covid_cxr.train.finetune import Top, augment_each, trunk_extractor, view_seeds  # noqa: E402

K = 6  # the trunk: stem + blocks 0-5 (the staged split of EfficientNet-Lite)


def trunk(run, paths: list[Path], size: int, view: int, memo: dict) -> torch.Tensor:
    out = []
    for i in range(0, len(paths), 32):
        chunk = paths[i:i + 32]
        todo = [p for p in chunk if (p, view) not in memo]
        if todo:
            x = torch.from_numpy(load_batch(todo, size, size))[:, None]
            if view:
                x = augment_each(x, view_seeds([(p, hashlib.sha256(p.read_bytes()).hexdigest()) for p in todo], view))
            for p, a in zip(todo, run(x[:, 0].numpy())[0]):
                memo[(p, view)] = a
        out += [memo[(p, view)] for p in chunk]
    return torch.stack(out)


def fit_top(model, views: list[torch.Tensor], y: np.ndarray, steps: int, lr: float, seed: int) -> Top:
    torch.manual_seed(seed)
    m = copy.deepcopy(model)
    top = Top(m, K)
    for p in top.parameters():
        p.requires_grad_(True)
    ys = torch.as_tensor(y)
    w = balanced_weights(ys, m.head.net[-1].out_features)
    opt = torch.optim.AdamW([{"params": top.stages.parameters(), "lr": lr * 0.1},
                             {"params": top.head.parameters(), "lr": lr}], weight_decay=1e-4)
    gen = torch.Generator().manual_seed(seed)
    stacked = torch.stack(views)  # V x N x C x h x w
    for _ in range(steps):
        top.train()
        pick = torch.randint(len(views), (len(y),), generator=gen)
        a = stacked[pick, torch.arange(len(y))]
        opt.zero_grad()
        torch.nn.functional.cross_entropy(top(a), ys, weight=w).backward()
        opt.step()
    return top.eval()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--bundle", default="runs/adapt-models/efficientnet_lite0/1")
    ap.add_argument("--draws", type=int, default=3)
    ap.add_argument("--views", type=int, default=4)
    ap.add_argument("--steps", type=int, nargs="+", default=[100, 300])
    ap.add_argument("--lr", type=float, default=1e-3)
    a = ap.parse_args()
    torch.set_num_threads(2)
    b = load_bundle(a.bundle)
    model, cl = load_torch(b), list(b.classes)
    size = b.input_hw[0]
    run = trunk_extractor(model, K, size, Path("runs/adapt-work"))
    pool, _ = pools()
    memo: dict = {}
    means: dict = {}
    for name, site in SITES.items():
        present = sorted(cl.index(c) for c in site)
        for seed in range(a.draws):
            (li, ly), (ri, ry) = draw(site, pool, cl, 20, seed)
            lp = [MASKS / "images" / f"{i}.png" for i in li]
            tp = [MASKS / "images" / f"{i}.png" for i in ri]
            y, yt = np.array(ly), np.array(ry)
            views = [trunk(run, lp, size, v, memo) for v in range(a.views)]
            at = trunk(run, tp, size, 0, memo)
            plain = Top(model, K).eval()
            with torch.inference_mode():
                x, xt = plain.pooled(views[0]).numpy(), plain.pooled(at).numpy()
            row = {"LR": macro(yt, lr_baseline(x, y, xt, len(cl)), present)[0],
                   "head": macro(yt, logits(fit_site_head(model.head, x, y, SITE_DEPTH, SITE_PRIOR, steps=SITE_STEPS,
                                                          seed=seed), xt).argmax(1), present)[0]}
            for steps in a.steps:
                for nv in (1, a.views):
                    top = fit_top(model, views[:nv], y, steps, a.lr, seed)
                    with torch.inference_mode():
                        row[f"stage+head {nv}v {steps}s"] = macro(yt, top(at).argmax(1).numpy(), present)[0]
            print(f"{name} seed {seed} (labelled {len(y)}, test {len(yt)}): "
                  + " | ".join(f"{k} {v:.3f}" for k, v in row.items()), flush=True)
            for k, v in row.items():
                means.setdefault(name, {}).setdefault(k, []).append(v)
    for name, rs in means.items():
        print(name, " | ".join(f"{k} {np.mean(v):.3f}" for k, v in rs.items()))


if __name__ == "__main__":
    main()

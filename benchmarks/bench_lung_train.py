"""Per-image cost of lung-segmenter training on this machine: forward + backward + optimiser step,
ms per image, for the U-Net variants that could make `covid-cxr lungs train` fit its time budget,
plus the augmentation (per image, in the data loader) and the validation forward pass.

Wall and CPU time are both given: with one thread, CPU time is the cost itself, wall time adds
whatever the machine's other work takes from it. Every variant is built by the real code (lungs.model.build_unet from a LungConfig), trained on
real pairs at the config's size, frozen stages' BatchNorm in eval mode as in training. Prints
JSON and writes it to --out; says the load average before and after (the machine is shared).

Usage: python benchmarks/bench_lung_train.py [--data DIR] [--threads 1,2] [--steps 3] [--batch 16]
           [--variants today,channels_last,...] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO.parent / "shared" / "data" / "lung-masks"
VARIANTS = {  # LungConfig fields on top of the defaults of today's code (frozen 3, decoder 64-48-32-16-8)
    "today": {},
    "channels_last": {"channels_last": True},
    "frozen4": {"frozen_stages": 4},
    "frozen5": {"frozen_stages": 5},
    "small_decoder": {"decoder_channels": [32, 24, 16, 12, 8]},
    "cl_frozen4": {"frozen_stages": 4, "channels_last": True},
    "cl_small_decoder": {"decoder_channels": [32, 24, 16, 12, 8], "channels_last": True},
    "frozen4_small_cl": {"frozen_stages": 4, "decoder_channels": [32, 24, 16, 12, 8], "channels_last": True},
}
BASE = {"frozen_stages": 3, "decoder_channels": [64, 48, 32, 16, 8], "channels_last": False}


def build(cfg):
    from covid_cxr.models.lung_unet import MaskModel, build_unet, frozen_modules

    net, _ = build_unet(cfg)
    model = MaskModel(net, 0.5, 0.25)
    frozen = frozen_modules(net.encoder.model, cfg.frozen_stages)
    if getattr(cfg, "channels_last", False):
        model = model.to(memory_format=torch.channels_last)
    return model, frozen


def step_ms(cfg, x: torch.Tensor, y: torch.Tensor, steps: int) -> dict:
    """ms per image of one training step (after one warm-up step), and of a validation forward."""
    from covid_cxr.train.lungs import soft_dice

    model, frozen = build(cfg)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    if getattr(cfg, "channels_last", False):
        x, y = x.contiguous(memory_format=torch.channels_last), y.contiguous(memory_format=torch.channels_last)
    model.train()
    for m in frozen:
        m.eval()
    times, cpu = [], []
    for i in range(steps + 1):
        t, c = time.perf_counter(), time.process_time()
        logits = model.logits(x)
        loss = torch.nn.functional.binary_cross_entropy_with_logits(logits, y) + \
            (1 - soft_dice(torch.sigmoid(logits), y)).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if i:
            times.append((time.perf_counter() - t) * 1000 / len(x))
            cpu.append((time.process_time() - c) * 1000 / len(x))
    model.eval()
    with torch.inference_mode():
        t = time.perf_counter()
        model.logits(x)
        fwd = (time.perf_counter() - t) * 1000 / len(x)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {"train_ms_per_image": round(float(np.median(times)), 1), "all_steps_ms": [round(t, 1) for t in times],
            "train_cpu_ms_per_image": round(float(np.median(cpu)), 1),
            "val_forward_ms_per_image": round(fwd, 1), "trainable_params": trainable}


def augment_ms(pairs, n: int = 64) -> float:
    from covid_cxr.train.lungs import PairDataset

    ds = PairDataset(pairs, True)
    ds[0]
    t = time.perf_counter()
    for i in range(n):
        ds[i % len(ds)]
    return round((time.perf_counter() - t) * 1000 / n, 2)


def main() -> None:
    from covid_cxr.core.lung_config import LungConfig
    from covid_cxr.data.lung_masks import load_pairs

    ap = argparse.ArgumentParser()
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA)
    ap.add_argument("--threads", default="1")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--size", type=int, default=128)
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--out", type=Path, default=None)
    a = ap.parse_args()
    pairs = load_pairs(a.data, a.size, max_images=max(64, a.batch), seed=0)
    x = torch.from_numpy(pairs.images[:a.batch])[:, None]
    y = torch.from_numpy(pairs.masks[:a.batch].astype(np.float32))[:, None]
    result = {"load_before": os.getloadavg(), "batch": a.batch, "size": a.size, "torch": torch.__version__,
              "variants": {}}
    for threads in [int(t) for t in a.threads.split(",")]:
        torch.set_num_threads(threads)
        result[f"augment_ms_per_image_{threads}t"] = augment_ms(pairs)
        for name in a.variants.split(","):
            cfg = LungConfig(image_size=a.size, **{**BASE, **VARIANTS[name]})
            r = step_ms(cfg, x, y, a.steps)
            result["variants"][f"{name} ({threads} thread{'s' * (threads > 1)})"] = r
            print(name, threads, r, "load", os.getloadavg(), flush=True)
    result["load_after"] = os.getloadavg()
    text = json.dumps(result, indent=1)
    if a.out:
        a.out.write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()

"""What one fine-tuning epoch costs on this CPU, per training image, measured side by side:

- the old path (`--finetune` before issue 9): the whole network forward on augmented images,
  backward through the unfrozen stages (decode + augmentation included);
- staged fine-tuning (train/finetune.py): the unfrozen stages + head on cached trunk activations,
  fp32 / bf16 autocast / channels-last (which of these is faster decides what training uses).

Usage: python benchmarks/bench_finetune.py [--data DIR] [--n 128] [--arch efficientnet_lite0]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from covid_cxr.data.decode import load_batch
from covid_cxr.models import create_model, get_spec
from covid_cxr.train.finetune import Top, augment_batch, first_trainable_block, Trunk

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO.parent / "shared" / "data" / "covid19-radiography"


def step_time(net, batches, labels, autocast: bool = False, channels_last: bool = False) -> float:
    """Seconds per image of forward + backward + Adam step over `batches`."""
    params = [p for p in net.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=1e-4)
    loss_fn = torch.nn.CrossEntropyLoss()
    if channels_last:
        net = net.to(memory_format=torch.channels_last)
    n, t = 0, time.perf_counter()
    for x, y in zip(batches, labels):
        x = x() if callable(x) else x
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            loss = loss_fn(net(x).float(), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        n += len(y)
    return (time.perf_counter() - t) / n


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA)
    ap.add_argument("--n", type=int, default=128)
    ap.add_argument("--arch", default="efficientnet_lite0")
    a = ap.parse_args()
    size = get_spec(a.arch).input_size
    paths = sorted(a.data.glob("*/*.png"))[:: max(1, 4137 // a.n)][:a.n]
    model, _ = create_model(a.arch, "imagenet")
    model.freeze_backbone(trainable=get_spec(a.arch).finetune_modules)
    k = first_trainable_block(a.arch)
    chunks = [paths[i:i + 32] for i in range(0, len(paths), 32)]
    labels = [torch.randint(0, 3, (len(c),)) for c in chunks]
    images = [lambda c=c: augment_batch(torch.from_numpy(load_batch(c, size, size))[:, None], 0) for c in chunks]
    with torch.no_grad():
        trunk = Trunk(model.backbone, k).eval()
        acts = [trunk((torch.from_numpy(load_batch(c, size, size))[:, None] - 0.5) / 0.25) for c in chunks]
    print(f"== {a.arch}, {len(paths)} images, batch 32, {torch.get_num_threads()} threads: ms per training image")
    old = step_time(model.train(), images, labels)
    print(f"  whole network on augmented images (the old --finetune)   {old * 1e3:8.2f}")
    for name, kw in (("fp32", {}), ("bf16 autocast", {"autocast": True}), ("channels-last", {"channels_last": True})):
        s = step_time(Top(model, k).train(), acts, labels, **kw)
        print(f"  staged, cached activations, {name:<15}                {s * 1e3:8.2f}   {old / s:6.1f}x")


if __name__ == "__main__":
    main()

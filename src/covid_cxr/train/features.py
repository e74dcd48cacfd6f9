"""The frozen-feature cache: a frozen backbone maps an image to the same vector every epoch, so
compute it once per image (keyed by the file's sha256) and train the head on the vectors.

The cache file name holds everything the vector depends on (architecture, weights, input size,
normalisation), and new images are added incrementally, so an interrupted extraction resumes.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from covid_cxr.data.decode import load_batch
from covid_cxr.utils import progress_iter


def cache_key(arch: str, weight_source: str, size: int, mean: float, std: float, lung_crop: str = "none",
              lungs: str | None = None) -> str:
    extra = [] if lung_crop == "none" else [lung_crop, str(Path(lungs).resolve())]  # old keys unchanged
    blob = json.dumps([arch, weight_source, size, round(mean, 6), round(std, 6), *extra])
    return f"{arch}-{size}-{hashlib.sha256(blob.encode()).hexdigest()[:12]}"


class FeatureCache:
    def __init__(self, path: Path):
        self.path = Path(path)
        self.rows: dict[str, torch.Tensor] = {}
        if self.path.is_file():
            t = load_file(str(self.path))
            keys = json.loads(self.path.with_suffix(".keys.json").read_text())
            self.rows = dict(zip(keys, t["features"]))

    def save(self) -> None:
        from covid_cxr.utils import atomic_write_text

        if not self.rows:
            return
        keys = list(self.rows)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        save_file({"features": torch.stack([self.rows[k] for k in keys])}, str(tmp))
        atomic_write_text(self.path.with_suffix(".keys.json"), json.dumps(keys))
        tmp.replace(self.path)


@torch.inference_mode()
def extract(model, items: list[tuple[Path, str]], size: int, cache: FeatureCache | None = None,
            batch_size: int = 32, progress: bool = True, save_every: int = 20,
            precision: str = "fp32", transform=None) -> torch.Tensor:
    """Features (N x F) for `items` = [(path, sha256)], computing only what the cache lacks.

    Runs channels-last (about 2x faster on this CPU, same numbers); ``precision="bf16"`` adds
    autocast (faster again on AVX-512/AMX, features differ by bf16 rounding). `transform` maps each
    loaded N x H x W batch first (lung-only input).
    """
    model.eval()
    model.to(memory_format=torch.channels_last)
    todo = [(p, s) for p, s in items if cache is None or s not in cache.rows]
    store = cache.rows if cache is not None else {}
    batches = [todo[i:i + batch_size] for i in range(0, len(todo), batch_size)]
    for n, batch in enumerate(progress_iter(batches, "extracting features", enabled=progress and bool(batches)), 1):
        pixels = load_batch([p for p, _ in batch], size, size)
        x = torch.from_numpy(transform(pixels) if transform else pixels)[:, None]
        x = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
            feats = model.features(x).float()
        for (_, sha), f in zip(batch, feats):
            store[sha] = f.clone()
        if cache is not None and n % save_every == 0:
            cache.save()  # an interrupted extraction keeps what it computed
    if cache is not None and batches:
        cache.save()
    model.to(memory_format=torch.contiguous_format)
    return torch.stack([store[s] for _, s in items])


def cached_features(model, prepared, cfg, source: str, cache_dir: Path) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """split -> (features N x F, labels N) for every split, extracting only what the cache lacks."""
    from covid_cxr.data.dataset import labels_of

    from covid_cxr.lungs.crop import batch_transform

    key = cache_key(cfg.arch, source, cfg.size, prepared.mean, prepared.std, cfg.lung_crop, cfg.lungs)
    cache = FeatureCache(cache_dir / f"{key}.safetensors")
    items = {s: [(prepared.manifest.root / r.path, r.sha256) for r in prepared.splits[s]] for s in prepared.splits}
    everything = [it for s in ("train", "val", "test") for it in items[s]]
    extract(model, everything, cfg.size, cache, progress=cfg.progress, precision=cfg.precision,
            transform=batch_transform(cfg.lung_crop, cfg.lungs))
    return {s: (torch.stack([cache.rows[sha] for _, sha in items[s]]), torch.from_numpy(labels_of(prepared, s)))
            for s in ("train", "val", "test")}

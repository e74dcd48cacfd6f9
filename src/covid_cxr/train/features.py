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


ORT_FROM_IMAGES = 200  # extractor "auto": below this, the backbone's one-off ONNX export costs more than it saves


def cache_key(arch: str, weight_source: str, size: int, mean: float, std: float) -> str:
    blob = json.dumps([arch, weight_source, size, round(mean, 6), round(std, 6)])
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
            precision: str = "fp32", engine: str = "torch") -> torch.Tensor:
    """Features (N x F) for `items` = [(path, sha256)], computing only what the cache lacks.

    ``engine="onnxruntime"`` (fp32 only) runs the exported backbone (train/extract_onnx.py), 3-6x
    faster than torch here with the same numbers; its graph is kept beside the cache. Torch runs
    channels-last (about 1.7x faster than contiguous, same numbers); ``precision="bf16"`` adds
    autocast (faster again on AVX-512/AMX, features differ by bf16 rounding).
    """
    model.eval()
    todo = [(p, s) for p, s in items if cache is None or s not in cache.rows]
    if engine == "auto":
        engine = "onnxruntime" if len(todo) >= ORT_FROM_IMAGES else "torch"
    featurize = _featurizer(model, size, engine if todo else "torch", precision,
                            cache.path.parent if cache is not None else None)
    model.to(memory_format=torch.channels_last)
    store = cache.rows if cache is not None else {}
    batches = [todo[i:i + batch_size] for i in range(0, len(todo), batch_size)]
    for n, batch in enumerate(progress_iter(batches, "extracting features", enabled=progress and bool(batches)), 1):
        feats = featurize(torch.from_numpy(load_batch([p for p, _ in batch], size, size))[:, None])
        for (_, sha), f in zip(batch, feats):
            store[sha] = f.clone()
        if cache is not None and n % save_every == 0:
            cache.save()  # an interrupted extraction keeps what it computed
    if cache is not None and batches:
        cache.save()
    model.to(memory_format=torch.contiguous_format)
    return torch.stack([store[s] for _, s in items])


def _featurizer(model, size: int, engine: str, precision: str, cache_dir: Path | None):
    """x (N x 1 x H x W in [0, 1]) -> pooled features, by the engine asked for."""
    if engine == "onnxruntime" and precision == "fp32":
        import tempfile

        from covid_cxr.train.extract_onnx import OnnxFeatureExtractor

        return OnnxFeatureExtractor(model, size, cache_dir or Path(tempfile.mkdtemp(prefix="covid-cxr-")))

    def torch_features(x: torch.Tensor) -> torch.Tensor:
        x = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
            return model.features(x).float()

    return torch_features


def cached_features(model, prepared, cfg, source: str, cache_dir: Path) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """split -> (features N x F, labels N) for every split, extracting only what the cache lacks."""
    from covid_cxr.data.dataset import labels_of

    from covid_cxr.train.extract_onnx import weights_digest

    # keyed by the backbone's tensors, not the source's name: random initialisations differ per seed,
    # and a bundle continued with --init-from shares the features of the backbone it kept frozen
    key = cache_key(cfg.arch, weights_digest(model.backbone), cfg.size, prepared.mean, prepared.std)
    cache = FeatureCache(cache_dir / f"{key}.safetensors")
    items = {s: [(prepared.manifest.root / r.path, r.sha256) for r in prepared.splits[s]] for s in prepared.splits}
    everything = [it for s in ("train", "val", "test") for it in items[s]]
    extract(model, everything, cfg.size, cache, progress=cfg.progress, precision=cfg.precision,
            engine=cfg.extractor)
    return {s: (torch.stack([cache.rows[sha] for _, sha in items[s]]), torch.from_numpy(labels_of(prepared, s)))
            for s in ("train", "val", "test")}

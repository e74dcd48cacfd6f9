"""The frozen-feature cache: a frozen backbone maps an image to the same vector every epoch, so
compute it once per image (keyed by the file's sha256) and train the head on the vectors.

The cache file name holds everything the vector depends on (architecture, weights, input size,
normalisation), and new images are added incrementally, so an interrupted extraction resumes.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from covid_cxr.data.decode import load_batch
from covid_cxr.core.errors import UserError
from covid_cxr.core.progress import progress_iter

log = logging.getLogger("covid_cxr.train")
SPOT_CHECK = 2  # cached rows recomputed per run to prove the cache still matches its images

ORT_FROM_IMAGES = 200  # extractor "auto": below this, the backbone's one-off ONNX export costs more than it saves

def cache_key(arch: str, weight_source: str, size: int, mean: float, std: float, lung_crop: str = "none",
              lungs: str | None = None) -> str:
    extra = [] if lung_crop == "none" else [lung_crop, str(Path(lungs).resolve())]  # old keys unchanged
    blob = json.dumps([arch, weight_source, size, round(mean, 6), round(std, 6), *extra])
    return f"{arch}-{size}-{hashlib.sha256(blob.encode()).hexdigest()[:12]}"


class FeatureCache:
    """sha256 -> feature vector, in one safetensors file whose metadata holds the key list.

    Keys and rows live in the same file, replaced atomically, so they can never be paired from two
    different saves. On reading, the key list must be valid and as long as the rows, and the rows
    must match the sha256 saved with them, or the cache is dropped and rebuilt (logged); a file
    safetensors cannot read is a UserError naming it.
    """

    def __init__(self, path: Path):
        self.path = Path(path)
        self.rows: dict[str, torch.Tensor] = {}
        self.loaded: set[str] = set()  # keys read from disk (not computed by this run)
        if self.path.is_file():
            self.rows = self._read()
            self.loaded = set(self.rows)

    def _read(self) -> dict[str, torch.Tensor]:
        try:
            with safe_open(str(self.path), "pt") as f:
                meta = f.metadata() or {}
                feats = f.get_tensor("features") if "features" in f.keys() else None
        except Exception as exc:  # safetensors raises its own types for damaged files
            raise FeatureCacheError(f"{self.path}: unreadable feature cache ({str(exc)[:120]}): delete it "
                                    "(it is rebuilt from the images)") from None
        try:
            keys = json.loads(meta.get("keys", "null"))
        except ValueError:
            keys = None
        if feats is None or not _valid_keys(keys, len(feats)):
            log.warning("feature cache %s: key list missing or not matching its %s rows; rebuilding it",
                        self.path, "no" if feats is None else len(feats))
            return {}
        fault = _integrity_fault(feats, meta.get("sha256"))
        if fault:
            log.warning("feature cache %s: %s; rebuilding it", self.path, fault)
            return {}
        return dict(zip(keys, feats))

    def discard(self, keys) -> None:
        for k in keys:
            self.rows.pop(k, None)
            self.loaded.discard(k)

    def save(self) -> None:
        if not self.rows:
            return
        keys = list(self.rows)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        feats = torch.stack([self.rows[k] for k in keys]).contiguous()
        save_file({"features": feats}, str(tmp), metadata={"keys": json.dumps(keys), "sha256": _digest(feats)})
        tmp.replace(self.path)
        self.path.with_suffix(".keys.json").unlink(missing_ok=True)  # the old, separate key list


class FeatureCacheError(UserError):
    """A feature cache file that cannot be read."""


def _digest(feats: torch.Tensor) -> str:
    return hashlib.sha256(feats.contiguous().numpy().tobytes()).hexdigest()


def _integrity_fault(feats: torch.Tensor, sha256: str | None) -> str | None:
    """Why rows read from disk cannot be trusted (None: they can). The checksum covers every byte
    (a spot check of the first rows missed 4,000 bytes overwritten mid-file); caches written before
    it existed must at least be finite throughout."""
    if sha256 is not None and _digest(feats) != sha256:
        return "checksum mismatch (the file was changed after it was written)"
    if not bool(torch.isfinite(feats).all()):
        return "non-finite values (NaN or inf) in its rows"
    return None


def _valid_keys(keys, n_rows: int) -> bool:
    return (isinstance(keys, list) and len(keys) == n_rows and len(set(keys)) == n_rows
            and all(isinstance(k, str) for k in keys))


@torch.inference_mode()
def extract(model, items: list[tuple[Path, str]], size: int, cache: FeatureCache | None = None,
            batch_size: int = 32, progress: bool = True, save_every: int = 20, precision: str = "fp32",
            device: torch.device | str = "cpu", transform=None, engine: str = "torch", featurize=None,
            label: str = "extracting features") -> torch.Tensor:
    """Features (N x F) for `items` = [(path, sha256)], computing only what the cache lacks.

    ``engine="onnxruntime"`` (fp32, CPU) runs the exported backbone (train/extract_onnx.py), 3-6x
    faster than torch here with the same numbers; its graph is kept beside the cache; "auto" picks it
    from ORT_FROM_IMAGES images to extract. Torch runs channels-last (about 1.7x faster, same
    numbers); ``precision="bf16"`` adds autocast. `transform` maps each loaded N x H x W batch first
    (lung-only input). `featurize` (x N x 1 x H x W tensor -> N x D tensor) replaces the pooled-feature
    engine: the OOD gate's stage statistics go through the same loop and cache (trust/stages.py).
    """
    model.eval()
    todo = [(p, s) for p, s in items if cache is None or s not in cache.rows]
    if engine == "auto":
        engine = "onnxruntime" if len(todo) >= ORT_FROM_IMAGES and torch.device(device).type == "cpu" else "torch"
    if featurize is None:
        featurize = _featurizer(model, size, engine if todo else "torch", precision,
                                cache.path.parent if cache is not None else None, device)
    store = cache.rows if cache is not None else {}
    batches = [todo[i:i + batch_size] for i in range(0, len(todo), batch_size)]
    for n, batch in enumerate(progress_iter(batches, label, enabled=progress and bool(batches)), 1):
        pixels = load_batch([p for p, _ in batch], size, size)
        feats = featurize(torch.from_numpy(transform(pixels) if transform else pixels)[:, None])
        for (_, sha), f in zip(batch, feats):
            store[sha] = f.clone()
        if cache is not None and n % save_every == 0:
            cache.save()  # an interrupted extraction keeps what it computed
    if cache is not None and batches:
        cache.save()
    model.to(device="cpu", memory_format=torch.contiguous_format)
    return torch.stack([store[s] for _, s in items]) if items else torch.empty(0)


def _featurizer(model, size: int, engine: str, precision: str, cache_dir: Path | None,
                device: torch.device | str = "cpu"):
    """x (N x 1 x H x W in [0, 1], on the CPU) -> pooled features on the CPU, by the engine asked for."""
    if engine == "onnxruntime" and precision == "fp32":
        import tempfile

        from covid_cxr.features.onnx import OnnxFeatureExtractor

        return OnnxFeatureExtractor(model, size, cache_dir or Path(tempfile.mkdtemp(prefix="covid-cxr-")))
    device = torch.device(device)
    model.to(device=device, memory_format=torch.channels_last)

    def torch_features(x: torch.Tensor) -> torch.Tensor:
        x = x.to(device).contiguous(memory_format=torch.channels_last)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
            return model.features(x).float().cpu()

    return torch_features


def extract_sharded(model, items: list[tuple[Path, str]], cfg, cache: FeatureCache, dist, transform=None) -> None:
    """Several processes: each extracts every world-th missing image, all gather the vectors, the
    main process saves the cache. Afterwards every process holds the same cache."""
    fingerprint = float(sum(p.detach().double().sum() for p in model.parameters()))
    if len(set(dist.gather(fingerprint))) > 1:
        raise RuntimeError("the processes hold different backbones (random weights seeded differently?); "
                           "their features would not belong together")
    todo = list(dict.fromkeys((p, s) for p, s in items if s not in cache.rows))
    shard = todo[dist.rank::dist.world]
    feats = extract(model, shard, cfg.size, None, progress=cfg.progress and dist.is_main,
                    precision=cfg.precision, device=dist.device, transform=transform)
    mine = {s: f.numpy() for (_, s), f in zip(shard, feats)}
    for part in dist.gather(mine):
        cache.rows.update({s: torch.from_numpy(f) for s, f in part.items()})
    if dist.is_main and todo:
        cache.save()
    dist.barrier()


@torch.inference_mode()
def spot_check(model, cache: FeatureCache, items: list[tuple[Path, str]], size: int, precision: str,
               transform=None) -> bool:
    """Recompute a few rows read from disk (with torch): a cache whose rows do not belong to their
    keys (however that came about) is caught here instead of training silently on the wrong features."""
    sample = [(p, s) for p, s in items if s in cache.loaded][:SPOT_CHECK]
    if not sample:
        return True
    model.eval()
    fresh = extract(model, sample, size, None, progress=False, precision=precision, transform=transform)
    cached = torch.stack([cache.rows[s] for _, s in sample])
    tol = 5e-2 if precision == "bf16" else 1e-3
    return bool(((fresh - cached).abs().max() <= tol * fresh.abs().max().clamp_min(1e-6)).item())


def cached_features(model, prepared, cfg, source: str, cache_dir: Path,
                    dist=None) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """split -> (features N x F, labels N) for every split, extracting only what the cache lacks
    (sharded across processes when `dist` has several)."""
    from covid_cxr.data.dataset import labels_of
    from covid_cxr.lungs.crop import batch_transform
    from covid_cxr.features.onnx import weights_digest

    # keyed by the backbone's tensors, not the source's name: random initialisations differ per seed,
    # and a bundle continued with --init-from shares the features of the backbone it kept frozen
    key = cache_key(cfg.arch, weights_digest(model.backbone), cfg.size, prepared.mean, prepared.std,
                    cfg.lung_crop, cfg.lungs)
    cache = FeatureCache(cache_dir / f"{key}.safetensors")
    items = {s: [(prepared.manifest.root / r.path, r.sha256) for r in prepared.splits[s]] for s in prepared.splits}
    everything = [it for s in ("train", "val", "test") for it in items[s]]
    transform = batch_transform(cfg.lung_crop, cfg.lungs)
    if not spot_check(model, cache, everything, cfg.size, cfg.precision, transform):
        log.warning("feature cache %s does not match its images; rebuilding it", cache.path)
        cache.discard(list(cache.rows))
    if dist is not None and dist.world > 1:
        extract_sharded(model, everything, cfg, cache, dist, transform)
    else:
        extract(model, everything, cfg.size, cache, progress=cfg.progress, precision=cfg.precision,
                device=dist.device if dist is not None else "cpu", transform=transform, engine=cfg.extractor)
    return {s: (torch.stack([cache.rows[sha] for _, sha in items[s]]), torch.from_numpy(labels_of(prepared, s)))
            for s in ("train", "val", "test")}

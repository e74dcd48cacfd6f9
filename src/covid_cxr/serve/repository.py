"""The model repository as the server sees it: MODELS/<name>/<version>/ read through `covid_cxr.bundle`.

The newest version of each model is loaded into ONNX Runtime and served unless a request names a
version (older versions load on demand and are dropped again after `keep_old_seconds` unused).
The folder is re-read every `rescan_seconds` (by a background task, and by requests when the last
read is older than that), so a bundle renamed into place is served without a restart; until it has
loaded, the previous version keeps answering, as TensorFlow Serving does.
"""

from __future__ import annotations

import asyncio
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import anyio.to_thread
import numpy as np

from covid_cxr.bundle import ONNX_INPUT, ONNX_OUTPUT, Bundle, load_bundle, open_checked_session, valid_name, versions
from covid_cxr.serve.batching import BatcherClosed, MicroBatcher
from covid_cxr.serve.metrics import Metrics
from covid_cxr.serve.settings import ServeSettings

log = logging.getLogger("covid_cxr.serve")
RETRY_FAILED_S = 30.0  # a broken bundle is retried this often, not at every scan


class InvalidModelName(ValueError):
    """The name could never be a model folder (separators, '..', odd characters): 400."""


class ModelNotFound(LookupError):
    """No such model, or no such version of it: 404."""



def _segmentation(version_dir: Path) -> bool:
    """A segmentation bundle (the lung model), which the prediction APIs do not serve: it has no
    class probabilities. `serve --lungs` uses it beside the classifiers instead."""
    import json

    try:
        return json.loads((version_dir / "metadata.json").read_text(encoding="utf-8")).get("task") == "segmentation"
    except (OSError, ValueError, AttributeError):
        return False  # unreadable: let loading report it

class ModelUnavailable(RuntimeError):
    """The model exists but no version of it could be loaded: 503."""


@dataclass(eq=False)
class LoadedModel:
    """One model version in ONNX Runtime, with its batcher."""

    name: str
    version: int
    bundle: Bundle
    session: object = field(repr=False)
    batcher: MicroBatcher | None = field(default=None, repr=False)
    observe: Callable[[int, float], None] | None = field(default=None, repr=False)  # (images, seconds)
    last_used: float = field(default_factory=time.monotonic)

    @property
    def classes(self) -> list[str]:
        return self.bundle.classes

    @property
    def input_hw(self) -> tuple[int, int]:
        return self.bundle.input_hw

    def run(self, x: np.ndarray) -> np.ndarray:
        """One ONNX Runtime call (blocking): n x H x W x 1 float32 -> n x classes."""
        return self.session.run([ONNX_OUTPUT], {ONNX_INPUT: x})[0]

    def preparing(self):
        """Context for the time a request spends decoding its input (lets the batcher wait for it)."""
        return self.batcher.preparing() if self.batcher is not None else nullcontext()

    async def predict(self, x: np.ndarray) -> np.ndarray:
        self.last_used = time.monotonic()
        if self.batcher is not None:
            try:
                return await self.batcher.submit(x)
            except BatcherClosed:
                pass  # unloaded between lookup and submit: this one request runs on its own
        t0 = time.perf_counter()
        out = await anyio.to_thread.run_sync(self.run, x)
        if self.observe is not None:
            self.observe(len(x), time.perf_counter() - t0)
        return out

    def gradcam_png(self, pixels: np.ndarray, class_index: int) -> bytes:
        """Grad-CAM overlay PNG (blocking; torch model loaded lazily and cached by covid_cxr.explain)."""
        return self.gradcam(pixels, class_index)[0]

    def gradcam(self, pixels: np.ndarray, class_index: int) -> tuple[bytes, np.ndarray]:
        """(overlay PNG, raw map H x W in [0, 1]) at the model's input size (blocking)."""
        from covid_cxr.explain.gradcam import overlay_for_bundle

        png, explanation = overlay_for_bundle(self.bundle, pixels, class_index=class_index)
        return png, explanation.cam

    async def close(self) -> None:
        if self.batcher is not None:
            await self.batcher.close()


class ModelRepository:
    def __init__(self, settings: ServeSettings, metrics: Metrics):
        self.root = Path(settings.models)
        self.settings = settings
        self.metrics = metrics
        # Batches run here: by default one ONNX Runtime call at a time, as each already uses every core.
        self.executor = ThreadPoolExecutor(max_workers=settings.inference_workers,
                                           thread_name_prefix="covid-cxr-ort")
        self._disk: dict[str, list[int]] = {}
        self._scanned_at = float("-inf")
        self._loaded: dict[tuple[str, int], LoadedModel] = {}
        self._failed: dict[tuple[str, int], tuple[float, str]] = {}
        self._locks: dict[tuple[str, int], asyncio.Lock] = {}
        self._background: set[asyncio.Task] = set()

    # ------------------------------------------------------------------ disk

    def scan(self, force: bool = False) -> dict[str, list[int]]:
        """Model names and complete versions on disk; re-read at most every `rescan_seconds`."""
        now = time.monotonic()
        if force or now - self._scanned_at >= self.settings.rescan_seconds:
            found: dict[str, list[int]] = {}
            try:
                entries = sorted(self.root.iterdir()) if self.root.is_dir() else []
            except OSError as exc:
                log.warning("cannot read model repository %s: %s", self.root, exc)
                entries = []
            for p in entries:
                if valid_name(p.name) and p.is_dir():
                    vs = versions(p)
                    if vs and not _segmentation(p / str(vs[-1])):  # a lung model helps; it is not served
                        found[p.name] = vs
            self._disk = found
            self._scanned_at = now
        return self._disk

    def names(self) -> list[str]:
        return list(self.scan())

    def disk_versions(self, name: str) -> list[int]:
        self.check_name(name)
        vs = self.scan().get(name)
        if not vs:
            raise ModelNotFound(f"Servable not found for request: Latest({name})")
        return vs

    @staticmethod
    def check_name(name: str) -> None:
        if not valid_name(name):
            raise InvalidModelName(f"invalid model name {name!r}: letters, digits, '_', '-', '.' only")

    # ------------------------------------------------------------------ loading

    def loaded(self) -> list[LoadedModel]:
        return list(self._loaded.values())

    def status(self, name: str) -> list[tuple[int, str, str]]:
        """(version, state, error) per version on disk, newest first, in TF Serving's terms."""
        out = []
        for v in reversed(self.disk_versions(name)):
            if (name, v) in self._loaded:
                out.append((v, "AVAILABLE", ""))
            elif (name, v) in self._failed:
                out.append((v, "END", self._failed[(name, v)][1]))
            elif v == max(self._disk[name]):  # the next background scan loads it
                out.append((v, "LOADING", ""))
            else:  # an older version not in memory: it loads if a request names it
                out.append((v, "END", ""))
        return out

    async def get(self, name: str, version: int | None = None) -> LoadedModel:
        """The model version that should answer a request (loading it if need be)."""
        vs = self.disk_versions(name)
        if version is not None:
            if version not in vs:
                raise ModelNotFound(f"Servable not found for request: Specific({name}, {version})")
            return await self._load(name, version)
        newest = vs[-1]
        if (name, newest) in self._loaded:
            return self._touch(self._loaded[(name, newest)])
        serving = [v for v in vs if (name, v) in self._loaded]
        if serving:  # the new version loads in the background; the previous one answers meanwhile
            self._spawn(self._load_quietly(name, newest))
            return self._touch(self._loaded[(name, serving[-1])])
        errors = []
        for v in reversed(vs):
            try:
                return await self._load(name, v)
            except ModelUnavailable as exc:
                errors.append(str(exc))
        raise ModelUnavailable(f"model {name} could not be loaded: {'; '.join(errors)}")

    @staticmethod
    def _touch(m: LoadedModel) -> LoadedModel:
        m.last_used = time.monotonic()
        return m

    async def _load(self, name: str, version: int) -> LoadedModel:
        key = (name, version)
        if key in self._loaded:
            return self._touch(self._loaded[key])
        lock = self._locks.setdefault(key, asyncio.Lock())
        async with lock:
            if key in self._loaded:
                return self._touch(self._loaded[key])
            failed = self._failed.get(key)
            if failed and time.monotonic() - failed[0] < RETRY_FAILED_S:
                raise ModelUnavailable(f"version {version}: {failed[1]}")
            try:
                bundle, session = await anyio.to_thread.run_sync(self._open, name, version)
            except Exception as exc:  # any broken bundle: keep serving the others
                msg = f"{type(exc).__name__}: {exc}"
                if key not in self._failed:
                    log.error("cannot load %s version %s: %s", name, version, msg)
                    self.metrics.load_failures.labels(name, str(version)).inc()
                self._failed[key] = (time.monotonic(), msg)
                raise ModelUnavailable(f"version {version}: {msg}") from exc
            self._failed.pop(key, None)
            model = LoadedModel(name, version, bundle, session)
            model.observe = lambda n, s, m=model: self.metrics.observe_batch(m.name, m.version, n, s)
            if self.settings.batching:
                model.batcher = MicroBatcher(model.run, self.executor, self.settings.max_batch,
                                             self.settings.max_wait_s, on_batch=model.observe,
                                             workers=self.settings.inference_workers)
            self._loaded[key] = model
            self.metrics.loaded.set(len(self._loaded))
            log.info("loaded %s version %s (%s)", name, version, bundle.path)
            return model

    def _open(self, name: str, version: int) -> tuple[Bundle, object]:
        bundle = load_bundle(self.root / name, version)
        session = open_checked_session(bundle, self.settings.intra_op_threads, self.settings.ort_spinning)
        h, w = bundle.input_hw
        session.run([ONNX_OUTPUT], {ONNX_INPUT: np.zeros((1, h, w, 1), np.float32)})  # warm-up
        return bundle, session

    async def _load_quietly(self, name: str, version: int) -> None:
        try:
            await self._load(name, version)
        except ModelUnavailable:
            pass

    def _spawn(self, coro) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    # ------------------------------------------------------------------ rescans

    async def refresh(self) -> None:
        """Re-read the folder, load each model's newest version, drop versions gone or superseded."""
        disk = self.scan(force=True)
        for name, vs in disk.items():
            for v in reversed(vs):  # newest that loads
                try:
                    await self._load(name, v)
                    break
                except ModelUnavailable:
                    continue
        now = time.monotonic()
        for key, model in list(self._loaded.items()):
            name, v = key
            on_disk = disk.get(name, [])
            serving = max((u for u in on_disk if (name, u) in self._loaded), default=None)
            stale = v != serving and now - model.last_used > self.settings.keep_old_seconds
            if v not in on_disk or stale:
                del self._loaded[key]
                self.metrics.loaded.set(len(self._loaded))
                log.info("unloaded %s version %s", name, v)
                await model.close()

    async def run_forever(self) -> None:
        while True:
            try:
                await self.refresh()
            except Exception:  # never let a bad scan stop future scans
                log.exception("model repository scan failed")
            await asyncio.sleep(self.settings.rescan_seconds)

    async def close(self) -> None:
        for task in list(self._background):
            task.cancel()
        for model in self._loaded.values():
            if model.batcher is not None:
                model.batcher.cancel()
        self._loaded.clear()
        self.executor.shutdown(wait=False, cancel_futures=True)

"""The model repository as the server sees it: MODELS/<name>/<version>/ read through `covid_cxr.bundle`.

The newest version of each model is loaded into ONNX Runtime and served unless a request names a
version (older versions load on demand and are dropped again after `keep_old_seconds` unused).
The folder is re-read every `rescan_seconds` (by a background task, and by requests when the last
read is older than that), so a bundle renamed into place is served without a restart; until it has
loaded, the previous version keeps answering, as TensorFlow Serving does.

Whatever is odd in the folder stays that folder's problem: names that cannot be models, folders
that cannot be read and bundles that do not load are left out and logged (once each), the others
are served; an unreadable repository keeps the last good listing. Error messages that reach
clients name files relative to the repository, never by their absolute path.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from concurrent.futures import ThreadPoolExecutor
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import anyio.to_thread
import numpy as np

from covid_cxr.bundle import (
    ONNX_INPUT,
    ONNX_OUTPUT,
    OOD_OUTPUTS,
    Bundle,
    clean_stale,
    load_bundle,
    open_checked_session,
    valid_name,
    versions,
)
from covid_cxr.bundle.reader import Answers, BundleError, read_json_file, run_classifier
from covid_cxr.lungs.crop import bundle_segmenter
from covid_cxr.serve.batching import BatcherClosed, MicroBatcher, split
from covid_cxr.serve.metrics import Metrics
from covid_cxr.serve.settings import ServeSettings
from covid_cxr.site.monitor import MonitorCollector, ShiftMonitor

log = logging.getLogger("covid_cxr.serve")
RETRY_FAILED_S = 30.0  # a broken bundle is retried this often, not at every scan
CLEAN_STAGING_S = 300.0
UNKNOWN_MODEL = "(unknown)"  # the one metrics label for every name that is not a model being served  # how often staging folders left by killed writers are looked for
_ABS_PATH = re.compile(r"(?<![\w.:/])/(?:[^\s/'\":]+/)+([^\s/'\":]*)")


def strip_paths(text: str) -> str:
    """Every absolute path in `text` cut to its last part ('/srv/models/m/1/model.onnx' -> 'model.onnx')."""
    return _ABS_PATH.sub(lambda m: m.group(1) or "/", text)


class InvalidModelName(ValueError):
    """The name could never be a model folder (separators, '..', odd characters): 400."""


class ModelNotFound(LookupError):
    """No such model, or no such version of it: 404."""


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
    max_batch: int = 4
    monitor: ShiftMonitor | None = field(default=None, repr=False)  # the site monitor's window of answers
    threads: int = 0  # ONNX Runtime intra-op threads for cam.onnx (the server's setting)
    last_used: float = field(default_factory=time.monotonic)

    @property
    def classes(self) -> list[str]:
        return self.bundle.classes

    @property
    def input_hw(self) -> tuple[int, int]:
        return self.bundle.input_hw

    def run(self, x: np.ndarray) -> np.ndarray:
        """One ONNX Runtime call (blocking) on prepared input (`prepare`): n x H x W x 1 float32 ->
        n x classes; with an out-of-distribution gate, ood_score and in_distribution follow."""
        probs, score, inside = run_classifier(self.bundle, self.session, x, prepared=True)
        if score is None:
            return probs
        return np.concatenate([probs, score[:, None], inside[:, None].astype(probs.dtype)], axis=1)

    def prepare(self, x: np.ndarray) -> np.ndarray:
        """n x H x W x 1 -> what model.onnx takes (the bundle's lung crop, if any; else `x` itself).
        Done per request, before the batcher, so the upload API can hand the same prepared pixels
        to Grad-CAM instead of cropping the lungs a second time."""
        if self.bundle.metadata.lung_crop is None:
            return x
        return self.bundle.prepare(x[..., 0])[..., None]

    def preparing(self):
        """Context for the time a request spends decoding its input (lets the batcher wait for it)."""
        return self.batcher.preparing() if self.batcher is not None else nullcontext()

    async def predict(self, x: np.ndarray) -> np.ndarray:
        """n x classes probabilities (what serving_default answers)."""
        return (await self.predict_rows(x))[:, :len(self.classes)]

    async def predict_with_ood(self, x: np.ndarray, prepared: bool = False
                               ) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
        """(probabilities, ood_score, in_distribution as bool); the last two None without a gate.
        `prepared`: `x` already went through `prepare`."""
        rows = await self.predict_rows(x, prepared)
        c = len(self.classes)
        if rows.shape[1] == c:
            return rows, None, None
        return rows[:, :c], rows[:, c], rows[:, c + 1] > 0.5

    async def answer(self, x: np.ndarray, prepared: bool = False) -> Answers:
        """Probabilities, the bundle's decided labels and the gate's verdict (the upload API's answer)."""
        return self.bundle.answers(*await self.predict_with_ood(x, prepared))

    async def outputs(self, x: np.ndarray) -> dict[str, np.ndarray]:
        """Every ONNX output by name (what the Open Inference Protocol answers), through the same
        batcher as `predict`: in_distribution as model.onnx gives it (float 0 / 1)."""
        probs, score, inside = await self.predict_with_ood(x)
        if score is None:
            return {ONNX_OUTPUT: probs}
        return dict(zip((ONNX_OUTPUT, *OOD_OUTPUTS), (probs, score, inside.astype(probs.dtype))))

    async def predict_rows(self, x: np.ndarray, prepared: bool = False) -> np.ndarray:
        if not prepared and self.bundle.metadata.lung_crop is not None:
            x = await anyio.to_thread.run_sync(self.prepare, x)
        rows = await self._predict_rows(x)
        if self.monitor is not None:
            self.monitor.append(rows)  # the monitor's only work on the request path
        return rows

    async def _predict_rows(self, x: np.ndarray) -> np.ndarray:
        self.last_used = time.monotonic()
        if self.batcher is not None:
            try:
                return await self.batcher.submit(x)
            except BatcherClosed:
                pass  # unloaded between lookup and submit: this one request runs on its own
        parts = []
        for part in split(x, self.max_batch):  # never one call larger than max_batch
            t0 = time.perf_counter()
            parts.append(await anyio.to_thread.run_sync(self.run, part))
            if self.observe is not None:
                self.observe(len(part), time.perf_counter() - t0)
        return parts[0] if len(parts) == 1 else np.concatenate(parts)

    def gradcam_png(self, pixels: np.ndarray, class_index: int) -> bytes:
        """Grad-CAM overlay PNG (blocking)."""
        return self.gradcam(pixels, class_index)[0]

    def gradcam(self, pixels: np.ndarray, class_index: int, prepared: bool = False) -> tuple[bytes, np.ndarray]:
        """(overlay PNG, raw map H x W in [0, 1]) at the model's input size (blocking), from the
        bundle's cam.onnx through ONNX Runtime: the server never imports torch. A bundle without
        cam.onnx raises NoCamGraph, whose message says how to add one. `prepared`: `pixels` already
        went through `prepare` (the upload API's, reused)."""
        from covid_cxr.explain.render import cam_overlay

        return cam_overlay(self.bundle, pixels, class_index, threads=self.threads, spinning=False, prepared=prepared)

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
        self._tasks: dict[Path, tuple[int, str | None]] = {}  # metadata.json -> (mtime, task)
        self._scanned_at = float("-inf")
        self._loaded: dict[tuple[str, int], LoadedModel] = {}
        self._failed: dict[tuple[str, int], tuple[float, str]] = {}
        self._locks: dict[tuple[str, int], asyncio.Lock] = {}
        self._background: set[asyncio.Task] = set()
        self._reported: set[str] = set()
        self._cleaned_at = float("-inf")
        metrics.registry.register(MonitorCollector(self.monitors))

    def monitors(self) -> list[tuple[str, int, ShiftMonitor]]:
        """(name, version, monitor) of every loaded model version that has one (Prometheus gauges)."""
        return [(m.name, m.version, m.monitor) for m in list(self._loaded.values()) if m.monitor is not None]

    # ------------------------------------------------------------------ disk

    def scan(self, force: bool = False) -> dict[str, list[int]]:
        """Model names and complete versions on disk; re-read at most every `rescan_seconds`."""
        now = time.monotonic()
        if force or now - self._scanned_at >= self.settings.rescan_seconds:
            self._disk = self._read_disk()
            self._scanned_at = now
        return self._disk

    def _is_segmentation(self, version_dir: Path) -> bool:
        """A segmentation bundle (the lung model) is not served as a model: it has no class
        probabilities (`serve --lungs` uses it beside the classifiers). Its metadata.json is parsed
        once per file (keyed by mtime), not at every rescan."""
        meta = version_dir / "metadata.json"
        try:
            stamp = meta.stat().st_mtime_ns
            known = self._tasks.get(meta)
            if known is None or known[0] != stamp:
                raw = read_json_file(meta)
                known = (stamp, raw.get("task") if isinstance(raw, dict) else None)
                self._tasks[meta] = known
        except (OSError, BundleError):
            return False  # unreadable: loading reports it, for this model only
        return known[1] == "segmentation"

    def _read_disk(self) -> dict[str, list[int]]:
        try:
            entries = sorted(self.root.iterdir())
        except FileNotFoundError:
            self._report(str(self.root), f"model repository {self.root} does not exist")
            return {}
        except OSError as exc:  # a transient fault must not unload every model: keep the last listing
            self._report(str(self.root), f"cannot read model repository {self.root}: {exc}")
            return self._disk
        found: dict[str, list[int]] = {}
        for p in entries:
            if p.name.startswith("."):
                continue  # .work, staging folders
            if not valid_name(p.name):
                self._report(p.name, f"ignoring {p}: not a model name (letters, digits, '_', '-', '.')")
                continue
            try:
                vs = versions(p)
                segmentation = bool(vs) and self._is_segmentation(p / str(vs[-1]))
            except Exception as exc:  # this model only: the others are still served
                self._report(p.name, f"ignoring model folder {p}: {type(exc).__name__}: {exc}")
                vs, segmentation = self._disk.get(p.name, []), False
            if vs and not segmentation:  # a lung model helps; it is not served
                found[p.name] = vs
        return found

    def _report(self, key: str, message: str) -> None:
        """Log each repository problem once, not at every scan."""
        if key not in self._reported:
            self._reported.add(key)
            log.warning(message)

    def public(self, message: str) -> str:
        """A message as clients may see it: repository paths relative to the repository, any other
        absolute path cut to its last part (no filesystem layout leaks to unauthenticated clients)."""
        roots = {str(self.root), str(self.root.absolute()), str(self.root.resolve())} - {".", ""}
        for root in sorted(roots, key=len, reverse=True):
            message = message.replace(root.rstrip("/") + "/", "")
        return strip_paths(message)

    def names(self) -> list[str]:
        return list(self.scan())

    def disk_versions(self, name: str) -> list[int]:
        self.check_name(name)
        vs = self.scan().get(name)
        if not vs:
            raise ModelNotFound(f"Servable not found for request: Latest({name})")
        return vs

    def metric_label(self, name: str) -> str:
        """The model label a request is counted under: its name if the repository holds that model
        (as last listed; no disk read), else UNKNOWN_MODEL, so clients cannot grow /metrics with
        names of their own ("" for requests that name no model)."""
        return name if not name or name in self._disk else UNKNOWN_MODEL

    @staticmethod
    def check_name(name: str) -> None:
        if not valid_name(name):
            raise InvalidModelName(f"invalid model name {name!r}: letters, digits, '_', '-', '.' only")

    # ------------------------------------------------------------------ loading

    def loaded(self) -> list[LoadedModel]:
        return list(self._loaded.values())

    def unavailable(self) -> dict[str, str]:
        """Models on disk with no version loaded and a load failure on record: name -> why."""
        serving = {m.name for m in self._loaded.values()}
        return {name: err for (name, _), (_, err) in sorted(self._failed.items())
                if name in self._disk and name not in serving}

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
                raise ModelUnavailable(f"version {version}: {self._failure(key, exc)}") from exc
            self._failed.pop(key, None)
            model = LoadedModel(name, version, bundle, session, max_batch=self.settings.max_batch,
                                threads=self.settings.intra_op_threads)
            model.observe = lambda n, s, m=model: self.metrics.observe_batch(m.name, m.version, n, s)
            if self.settings.monitor_window:
                model.monitor = ShiftMonitor(bundle.metadata.site_reference, bundle.classes,
                                             self.settings.monitor_window)
            if self.settings.batching:
                model.batcher = MicroBatcher(model.run, self.executor, self.settings.max_batch,
                                             self.settings.max_wait_s, on_batch=model.observe,
                                             workers=self.settings.inference_workers)
            self._loaded[key] = model
            self.metrics.loaded.set(len(self._loaded))
            log.info("loaded %s version %s (%s)", name, version, bundle.path)
            return model

    def _failure(self, key: tuple[str, int], exc: Exception) -> str:
        """Log a load failure (in full, once) and remember it; returns what clients are told."""
        if key not in self._failed:
            log.error("cannot load %s version %s: %s: %s", *key, type(exc).__name__, exc)
            self.metrics.load_failures.labels(key[0], str(key[1])).inc()
        msg = self.public(f"{type(exc).__name__}: {exc}")
        self._failed[key] = (time.monotonic(), msg)
        return msg

    def _open(self, name: str, version: int) -> tuple[Bundle, object]:
        bundle = load_bundle(self.root / name, version, self.settings.runtime, self.settings.precision)
        session = open_checked_session(bundle, self.settings.intra_op_threads, self.settings.ort_spinning)
        h, w = bundle.input_hw
        session.run([ONNX_OUTPUT], {ONNX_INPUT: np.zeros((1, h, w, 1), np.float32)})  # warm-up
        if bundle_segmenter(bundle, self.settings.intra_op_threads, self.settings.ort_spinning) is not None:
            bundle.prepare(np.zeros((1, h, w), np.float32))  # opens (and warms) its lung model now
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
        if time.monotonic() - self._cleaned_at >= CLEAN_STAGING_S:
            self._cleaned_at = time.monotonic()
            await anyio.to_thread.run_sync(self.clean_staging)
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

    def clean_staging(self) -> None:
        """Remove staging folders left by killed bundle writers (see `bundle.store.clean_stale`)."""
        try:
            folders = [p for p in self.root.iterdir() if valid_name(p.name) and p.is_dir()]
        except OSError:
            return
        for folder in folders:
            for p in clean_stale(folder):
                log.info("removed stale staging folder %s", p)

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

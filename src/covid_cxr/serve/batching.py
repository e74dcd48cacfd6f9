"""Micro-batching: concurrent requests for one model version share one ONNX Runtime call.

One asyncio task per model version owns a queue. It takes the first waiting request, then every
request already queued (up to `max_batch` images), and, while other requests for the same model are
still being decoded, waits at most `max_wait_s` for them. With a single client nothing is ever
waited for (no request is being decoded), so batching costs no latency at concurrency 1; under
load, requests pile up while the previous batch runs and the next call takes them all.

ONNX Runtime runs in a worker thread (the event loop stays free to accept and decode requests);
`workers` calls at a time (default one, since each call already uses every core: intra-op threads =
cores); while they are all busy, requests pile up for the next batch.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Executor
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import numpy as np


class BatcherClosed(RuntimeError):
    pass


def split(x: np.ndarray, size: int) -> list[np.ndarray]:
    """`x` in consecutive parts of at most `size` rows (views, no copy)."""
    return [x[i:i + size] for i in range(0, len(x), size)] or [x]


@dataclass
class _Item:
    x: np.ndarray  # n x H x W x 1
    future: asyncio.Future = field(repr=False)

    @property
    def n(self) -> int:
        return len(self.x)


class MicroBatcher:
    def __init__(self, run: Callable[[np.ndarray], np.ndarray], executor: Executor, max_batch: int,
                 max_wait_s: float, on_batch: Callable[[int, float], None] | None = None, workers: int = 1):
        self._run = run
        self._executor = executor
        self.max_batch = max_batch
        self.max_wait_s = max_wait_s
        self._on_batch = on_batch
        self._items: deque[_Item] = deque()
        self._wake: asyncio.Event | None = None
        self._task: asyncio.Task | None = None
        self._workers = workers
        self._running: set[asyncio.Task] = set()
        self._preparing = 0
        self._closed = False

    @asynccontextmanager
    async def preparing(self):
        """Mark a request for this model as being decoded: the batcher may wait a moment for it."""
        self._preparing += 1
        try:
            yield
        finally:
            self._preparing -= 1

    async def submit(self, x: np.ndarray) -> np.ndarray:
        """Probabilities for `x` (n x H x W x 1), computed in some batch with other requests.

        A request of more than `max_batch` images is queued as several items of at most `max_batch`
        each, so no ONNX Runtime call (and no memory arena) ever grows past `max_batch`."""
        if self._closed:
            raise BatcherClosed("model version is being unloaded")
        loop = asyncio.get_running_loop()
        if self._task is None:
            self._wake = asyncio.Event()
            self._task = loop.create_task(self._loop(), name="covid-cxr-batcher")
        items = [_Item(part, loop.create_future()) for part in split(x, self.max_batch)]
        self._items.extend(items)
        self._wake.set()
        try:
            parts = [await it.future for it in items]
        except BaseException:
            for it in items:  # the client is gone or one part failed: the rest need not run
                it.future.cancel()
            raise
        return parts[0] if len(parts) == 1 else np.concatenate(parts)

    async def close(self) -> None:
        """Finish what is queued, then stop the task."""
        self._closed = True
        if self._task is None:
            return
        self._wake.set()
        try:
            await self._task
        except asyncio.CancelledError:
            pass

    def cancel(self) -> None:
        """Stop at once (app shutdown): queued requests fail."""
        self._closed = True
        if self._task is not None:
            self._task.cancel()

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        slots = asyncio.Semaphore(self._workers)
        try:
            while True:
                await slots.acquire()  # a free worker first: meanwhile, requests pile up
                while not self._items:
                    if self._closed:
                        await asyncio.gather(*self._running)
                        return
                    self._wake.clear()
                    await self._wake.wait()
                batch = [self._items.popleft()]
                size = batch[0].n
                deadline = loop.time() + self.max_wait_s
                while size < self.max_batch:
                    if self._items:
                        if size + self._items[0].n > self.max_batch:
                            break
                        item = self._items.popleft()
                        batch.append(item)
                        size += item.n
                        continue
                    remaining = deadline - loop.time()
                    if self._preparing <= 0 or remaining <= 0:
                        break
                    self._wake.clear()
                    try:
                        await asyncio.wait_for(self._wake.wait(), remaining)
                    except asyncio.TimeoutError:
                        break
                task = loop.create_task(self._execute(loop, batch))
                self._running.add(task)
                task.add_done_callback(lambda t: (self._running.discard(t), slots.release()))
        except asyncio.CancelledError:
            for task in self._running:
                task.cancel()
            for item in self._items:
                if not item.future.done():
                    item.future.set_exception(BatcherClosed("server shutting down"))
            raise

    async def _execute(self, loop: asyncio.AbstractEventLoop, batch: list[_Item]) -> None:
        batch = [it for it in batch if not it.future.done()]  # a client that went away is skipped
        if not batch:
            return
        x = batch[0].x if len(batch) == 1 else np.concatenate([it.x for it in batch])
        t0 = time.perf_counter()
        try:
            out = await loop.run_in_executor(self._executor, self._run, x)
        except BaseException as exc:  # the whole call failed (or shutdown): every request in it hears why
            error = exc if isinstance(exc, Exception) else BatcherClosed("server shutting down")
            for it in batch:
                if not it.future.done():
                    it.future.set_exception(error)
            if not isinstance(exc, Exception):
                raise
            return
        seconds = time.perf_counter() - t0
        if self._on_batch is not None:
            self._on_batch(len(x), seconds)
        start = 0
        for it in batch:
            if not it.future.done():
                it.future.set_result(out[start:start + it.n])
            start += it.n

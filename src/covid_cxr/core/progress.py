"""One way to report progress on long work: a rich bar on a terminal; in a log (stderr not a
terminal), one line every few seconds with the count, the rate and the time left. Lines name the
step in hand (`step("member 2/3")`), so a log of a long recipe says what is running."""

from __future__ import annotations

import sys
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import TypeVar

T = TypeVar("T")
EVERY_S = 5.0  # a log line at most this often (and at the end)
_STEP: ContextVar[str] = ContextVar("covid_cxr_step", default="")


@contextmanager
def step(name: str):
    """Name the work in hand for every progress line inside (nested names join with ', ')."""
    outer = _STEP.get()
    token = _STEP.set(f"{outer}, {name}" if outer else name)
    try:
        yield
    finally:
        _STEP.reset(token)


def on_terminal() -> bool:
    return sys.stderr.isatty()


def say(message: str) -> None:
    """One progress line on stderr, prefixed with the time and the current step."""
    where = _STEP.get()
    sys.stderr.write(f"[{time.strftime('%H:%M:%S')}] {where + ': ' if where else ''}{message}\n")
    sys.stderr.flush()


def duration(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


def progress_iter(items: Iterable[T], description: str, enabled: bool = True,
                  total: int | None = None, every: float = EVERY_S) -> Iterator[T]:
    """Iterate, reporting progress: a transient rich bar on a terminal, log lines otherwise."""
    if not enabled:
        yield from items
        return
    if total is None and hasattr(items, "__len__"):
        total = len(items)  # type: ignore[arg-type]
    if on_terminal():
        from rich.progress import track

        yield from track(items, description=description, total=total, transient=True)
        return
    yield from _logged(items, description, total, every)


def _logged(items: Iterable[T], description: str, total: int | None, every: float) -> Iterator[T]:
    start = last = time.perf_counter()
    done = 0
    for item in items:
        yield item
        done += 1
        now = time.perf_counter()
        if now - last >= every and done != total:
            last = now
            say(_line(description, done, total, now - start))
    say(_line(description, done, total, time.perf_counter() - start) + " done")


def _line(description: str, done: int, total: int | None, elapsed: float) -> str:
    rate = done / elapsed if elapsed > 0 else 0.0
    text = f"{description} {done}/{total}" if total else f"{description} {done}"
    text += f" ({rate:.1f}/s"
    if total and rate > 0 and done < total:
        text += f", {duration((total - done) / rate)} left"
    return text + f", {duration(elapsed)})"

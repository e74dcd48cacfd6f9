"""`covid-cxr score --ray [--ray-address ADDRESS]`: the same Scorer on Ray, one actor per worker.

The driver hands each actor lists of 64 paths, two ahead, and gathers the tables (Ray Core actors).
Ray Data's map_batches, the first engine, is kept beside it (ENGINE = "data") for the benchmark:
benchmarks/bench_score.py measured the driver at 1.7-2.1 CPU ms per image under Ray Data against
0.2-0.3 under the actors, CPU that a 2-core machine takes from its two workers, and a start-up
(first rows back) 1.5-3x longer (docs/results/performance.md). Each worker opens the bundle itself (from its path: covid-cxr must be installed where the workers
run, and the bundle folder and the images readable there under the same paths) and decodes and scores its batches; the driver writes the parts,
so resuming works as in one process. `ray` is "local" (a Ray cluster started in this process, one
CPU per worker) or the address of a running cluster ("auto", "ray://host:10001", "host:6379").
"""

from __future__ import annotations

import logging
from pathlib import Path

from covid_cxr.core.errors import UserError
from covid_cxr.score.archive import BATCH

log = logging.getLogger("covid_cxr.score")
ENGINE = "actors"  # how `score --ray` spreads the work: "actors" or "data" (see ray_tables)


def start_ray(address: str, cpus: int) -> bool:
    """Connect to (or, for "local", start with `cpus` CPUs) a Ray cluster; True when this call started
    or joined it (and should leave it at the end)."""
    try:
        import ray
    except ImportError:
        raise UserError("--ray needs Ray: pip install 'covid-cxr[archive]'") from None
    if ray.is_initialized():
        return False
    kwargs = dict(include_dashboard=False, log_to_driver=False, logging_level=logging.WARNING)
    try:
        if address == "local":
            ray.init(num_cpus=cpus, **kwargs)
        else:
            ray.init(address=address, **kwargs)
    except (ConnectionError, ValueError, RuntimeError) as exc:
        where = "--ray" if address == "local" else f"--ray-address {address}"
        raise UserError(f"{where}: cannot reach a Ray cluster: {str(exc).splitlines()[0]}") from None
    return True


def ray_tables(bundle_path: Path, root: Path, todo: list[str], address: str, workers: int, threads: int,
               part_rows: int, engine: str | None = None):
    """Tables of scored rows from `workers` Ray actors, `part_rows` rows at a time (any order).
    `engine`: "actors" (Ray Core actors fed batches by the driver) or "data" (Ray Data map_batches)."""
    started = start_ray(address, workers * threads)
    import ray

    try:
        scored = _actor_scored if (engine or ENGINE) == "actors" else _scored
        yield from scored(bundle_path, root, todo, workers, threads, part_rows)
    finally:
        if started:
            ray.shutdown()


def _actor_scored(bundle_path: Path, root: Path, todo: list[str], workers: int, threads: int, part_rows: int):
    """`workers` Scorer actors, each kept two batches ahead (one running, one queued): the driver only
    hands out lists of paths and gathers tables, so it takes little CPU from the workers' cores."""
    import pyarrow as pa
    import ray

    from covid_cxr.score.archive import Scorer

    actor = ray.remote(num_cpus=threads, max_restarts=0)(Scorer)
    actors = [actor.remote(str(bundle_path), str(root), threads) for _ in range(workers)]
    batches = iter([todo[i:i + BATCH] for i in range(0, len(todo), BATCH)])
    pending = {}
    for a in actors * 2:
        if (paths := next(batches, None)) is not None:
            pending[a.table.remote(paths)] = a
    done, rows = [], 0
    try:
        while pending:
            (ref,), _ = ray.wait(list(pending), num_returns=1)
            a = pending.pop(ref)
            if (paths := next(batches, None)) is not None:
                pending[a.table.remote(paths)] = a
            done.append(ray.get(ref))
            rows += done[-1].num_rows
            if rows >= part_rows:
                yield pa.concat_tables(done)
                done, rows = [], 0
        if done:
            yield pa.concat_tables(done)
    finally:
        for a in actors:
            ray.kill(a)


def _scored(bundle_path: Path, root: Path, todo: list[str], workers: int, threads: int, part_rows: int):
    import pyarrow as pa
    import ray.data

    from covid_cxr.score.archive import Scorer

    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.verbose_progress = False
    blocks = max(workers * 4, len(todo) // (BATCH * 4) or 1)
    ds = ray.data.from_items([{"path": p} for p in todo], override_num_blocks=min(blocks, len(todo)))
    scored = ds.map_batches(Scorer, fn_constructor_kwargs={"bundle": str(bundle_path), "root": str(root),
                                                           "threads": threads},
                            batch_size=BATCH, batch_format="pyarrow", concurrency=workers, num_cpus=threads)
    for batch in scored.iter_batches(batch_size=part_rows, batch_format="pyarrow"):
        yield batch if isinstance(batch, pa.Table) else pa.Table.from_batches([batch])

"""`covid-cxr score --ray [--ray-address ADDRESS]`: the same Scorer on Ray Data, one actor per worker.

Each worker opens the bundle itself (from its path: covid-cxr must be installed where the workers
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


def start_ray(address: str, cpus: int) -> bool:
    """Connect to (or, for "local", start with `cpus` CPUs) a Ray cluster; True when this call started
    or joined it (and should leave it at the end)."""
    try:
        import ray
    except ImportError:
        raise UserError("--ray needs Ray Data: pip install 'covid-cxr[archive]'") from None
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
               part_rows: int):
    """Tables of scored rows from `workers` Ray actors, `part_rows` rows at a time (any order)."""
    started = start_ray(address, workers * threads)
    import ray

    try:
        yield from _scored(bundle_path, root, todo, workers, threads, part_rows)
    finally:
        if started:
            ray.shutdown()


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

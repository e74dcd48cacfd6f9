"""`covid-cxr score --model M --data DIR_OR_MANIFEST --out preds.parquet`: one row per image.

The output is a Parquet dataset, a folder of parts (`part-<run>-<n>.parquet`) that pyarrow, pandas,
DuckDB and Spark read as one table. Each part is written to a hidden name and renamed, so a part is
whole or absent; a run that is stopped and started again reads the paths already in the parts and
scores the rest. Rows: `path` (relative to the folder, or to the manifest's folder), one `prob:<class>`
column per class, `ood_score` and `in_distribution` (the gate), `label` (the bundle's operating point,
else the most probable class; null when the gate rejects the image or it could not be read), `error`
(why an image could not be scored), `model`, `version`.
"""

from __future__ import annotations

import csv
import logging
import os
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from covid_cxr.bundle.reader import Bundle, load_bundle, open_checked_session
from covid_cxr.core.errors import UserError

log = logging.getLogger("covid_cxr.score")
PART_ROWS = 4096  # rows per Parquet part: what a crash can cost, and the unit of resuming
BATCH = 64  # images per ONNX Runtime call
PROGRESS_EVERY_S = 5.0
META_MODEL = b"covid_cxr.model"  # the parts' schema metadata: which bundle wrote them


@dataclass
class ScoreSummary:
    total: int  # images listed
    skipped: int  # already in the output (resumed)
    scored: int  # rows written by this run
    errors: int  # of them, images that could not be read
    rejected: int  # of them, images the gate rejected
    seconds: float
    parts: int
    first: tuple[float, int] = (0.0, 0)  # (seconds, rows) when the first rows came back: the start-up

    @property
    def rate(self) -> float:
        return self.scored / self.seconds if self.seconds > 0 else 0.0

    @property
    def steady_rate(self) -> float:
        """Images per second after the first rows came back: what a long archive runs at, start-up
        (Ray workers, bundle loading) left out."""
        s, n = self.first
        return (self.scored - n) / (self.seconds - s) if self.seconds > s and self.scored > n else 0.0


def list_images(source: Path) -> tuple[Path, list[str]]:
    """(root, paths relative to it): a folder's PNG/JPEG/DICOM files, or a manifest CSV's `path`
    column (relative paths are taken from the manifest's folder)."""
    from covid_cxr.data.files import collect_images

    source = Path(source)
    if source.is_dir():
        files, problems = collect_images([source])
        if problems:
            raise UserError(f"{source}: {problems[0][1]}")
        return source, [f.relative_to(source).as_posix() for f in files]
    if not source.is_file():
        raise UserError(f"{source}: no such folder or manifest")
    try:
        with open(source, newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            if "path" not in (reader.fieldnames or []):
                raise UserError(f"{source}: a manifest is a CSV file with a 'path' column (found: "
                                f"{', '.join(reader.fieldnames or []) or 'no header'})")
            paths = [row["path"] for row in reader if row.get("path")]
    except (UnicodeDecodeError, csv.Error) as exc:
        raise UserError(f"{source}: not a CSV manifest: {exc}") from None
    if not paths:
        raise UserError(f"{source}: the manifest lists no images")
    return source.parent, list(dict.fromkeys(paths))


def schema(bundle: Bundle):
    """The Parquet schema of the rows (probability columns named after the bundle's classes)."""
    import pyarrow as pa

    fields = [pa.field("path", pa.string(), nullable=False)]
    fields += [pa.field(f"prob:{c}", pa.float32()) for c in bundle.classes]
    fields += [pa.field("ood_score", pa.float32()), pa.field("in_distribution", pa.bool_()),
               pa.field("label", pa.string()), pa.field("error", pa.string()),
               pa.field("model", pa.string()), pa.field("version", pa.int32())]
    return pa.schema(fields, metadata={META_MODEL: f"{bundle.name} v{bundle.version} {','.join(bundle.classes)}"})


class Scorer:
    """Decode, run and label images of one bundle; a row per image, errors as rows. One per process
    (or per Ray worker): `threads` is its ONNX Runtime intra-op thread count (0: all cores)."""

    def __init__(self, bundle: Bundle | str | Path, root: str | Path, threads: int = 0):
        self.bundle = bundle if isinstance(bundle, Bundle) else load_bundle(bundle)  # a Ray worker gets a path
        self.bundle._session = open_checked_session(self.bundle, threads, spinning=False)
        self.root = Path(root)
        self.schema = schema(self.bundle)

    def _answer(self, paths: list[str]):
        """Decode one batch at a time (a part's images are never all in memory) and answer it as every
        other door does (`Bundle.answer`: preparation, operating point, gate); unreadable files
        become error strings."""
        from covid_cxr.data.decode import DecodeError, load_for_model

        n, k = len(paths), len(self.bundle.classes)
        probs = np.full((n, k), np.nan, np.float32)
        score, inside, picked = np.full(n, np.nan, np.float32), np.ones(n, bool), np.zeros(n, int)
        errors: list[str | None] = [None] * n
        for start in range(0, n, BATCH):
            idx, pixels = [], []
            for i in range(start, min(start + BATCH, n)):
                try:
                    pixels.append(load_for_model(self.root / paths[i], *self.bundle.input_hw))
                    idx.append(i)
                except (DecodeError, OSError, ValueError) as exc:
                    errors[i] = str(exc) or type(exc).__name__
            if idx:
                ans = self.bundle.answer(np.stack(pixels))
                probs[idx], picked[idx] = ans.probabilities, ans.labels
                if ans.ood_score is not None:
                    score[idx], inside[idx] = ans.ood_score, ans.in_distribution
        return probs, score, inside, picked, errors

    def table(self, paths: list[str]):
        """A pyarrow Table of the rows for `paths`, in their order."""
        import pyarrow as pa

        n, classes = len(paths), self.bundle.classes
        probs, score, inside, picked, errors = self._answer(paths)
        ok = np.array([e is None for e in errors], bool)
        gated = self.bundle.has_ood
        labels = [classes[k] if ok[i] and inside[i] else None for i, k in enumerate(picked)]
        cols = {"path": pa.array(paths, pa.string())}
        for j, c in enumerate(classes):
            cols[f"prob:{c}"] = pa.array(probs[:, j], pa.float32(), mask=~ok)
        cols["ood_score"] = pa.array(score, pa.float32(), mask=~ok if gated else np.ones(n, bool))
        cols["in_distribution"] = pa.array(inside, pa.bool_(), mask=~ok if gated else np.ones(n, bool))
        cols["label"] = pa.array(labels, pa.string())
        cols["error"] = pa.array(errors, pa.string())
        cols["model"] = pa.array([self.bundle.name] * n, pa.string())
        cols["version"] = pa.array(np.full(n, self.bundle.version, np.int32), pa.int32())
        return pa.Table.from_pydict(cols, schema=self.schema)

    def __call__(self, batch):
        """Ray Data's batch function: a pyarrow batch with a `path` column -> the rows."""
        return self.table([str(p) for p in batch["path"].to_pylist()])


class Parts:
    """The output folder: its existing parts (which paths are done, by which bundle) and new parts,
    each written to a hidden file, fsynced and renamed into place."""

    def __init__(self, out: Path, schema_):
        self.out, self.schema = Path(out), schema_
        # unique per run, even for two runs of one process within a second (a resumed run must never
        # overwrite the parts of the run it resumes)
        self.run = time.strftime("%Y%m%dT%H%M%S") + f"-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self.written = 0
        if self.out.exists() and not self.out.is_dir():
            raise UserError(f"{self.out}: exists and is not a folder (the output is a folder of Parquet parts)")

    def existing(self) -> list[Path]:
        return sorted(self.out.glob("part-*.parquet")) if self.out.is_dir() else []

    def done(self) -> set[str]:
        """Paths already scored; refuses parts written by another bundle (their columns differ)."""
        import pyarrow.parquet as pq

        want = self.schema.metadata[META_MODEL]
        done: set[str] = set()
        for part in self.existing():
            try:
                found = (pq.read_schema(part).metadata or {}).get(META_MODEL)
                if found != want:
                    raise UserError(f"{part}: written by {(found or b'another program').decode()}, not "
                                    f"{want.decode()}: choose another --out")
                done.update(pq.read_table(part, columns=["path"]).column("path").to_pylist())
            except (OSError, ValueError) as exc:  # pyarrow's errors for a damaged file
                raise UserError(f"{part}: unreadable Parquet part ({exc}); remove it to score its images again") from None
        return done

    def write(self, table) -> None:
        import pyarrow.parquet as pq

        if table.num_rows == 0:
            return
        self.out.mkdir(parents=True, exist_ok=True)
        final = self.out / f"part-{self.run}-{self.written:05d}.parquet"
        fd, tmp = tempfile.mkstemp(dir=self.out, prefix=".", suffix=".parquet.tmp")
        try:
            with os.fdopen(fd, "wb") as f:
                pq.write_table(table.replace_schema_metadata(self.schema.metadata), f, compression="zstd")
                f.flush()
                os.fsync(f.fileno())
            os.chmod(tmp, 0o644)
            os.replace(tmp, final)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        self.written += 1


class Progress:
    """A log line at most every few seconds: done/total, rate, ETA (readable in a log file)."""

    def __init__(self, total: int, skipped: int):
        self.total, self.skipped = total, skipped
        self.done = self.errors = self.rejected = 0
        self.t0 = self.last = time.perf_counter()
        self.first = (0.0, 0)

    def add(self, table) -> None:
        import pyarrow.compute as pc

        if not self.done:
            self.first = (time.perf_counter() - self.t0, table.num_rows)
        self.done += table.num_rows
        self.errors += table.num_rows - table.column("error").null_count
        self.rejected += int(pc.sum(pc.invert(table.column("in_distribution"))).as_py() or 0)
        now = time.perf_counter()
        if now - self.last >= PROGRESS_EVERY_S:
            self.last = now
            rate = self.done / (now - self.t0)
            left = self.total - self.skipped - self.done
            log.info("score: %d/%d images, %.1f/s, ETA %s (%d before)", self.skipped + self.done, self.total,
                     rate, time.strftime("%H:%M:%S", time.gmtime(left / max(rate, 1e-9))), self.skipped)

    def summary(self, parts: int) -> ScoreSummary:
        return ScoreSummary(self.total, self.skipped, self.done, self.errors, self.rejected,
                            time.perf_counter() - self.t0, parts, self.first)


def _local(bundle: Bundle, root: Path, todo: list[str], threads: int, part_rows: int):
    """One process: the parts' tables, in order."""
    scorer = Scorer(bundle, root, threads)
    for start in range(0, len(todo), part_rows):
        yield scorer.table(todo[start:start + part_rows])


def score_archive(model: str | Path, data: str | Path, out: str | Path, threads: int = 0,
                  part_rows: int = PART_ROWS, ray: str | None = None, workers: int = 1) -> ScoreSummary:
    """Score every image of `data` (folder or manifest CSV) not yet in `out`; see the module doc.
    `ray`: None (this process), "local" (a Ray cluster started here) or a Ray cluster's address,
    with `workers` Ray workers of `threads` ONNX Runtime threads each."""
    bundle = load_bundle(model)
    if bundle.metadata.task != "classification":
        raise UserError(f"{bundle.path}: a {bundle.metadata.task} model; score needs a classifier")
    root, paths = list_images(Path(data))
    parts = Parts(Path(out), schema(bundle))
    done = parts.done()
    todo = [p for p in paths if p not in done]
    progress = Progress(len(paths), len(paths) - len(todo))
    log.info("score: %s v%d on %d images in %s", bundle.name, bundle.version, len(paths), data)  # <= 80 columns
    log.info("score: %d to score, %d already in %s", len(todo), progress.skipped, out)
    if todo:
        if ray is None:
            tables = _local(bundle, root, todo, threads, part_rows)
        else:
            from covid_cxr.score.on_ray import ray_tables

            tables = ray_tables(bundle.path, root, todo, ray, workers, max(threads, 1), part_rows)
        for table in tables:
            parts.write(table)
            progress.add(table)
    return progress.summary(parts.written)


def read_predictions(out: str | Path):
    """The output folder as one pyarrow Table (every part)."""
    import pyarrow.parquet as pq

    return pq.read_table(str(out))

"""Models the unit tier trains once per test run and shares between pytest-xdist workers."""

from __future__ import annotations

import shutil
from pathlib import Path

TINY = 64


def built_once(tmp_path_factory, worker_id: str, key: str, build) -> Path:
    """A folder `build(folder, scratch)` makes once per test run, copied for the caller. Under
    pytest-xdist the first worker to ask builds it in the run's shared folder while a file lock
    holds the others (two trainings of one tiny model would take the two cores for nothing);
    each worker gets its own copy, as a serial run does."""
    from filelock import FileLock

    shared = tmp_path_factory.getbasetemp()
    shared = shared if worker_id == "master" else shared.parent  # the run's folder, above each worker's
    built = shared / f"{key}-built"
    with FileLock(str(shared / f"{key}.lock")):
        if not (built / ".done").is_file():
            shutil.rmtree(built, ignore_errors=True)
            build(built, shared / f"{key}-scratch")
            (built / ".done").touch()
    out = tmp_path_factory.mktemp(key)
    shutil.copytree(built, out, dirs_exist_ok=True, ignore=shutil.ignore_patterns(".done"))
    return out


def train_tiny(folder: Path, scratch: Path, **fields) -> None:
    """MODELS/<name>/1 in `folder`: efficientnet_lite0, random weights, 64 px, 2 epochs, trained on
    the tiny dataset (generated again in `scratch`: the same images, the same split)."""
    from covid_cxr.data.synthetic import make_synthetic_dataset
    from covid_cxr.train.fit import TrainConfig, train

    data = make_synthetic_dataset(scratch / "data", per_class=12, size=TINY)
    cfg = TrainConfig(weights="none", image_size=TINY, epochs=2, lr_find=False, progress=False, **fields)
    train(data, folder, cfg, workdir=scratch / "work")

"""How long `covid-cxr train --init-from` takes at a site, with and without --site-unlabelled.

Uses a site folder written by site_adapt_loop.py --unlabelled (SITE/labelled, SITE/unlabelled). Runs
the plain adaptation once and the one with --site-unlabelled twice, in this process, as the CLI would.

Usage: python benchmarks/site_adapt_timing.py --bundle runs/distil-models/accurate/3 \\
    --site runs/adapt-loop-prev2/quex+crdvp --out /tmp/site-timing
"""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

from covid_cxr.core.config import TrainConfig
from covid_cxr.train.fit import train


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--bundle", required=True)
    ap.add_argument("--site", type=Path, required=True, help="a folder holding labelled/ and unlabelled/")
    ap.add_argument("--out", type=Path, required=True)
    a = ap.parse_args()
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    unlabelled = a.site / "unlabelled"
    n = sum(1 for _ in unlabelled.iterdir())
    for folder in (None, unlabelled, unlabelled):
        cfg = TrainConfig(init_from=a.bundle, lr_find=False, progress=False, name="timing",
                          site_unlabelled=str(folder) if folder else None)
        t = time.perf_counter()
        train(a.site / "labelled", a.out, cfg, workdir=a.out / ".work")
        label = f"--site-unlabelled ({n} films)" if folder else "plain"
        print(f"{label}: {time.perf_counter() - t:.1f} s", flush=True)


if __name__ == "__main__":
    main()

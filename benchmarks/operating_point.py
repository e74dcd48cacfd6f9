"""The operating point's effect on a trained bundle, without retraining: the threshold is fitted on
the bundle's own validation split (prepared again from its metadata) and both tables are printed
for its test split, exactly as `train --target-recall` computes them (evaluate/operating_point.py).

Usage: python benchmarks/operating_point.py --model MODELS/<name> [--target COVID-19=0.97]
"""

from __future__ import annotations

import argparse
from pathlib import Path

from covid_cxr.bundle import load_bundle
from covid_cxr.publish.ensemble import shared_split, split_probabilities
from covid_cxr.evaluate.metrics import compute_metrics, with_operating_point
from covid_cxr.evaluate.operating_point import choose
from covid_cxr.evaluate.report import metrics_table_md, operating_point_md


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", type=Path, required=True)
    ap.add_argument("--target", default="COVID-19=0.97")
    a = ap.parse_args()
    b = load_bundle(a.model)
    prepared = shared_split([b])
    op = choose(*split_probabilities([b], prepared, "val")[:2], b.classes, a.target)
    y, p, _ = split_probabilities([b], prepared, "test")
    m = with_operating_point(compute_metrics(y, p, b.classes), y, p, op)
    print(f"# {b.name} v{b.version}, test split, target {a.target}\n\n## Argmax\n\n{metrics_table_md(m)}"
          f"{operating_point_md(m)}")


if __name__ == "__main__":
    main()

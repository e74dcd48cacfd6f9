"""Student variants for `--recipe accurate` (issue 19, item 1): distil a teacher already trained into
students of other settings (the recipe's student with some fields changed), on the teacher's split
and the recipe's work folder (trunk views and the teacher's soft labels come from its cache), and
print each student's test figures beside the teacher's.

What chose the recipe's student settings; the teacher/student table of record is bench_distil.py.

    python benchmarks/distil_variants.py --teacher runs/distil-models/accurate-teacher/1 \\
        --out runs/distil-models --variant e30:finetune_epochs=30 \\
        --variant e30w9:finetune_epochs=30,distil_weight=0.9 [--json runs/distil-variants.json]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from covid_cxr.bundle import load_bundle
from covid_cxr.core.config import TrainConfig
from covid_cxr.core.files import atomic_write_json
from covid_cxr.core.results import Metrics
from covid_cxr.train.fit import train
from covid_cxr.train.recipes import student_config

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data" / "covid19-radiography"
POSITIVE = "COVID-19"


def variant(text: str) -> tuple[str, dict]:
    """`tag:field=value,field=value` -> (tag, {field: value}); values are checked by TrainConfig."""
    tag, _, fields = text.partition(":")
    pairs = [kv.split("=", 1) for kv in fields.split(",") if kv]
    bad = [k for k, *_ in pairs if k not in TrainConfig.model_fields]
    if not tag or bad or any(len(p) != 2 for p in pairs):
        raise argparse.ArgumentTypeError(f"{text!r}: want TAG:FIELD=VALUE[,FIELD=VALUE] (unknown: {bad})")
    return tag, dict(pairs)


def row(m: Metrics) -> dict:
    op = m.operating_point.metrics if m.operating_point is not None else m
    return {"accuracy": m.accuracy, "covid_recall": m.recall(POSITIVE), "macro_f1": m.macro_f1,
            "op_accuracy": op.accuracy, "op_covid_recall": op.recall(POSITIVE)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--teacher", type=Path, required=True, help="MODELS/accurate-teacher/<version>")
    ap.add_argument("--out", type=Path, required=True, help="the recipe's MODELS (its .work holds the caches)")
    ap.add_argument("--data", type=Path, default=DATA)
    ap.add_argument("--variant", type=variant, action="append", required=True)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    teacher = load_bundle(args.teacher)
    rows = {"teacher": row(teacher.metadata.test_metrics)}
    for tag, fields in args.variant:
        cfg = student_config("accurate", TrainConfig(name=f"student-{tag}"), args.teacher)
        cfg = TrainConfig(**{**cfg.model_dump(), **fields})
        t0 = time.perf_counter()
        r = train(args.data, args.out, cfg, workdir=args.out / ".work")
        rows[tag] = {**row(r.metrics), "fields": fields, "seconds": time.perf_counter() - t0,
                     "bundle": str(r.bundle_path)}
        print(f"{tag}: {rows[tag]}", flush=True)
    print(f"{'model':>14} | argmax acc | COVID rec | op acc | op COVID rec")
    for tag, r in rows.items():
        print(f"{tag:>14} | {r['accuracy']:.3f} | {r['covid_recall']:.3f} | {r['op_accuracy']:.3f} | "
              f"{r['op_covid_recall']:.3f}")
    if args.json:
        atomic_write_json(args.json, rows)


if __name__ == "__main__":
    main()

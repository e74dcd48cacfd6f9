"""Lower precision on a real bundle, side by side in one run (issue 19 item 4): ONNX Runtime fp32
(the reference), OpenVINO fp32, bf16 (whole graph), bf16-split (backbone bf16, head and gate fp32),
INT8 (NNCF, head and gate unquantized). Per variant: images/s at batch 16 and batch 1 (median of
interleaved rounds, so the machine's drifting load hits every variant alike) and the ratio to ONNX
Runtime fp32; changed predictions and gate verdicts against ONNX Runtime fp32 on the validation
split and on the test split (the gate threshold refitted on validation where that helps, as
`covid-cxr bundle precision` does, and carried to test unchanged); the gate's AUC, test split
against bench_ood's out-of-distribution test sets; and the decision of the rule.

Usage: python benchmarks/bench_precision.py --model MODELS/<name> --data DIR [--threads 2]
       [--rounds 3] [--no-int8] [--depths 1,3,10,30] [--json precision.json]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

VARIANTS = ("ort fp32", "ov fp32", "ov bf16", "ov bf16-split", "ov int8")


def auc(negative: np.ndarray, positive: np.ndarray) -> float:
    """P(score of a positive > score of a negative), ties counted half (scikit-learn's ROC AUC)."""
    from sklearn.metrics import roc_auc_score

    y = np.r_[np.zeros(len(negative)), np.ones(len(positive))]
    return float(roc_auc_score(y, np.concatenate([negative, positive])))


def ood_images(size: int) -> np.ndarray:
    """bench_ood's out-of-distribution test sets (seed 0): photos, noise, blank/gradients, non-chest."""
    import bench_ood

    bench_ood.SIZE = size
    rng = np.random.default_rng(0)
    return np.concatenate([bench_ood.natural_photos(rng), bench_ood.noise(rng),
                           bench_ood.blank_and_gradients(rng), bench_ood.non_chest(rng)]).astype(np.float32)


def sessions(bundle, prepared, threads: int, int8: bool, tmp: Path) -> dict:
    """Each variant's session (ONNX Runtime's own, OpenVINO's answering like one)."""
    from covid_cxr.bundle.reader import open_session
    from covid_cxr.core.precision import INT8_CALIBRATION_IMAGES
    from covid_cxr.publish.precision import INT8_FILE, quantize_int8, split_images, variant_session

    out = {"ort fp32": open_session(bundle.onnx_path, threads, spinning=False)}
    for p in ("fp32", "bf16", "bf16-split"):
        out[f"ov {p}"] = variant_session(bundle, p, bundle.path, threads)
    if int8:
        t0 = time.perf_counter()
        quantize_int8(bundle, split_images(bundle, prepared, "train", INT8_CALIBRATION_IMAGES), tmp / INT8_FILE)
        print(f"int8: NNCF quantization {time.perf_counter() - t0:.0f} s", flush=True)
        out["ov int8"] = variant_session(bundle, "int8", tmp, threads)
    return out


def agreement(bundle, ref: dict, got: dict, precision: str) -> dict:
    """Changed predictions and gate verdicts on val and test, the refit carried to test; AUC; decision."""
    from covid_cxr.publish.precision import compare

    rec = compare(bundle, ref["val"], got["val"], precision)
    thr = rec.gate_threshold
    test_inside = got["test"].in_distribution if thr is None else got["test"].ood_score <= thr
    n_test = len(ref["test"].labels)
    return {"val_n": rec.n, "val_changed_predictions": rec.changed_predictions, "val_changed_gate": rec.changed_gate,
            "val_changed_gate_as_written": rec.changed_gate_as_written, "gate_threshold": thr,
            "test_n": n_test, "test_changed_predictions": int(np.sum(ref["test"].labels != got["test"].labels)),
            "test_changed_gate": int(np.sum(ref["test"].in_distribution != test_inside)),
            "max_abs_diff_val": rec.max_abs_diff,
            "gate_auc": auc(got["test"].ood_score, got["ood"].ood_score),
            "ood_accepted": float(np.mean(got["ood"].ood_score <= (thr if thr is not None else
                                                                   bundle.metadata.trust.ood.threshold))),
            "accepted": rec.accepted}


def throughput(bundle, session, x: np.ndarray, batch: int, seconds: float) -> float:
    """Images per second through model.onnx at `batch`, for about `seconds` (after one warm-up call)."""
    from covid_cxr.bundle.reader import run_classifier

    x = x[..., None]
    run_classifier(bundle, session, x[:batch])
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        i = (n % (len(x) - batch)) if len(x) > batch else 0
        run_classifier(bundle, session, x[i:i + batch])
        n += batch
    return n / (time.perf_counter() - t0)


def speeds(bundle, sess: dict, x: np.ndarray, rounds: int, seconds: float) -> dict:
    """Median images/s per variant and batch size over `rounds`, the variants' order rotated."""
    names = list(sess)
    got = {(n, b): [] for n in names for b in (16, 1)}
    for r in range(rounds):
        for n in names[r % len(names):] + names[:r % len(names)]:
            for b in (16, 1):
                got[(n, b)].append(throughput(bundle, sess[n], x, b, seconds))
        print(f"  speed round {r + 1}/{rounds} done; load average {os.getloadavg()[0]:.2f}", flush=True)
    return {n: {f"batch{b}": float(np.median(got[(n, b)])) for b in (16, 1)} for n in names}


def measure(args) -> dict:
    from covid_cxr.bundle import load_bundle
    from covid_cxr.publish.precision import answers_with, bundle_split, split_images

    bundle = load_bundle(args.model)
    prepared = bundle_split(bundle, args.data)
    sets = {"val": split_images(bundle, prepared, "val"), "test": split_images(bundle, prepared, "test"),
            "ood": ood_images(bundle.input_hw[0])}
    print(f"{bundle.name} v{bundle.version} ({bundle.metadata.architecture.name}, {bundle.input_hw[0]} px); "
          + ", ".join(f"{k} {len(v)}" for k, v in sets.items()) + f"; {args.threads} threads; "
          f"load average {os.getloadavg()[0]:.2f}", flush=True)
    with tempfile.TemporaryDirectory(prefix="bench-precision-") as tmp:
        sess = sessions(bundle, prepared, args.threads, args.int8, Path(tmp))
        answers = {n: {k: answers_with(bundle, s, x) for k, x in sets.items()} for n, s in sess.items()}
        ref = answers["ort fp32"]
        rows = {n: agreement(bundle, ref, a, n.split()[1]) for n, a in answers.items()}
        speed = speeds(bundle, sess, sets["test"], args.rounds, args.seconds)
        cuts = depths(bundle, sets["val"], ref["val"], args.threads, args.depths) if args.depths else {}
    for n in rows:
        rows[n].update(speed[n])
        rows[n].update({f"ratio_batch{b}": speed[n][f"batch{b}"] / speed["ort fp32"][f"batch{b}"] for b in (16, 1)})
    return {"bundle": f"{bundle.name} v{bundle.version}", "architecture": bundle.metadata.architecture.name,
            "threads": args.threads, "rounds": args.rounds, "variants": rows, "bf16_depths": cuts}


def depths(bundle, val: np.ndarray, ref, threads: int, counts: list[int]) -> dict:
    """bf16 for only the first N convolutions, fp32 after (head and gate included): does any cut
    keep the answers? Changes against ONNX Runtime fp32 on the validation split."""
    from covid_cxr.bundle.runtime import OpenVinoSession, compile_openvino
    from covid_cxr.publish.precision import answers_with, compare

    out = {}
    for n in counts:
        session = OpenVinoSession(compile_openvino(bundle.onnx_path, "bf16-split", threads, bf16_convs=n))
        rec = compare(bundle, ref, answers_with(bundle, session, val), "bf16-split")
        out[str(n)] = {"val_n": rec.n, "val_changed_predictions": rec.changed_predictions,
                       "val_changed_gate": rec.changed_gate, "val_changed_gate_as_written": rec.changed_gate_as_written,
                       "max_abs_diff_val": rec.max_abs_diff, "accepted": rec.accepted}
        print(f"  first {n} convolutions in bf16: {rec.summary()} (as written: {rec.changed_gate_as_written}); "
              f"max |dp| {rec.max_abs_diff:.3f}; {'accepted' if rec.accepted else 'refused'}", flush=True)
    return out


def show(result: dict) -> None:
    print(f"\n{result['bundle']} ({result['architecture']}), {result['threads']} threads, "
          f"median of {result['rounds']} rounds; changes against ONNX Runtime fp32")
    head = (f"{'variant':<14}|{'img/s b16':>10}|{'x ORT':>6}|{'img/s b1':>9}|{'x ORT':>6}|{'val pred':>9}|"
            f"{'val gate':>9}|{'test pred':>10}|{'test gate':>10}|{'gate AUC':>9}|{'OOD in':>7}| decision")
    print(head + "\n" + "-" * len(head))
    for n, r in result["variants"].items():
        gate = "as written" if r["gate_threshold"] is None else "refitted"
        print(f"{n:<14}|{r['batch16']:>10.1f}|{r['ratio_batch16']:>6.2f}|{r['batch1']:>9.1f}|{r['ratio_batch1']:>6.2f}|"
              f"{r['val_changed_predictions'] / r['val_n']:>9.2%}|{r['val_changed_gate'] / r['val_n']:>9.2%}|"
              f"{r['test_changed_predictions'] / r['test_n']:>10.2%}|{r['test_changed_gate'] / r['test_n']:>10.2%}|"
              f"{r['gate_auc']:>9.4f}|{r['ood_accepted']:>7.1%}| "
              f"{'accepted' if r['accepted'] else 'refused'} (gate {gate})")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, required=True, help="MODELS/<name>[/<version>]")
    ap.add_argument("--data", type=Path, help="the bundle's training data (default: where metadata says)")
    ap.add_argument("--threads", type=int, default=2, help="threads per call, every runtime")
    ap.add_argument("--rounds", type=int, default=3, help="speed rounds (variants interleaved)")
    ap.add_argument("--seconds", type=float, default=4.0, help="seconds per variant, batch size and round")
    ap.add_argument("--int8", action=argparse.BooleanOptionalAction, default=True, help="quantize with NNCF too")
    ap.add_argument("--depths", type=lambda t: [int(x) for x in t.split(",")], default=[],
                    help="also: bf16 for only the first N convolutions, e.g. 1,3,10,30 (validation changes)")
    ap.add_argument("--json", type=Path, help="also write the figures here")
    args = ap.parse_args()
    load0, started = os.getloadavg(), datetime.now(timezone.utc)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    result = measure(args)
    show(result)
    result.update({"commit": commit, "date": started.isoformat(timespec="seconds"), "cpus": os.cpu_count(),
                   "load_before": load0, "load_after": os.getloadavg()})
    print(f"commit {commit}; load average before {load0[0]:.2f} / after {os.getloadavg()[0]:.2f}")
    if args.json:
        from covid_cxr.core.files import atomic_write_json

        atomic_write_json(args.json, result)


if __name__ == "__main__":
    main()

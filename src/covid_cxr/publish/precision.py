"""`covid-cxr bundle precision MODELS/NAME --precision bf16`: measure a lower precision against the
bundle's own fp32 answers on its validation split, and publish the next version recording the
decision (metadata.json `precision_variants`). Serving then allows only accepted variants.

The rule (core.precision): changed predictions <= 0.5 % and changed gate verdicts <= 0.5 %. The
gate's statistics stay as fitted in fp32; since the backbone is frozen, only the scale of its
scores moves, so its threshold may be refitted on the variant's validation scores (accepting as
many films as fp32 does) where that changes fewer verdicts than the threshold as written.
"""

from __future__ import annotations

import shutil
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from covid_cxr.bundle.reader import Answers, Bundle, BundleError, load_bundle, run_classifier
from covid_cxr.bundle.runtime import OpenVinoSession, compile_openvino, openvino_core
from covid_cxr.bundle.schema import BundleMetadata, PrecisionVariant
from covid_cxr.bundle.store import discard, new_staging_dir
from covid_cxr.core.precision import INT8_CALIBRATION_IMAGES, MAX_CHANGED_GATE, MAX_CHANGED_PREDICTIONS, VARIANTS
from covid_cxr.data.decode import load_batch

INT8_FILE = "openvino/int8.xml"  # + int8.bin beside it
RULE = (f"changed predictions <= {MAX_CHANGED_PREDICTIONS:.1%} and changed gate verdicts <= "
        f"{MAX_CHANGED_GATE:.1%} of the validation split, against ONNX Runtime fp32")
BATCH = 32


def bundle_split(bundle: Bundle, data: str | Path | None = None):
    """The bundle's own split, prepared again from its training data (`data`: where that data is
    now); BundleError when the images are not those it was trained on."""
    from covid_cxr.data import prepare

    desc = bundle.metadata.training
    if desc is None:
        raise BundleError(f"{bundle.path}: no training description: its validation split is unknown")
    cfg, d = desc.config, desc.data
    prepared = prepare(data or d.dataset_root, cfg.classes, cfg.balance, cfg.max_per_class, cfg.seed,
                       fractions=tuple(d.split_fractions), progress=False)
    if prepared.manifest.digest() != d.manifest_sha256:
        raise BundleError(f"{data or d.dataset_root}: its images are not those {bundle.name} v{bundle.version} "
                          "was trained on (manifest digest differs)")
    return prepared


def split_images(bundle: Bundle, prepared, split: str, limit: int | None = None) -> np.ndarray:
    """N x H x W float32 of one split, decoded and resized as the server does."""
    rows = prepared.splits[split][:limit]
    return load_batch([prepared.manifest.root / r.path for r in rows], *bundle.input_hw)


def answers_with(bundle: Bundle, session, images: np.ndarray) -> Answers:
    """The bundle's answers (preparation, labels, gate) with `session` running model.onnx."""
    parts = [run_classifier(bundle, session, images[i:i + BATCH, ..., None]) for i in range(0, len(images), BATCH)]
    probs = np.concatenate([p[0] for p in parts])
    if parts[0][1] is None:
        return bundle.answers(probs)
    return bundle.answers(probs, np.concatenate([p[1] for p in parts]), np.concatenate([p[2] for p in parts]))


def refit_threshold(ref_inside: np.ndarray, scores: np.ndarray) -> float:
    """The threshold accepting as many of `scores` as fp32 accepted (midway between the last
    accepted and the first rejected score, so ties at the edge do not flip)."""
    s = np.sort(np.asarray(scores, np.float64))
    k = int(np.sum(ref_inside))
    if k == 0:
        return float(s[0] - abs(s[0]) * 1e-6 - 1e-12)
    if k >= len(s):
        return float(s[-1] + abs(s[-1]) * 1e-6 + 1e-12)
    return float((s[k - 1] + s[k]) / 2)


def compare(bundle: Bundle, ref: Answers, got: Answers, precision: str, file: str | None = None) -> PrecisionVariant:
    """The variant's record: changes against fp32, the gate refitted where that helps, the verdict."""
    import openvino

    n = len(ref.labels)
    changed = int(np.sum(ref.labels != got.labels))
    gate = as_written = threshold = None
    if ref.in_distribution is not None:
        as_written = gate = int(np.sum(ref.in_distribution != got.in_distribution))
        refit = refit_threshold(ref.in_distribution, got.ood_score)
        refitted = int(np.sum(ref.in_distribution != (got.ood_score <= refit)))
        if refitted < as_written:
            gate, threshold = refitted, refit
    ok = changed <= MAX_CHANGED_PREDICTIONS * n and (gate is None or gate <= MAX_CHANGED_GATE * n)
    return PrecisionVariant(precision=precision, n=n, changed_predictions=changed, changed_gate=gate,
                            changed_gate_as_written=as_written, gate_threshold=threshold,
                            max_abs_diff=float(np.max(np.abs(ref.probabilities - got.probabilities))), rule=RULE,
                            accepted=bool(n > 0 and ok), file=file,
                            software={"openvino": openvino.__version__}, measured=datetime.now(timezone.utc))


def quantize_int8(bundle: Bundle, calibration: np.ndarray, out: Path) -> Path:
    """model.onnx quantized to INT8 by NNCF (post-training, mixed preset), calibrated on
    `calibration` (N x H x W, prepared as the bundle prepares); every op after the spatial pooling
    (head, softmax, the gate's Mahalanobis arithmetic) is left out, so the gate is not quantized."""
    import nncf
    import openvino as ov

    model = openvino_core().read_model(str(bundle.onnx_path))
    keep = [op.get_friendly_name() for op in model.get_ordered_ops()
            if op.get_type_name() in ("MatMul", "Add", "Multiply", "Subtract", "Divide")
            and all(o.get_partial_shape().rank.is_static and o.get_partial_shape().rank.get_length() <= 2
                    for o in op.outputs())]
    x = bundle.prepare(np.asarray(calibration, np.float32))[..., None]
    data = nncf.Dataset([x[i:i + 1] for i in range(len(x))])
    quantized = nncf.quantize(model, data, preset=nncf.QuantizationPreset.MIXED, subset_size=len(x),
                              ignored_scope=nncf.IgnoredScope(names=keep, validate=False))
    out.parent.mkdir(parents=True, exist_ok=True)
    ov.save_model(quantized, str(out), compress_to_fp16=False)
    return out


def variant_session(bundle: Bundle, precision: str, folder: Path, threads: int = 0, gate: float | None = None):
    """An OpenVINO session of `precision` on the bundle in `folder` (int8: its IR there)."""
    file = folder / (INT8_FILE if precision == "int8" else bundle.metadata.onnx.file)
    return OpenVinoSession(compile_openvino(file, precision, threads), gate)


def add_precision(path: str | Path, precision: str, data: str | Path | None = None, version: int | None = None,
                  threads: int = 0) -> Bundle:
    """Measure `precision` on the bundle's validation split and publish the next version with the
    decision recorded (refused ones too: serving then says why). The old version stays as it was."""
    if precision not in VARIANTS:
        raise BundleError(f"precision {precision!r}: measure one of {', '.join(VARIANTS)} (fp32 needs no measurement)")
    src = load_bundle(path, version)
    if src.metadata.task != "classification":
        raise BundleError(f"{src.path}: not a classifier")
    prepared = bundle_split(src, data)
    val = split_images(src, prepared, "val")
    ref = answers_with(src, src.session(), val)
    staging = new_staging_dir(src.path.parent)
    try:
        for item in src.path.iterdir():
            if item.name != "metadata.json":
                (shutil.copytree if item.is_dir() else shutil.copy2)(item, staging / item.name)
        if precision == "int8":
            quantize_int8(src, split_images(src, prepared, "train", INT8_CALIBRATION_IMAGES), staging / INT8_FILE)
        got = answers_with(src, variant_session(src, precision, staging, threads), val)
        record = compare(src, ref, got, precision, INT8_FILE if precision == "int8" else None)
        if precision == "int8" and not record.accepted:  # a refused variant keeps its numbers, not its files
            shutil.rmtree(staging / Path(INT8_FILE).parent)
            record = record.model_copy(update={"file": None})
        variants = {**(src.metadata.precision_variants or {}), precision: record}
        base = src.metadata.model_copy(update={"precision_variants": variants}).model_dump(mode="json")
        from covid_cxr.publish.writer import publish_version

        return publish_version(staging, src.path.parent, lambda v: BundleMetadata.model_validate({**base, "version": v}))
    except BaseException:
        discard(staging)
        raise

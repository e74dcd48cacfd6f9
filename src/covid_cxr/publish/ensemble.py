"""`covid-cxr ensemble MODELS/a MODELS/b ... --out MODELS --name NAME`: one bundle whose ONNX model
averages its members' probabilities. It is a bundle like any other (evaluate, serve, check,
explain): the graph takes the same N x H x W x 1 input, and model.safetensors holds every member's
weights under `members.<i>.`. Grad-CAM on it averages the members' maps, each taken for the
ensemble's own score (explain/gradcam.py, one target layer per member).

Test metrics need the members' common test split: they must have been trained on the same data,
seed, balancing and fractions (the same split), else some member would have trained on images the
ensemble is scored on; `--data` recomputes that split and it is checked against the members'.

Out-of-distribution gate: when every member has one, the ensemble's model.onnx answers `ood_score`
and `in_distribution` too (trust.ood.EnsembleOOD: the members' scores on one scale, averaged, the
threshold refitted on the validation split). Without `evaluate` there is no split to fit it on.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from covid_cxr.bundle.reader import Bundle, BundleError, load_bundle
from covid_cxr.bundle.schema import BundleContent
from covid_cxr.core.results import Metrics, OperatingPoint
from covid_cxr.data.decode import load_batch
from covid_cxr.models.loading import load_torch
from covid_cxr.core.config import TrainConfig

SPLIT_KEYS = ("manifest_sha256", "seed", "balance", "max_per_class", "split_fractions")


def open_members(paths: list[Path]) -> list[Bundle]:
    bundles = [load_bundle(p) for p in paths]
    if len(bundles) < 2:
        raise BundleError("an ensemble needs at least two member bundles")
    first = bundles[0]
    for b in bundles[1:]:
        if b.classes != first.classes:
            raise BundleError(f"{b.path}: classes {b.classes} differ from {first.path}'s {first.classes}")
        if b.input_hw != first.input_hw:
            raise BundleError(f"{b.path}: input {b.input_hw} differs from {first.path}'s {first.input_hw}; "
                              "train the members at one --image-size")
    for b in bundles:
        if b.metadata.architecture.members:
            raise BundleError(f"{b.path}: is itself an ensemble; list its members instead")
        if b.metadata.lung_crop is not None:  # one ONNX graph cannot hold the members' lung crops
            raise BundleError(f"{b.path}: trained on lung-only input (--lung-crop); ensembles take "
                              "whole-image members only")
    return bundles


def member_entry(b: Bundle) -> dict:
    m = b.metadata
    acc = m.test_metrics.accuracy if m.test_metrics else None
    return {"name": m.name, "version": m.version, "architecture": m.architecture.model_dump(),
            "normalisation": m.input.normalisation.model_dump(), "temperature": b.temperature,
            "test_accuracy": acc}


def shared_split(bundles: list[Bundle]):
    """The members' common split (prepared again from their data), or BundleError if they differ."""
    from covid_cxr.data import prepare

    descs = [b.metadata.training for b in bundles]
    if any(d is None for d in descs):
        raise BundleError("a member has no training description: its test split is unknown")
    key = [tuple(str(getattr(d.data, k)) for k in SPLIT_KEYS) for d in descs]
    if len(set(key)) > 1:
        raise BundleError("members were trained on different splits (data, seed, balance or fractions "
                          "differ): an ensemble's test metrics would count images some member trained on")
    cfg, data = descs[0].config, descs[0].data
    prepared = prepare(data.dataset_root, cfg.classes, cfg.balance, cfg.max_per_class, cfg.seed, progress=False)
    if prepared.manifest.digest() != data.manifest_sha256:
        raise BundleError(f"{data.dataset_root}: its images are not those the members were trained on")
    return prepared


def split_probabilities(bundles: list[Bundle], prepared, split: str) -> tuple[np.ndarray, np.ndarray, list | None]:
    """Labels, the members' averaged probabilities (ONNX Runtime: what the ensemble graph computes),
    and each member's ood_score (None unless every member has a gate)."""
    h, w = bundles[0].input_hw
    paths = [prepared.manifest.root / r.path for r in prepared.splits[split]]
    probs = np.zeros((len(paths), len(bundles[0].classes)))
    gated = all(b.has_ood for b in bundles)
    scores = np.zeros((len(bundles), len(paths))) if gated else None
    for i in range(0, len(paths), 32):
        x = load_batch(paths[i:i + 32], h, w)
        outs = [b.predict_with_ood(x) for b in bundles]
        probs[i:i + 32] = np.mean([o[0] for o in outs], axis=0)
        if gated:
            scores[:, i:i + 32] = [o[1] for o in outs]
    y = np.array([prepared.classes.index(r.label) for r in prepared.splits[split]])
    return y, probs, list(scores) if gated else None


def ensemble_gate(bundles: list[Bundle], val_scores, test_scores):
    """The ensemble's out-of-distribution gate (trust.ood.EnsembleOOD) from its members' gates, the
    threshold refitted on the validation split; None when a member has none."""
    from covid_cxr.trust.fit import Trust
    from covid_cxr.trust.ood import OODStats, fit_ensemble_gate

    if val_scores is None:
        return None
    gate, info = fit_ensemble_gate([OODStats.from_arrays(b.trust_arrays()) for b in bundles], val_scores, test_scores)
    return Trust(1.0, gate, {"ood": info})  # each member's temperature is applied inside its part


CONFIDENCE = TrainConfig.model_fields["target_confidence"].default  # the one default, TrainConfig's


def ensemble_metrics(bundles: list[Bundle], target_recall: str | None, confidence: float | None = CONFIDENCE,
                     batch: int | None = None):
    """Test metrics (argmax and operating point: its rule as evaluate.operating_point.choose takes it),
    the fitted operating point, the gate, parity images."""
    from covid_cxr.evaluate.metrics import compute_metrics, with_operating_point
    from covid_cxr.evaluate.operating_point import choose

    prepared = shared_split(bundles)
    classes = bundles[0].classes
    y, p, test_scores = split_probabilities(bundles, prepared, "test")
    # validation: for the operating point, the gate and the site reference
    val_y, val_p, val_scores = split_probabilities(bundles, prepared, "val")
    op = choose(val_y, val_p, classes, target_recall, confidence, batch) if target_recall else None
    m = with_operating_point(compute_metrics(y, p, classes), y, p, op)
    trust = ensemble_gate(bundles, val_scores, test_scores)
    if trust is not None:
        m = m.model_copy(update={"ood_rate": 1 - trust.info["ood"]["test_accept_rate"]})
    h, w = bundles[0].input_hw
    parity = load_batch([prepared.manifest.root / r.path for r in prepared.splits["test"][:8]], h, w)
    ref = ensemble_reference(bundles, prepared, val_p, trust.ood.combine(val_scores) if trust is not None else None)
    return m, op, trust, parity, ref


def ensemble_reference(bundles: list[Bundle], prepared, val_p, val_ood):
    """The ensemble's `site_reference`: its validation answers and the images' statistics."""
    from covid_cxr.site.reference import reference_from_files

    h, w = bundles[0].input_hw
    paths = [prepared.manifest.root / r.path for r in prepared.splits["val"]]
    return reference_from_files(paths, h, w, val_p, val_ood, list(bundles[0].classes))


def content_for(bundles: list[Bundle], metrics: Metrics | None, op: OperatingPoint | None, trust=None,
                site_reference=None) -> BundleContent:
    first = bundles[0].metadata
    cam = ",".join(f"members.{i}.backbone.{b.metadata.architecture.cam_layer}" for i, b in enumerate(bundles))
    arch = {"name": "ensemble", "timm_name": "+".join(b.metadata.architecture.timm_name for b in bundles),
            "weights": "the members' (architecture.members)", "hidden": first.architecture.hidden,
            "dropout": 0.0, "cam_layer": cam,
            "frozen_backbone": all(b.metadata.architecture.frozen_backbone for b in bundles),
            "members": [member_entry(b) for b in bundles]}
    h, w = first.input_hw
    return BundleContent(architecture=arch, classes=list(first.classes),
                         input={"height": h, "width": w, "normalisation": first.input.normalisation},
                         test_metrics=metrics, operating_point=op, trust=trust.info if trust is not None else None,
                         site_reference=site_reference)


def build_ensemble(member_paths: list[Path], models_out: Path, name: str, evaluate: bool = True,
                   target_recall: str | None = None, report_dir: Path | None = None,
                   confidence: float | None = CONFIDENCE, batch: int | None = None) -> Bundle:
    """Write MODELS/<name>/<next version>: the members' averaged probabilities, with test metrics
    on their common test split when `evaluate` (the operating point by `confidence` and `batch`)."""
    import tempfile

    from covid_cxr.publish.writer import write_bundle
    from covid_cxr.evaluate.report import write_report
    from covid_cxr.models.classifier import EnsembleClassifier

    bundles = open_members(member_paths)
    metrics, op, trust, parity, ref = ensemble_metrics(bundles, target_recall, confidence, batch) if evaluate else (None,) * 5
    if parity is None:
        h, w = bundles[0].input_hw
        parity = np.random.default_rng(0).random((4, h, w), dtype=np.float32)
    content = content_for(bundles, metrics, op, trust, ref)
    model = EnsembleClassifier([load_torch(b) for b in bundles], content.architecture.cam_layer,
                               [b.temperature for b in bundles])
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(report_dir or tmp)
        if metrics is not None:
            names = " + ".join(f"{b.name} v{b.version}" for b in bundles)
            write_report(metrics, report, f"{name}: ensemble of {names} — test split")
        return write_bundle(models_out, name, model, content, parity, report_dir=report, trust=trust)

"""Site adaptation: `covid-cxr train --init-from MODELS/<name> --data LOCAL [--data ORIGINAL]`.

A hospital labels a few tens of its own films per class; training continues from a published
bundle (its architecture, input size, normalisation and weights: the features stay those the model
was built on) instead of starting again. The report puts the bundle as it was beside the adapted
model, on the site's own test split (and per source when the original data is mixed in).
"""

from __future__ import annotations

from covid_cxr.core.errors import ConfigError
from covid_cxr.core.results import Metrics
from covid_cxr.models.loading import load_torch


def adapted_config(cfg):
    """`cfg` with what the bundle fixes (architecture, input size, head shape) taken from it."""
    if not cfg.init_from:
        return cfg
    from covid_cxr.bundle import load_bundle

    meta = load_bundle(cfg.init_from).metadata
    arch = meta.architecture
    if arch.members:
        raise ConfigError(f"--init-from {cfg.init_from}: an ensemble; adapt one of its members instead")
    return cfg.model_copy(update={"arch": arch.name, "image_size": meta.input.height, "hidden": list(arch.hidden),
                                  "dropout": arch.dropout, "classes": list(meta.classes)})


def start_model(cfg, prepared):
    """(model, weight source): the bundle's classifier for --init-from, else a fresh one. With a
    bundle, the split's normalisation is replaced by the bundle's (the backbone was trained on it)."""
    from covid_cxr.models import create_model

    if not cfg.init_from:
        return create_model(cfg.arch, cfg.weights, len(prepared.classes), cfg.hidden, cfg.dropout,
                            prepared.mean, prepared.std)
    from covid_cxr.bundle import load_bundle

    b = load_bundle(cfg.init_from)
    if list(b.classes) != list(prepared.classes):
        raise ConfigError(f"--init-from {b.path}: classes {b.classes} differ from the data's {list(prepared.classes)}")
    model = load_torch(b)
    model.freeze_backbone()
    norm = b.metadata.input.normalisation
    prepared.mean, prepared.std = norm.mean, norm.std
    from covid_cxr.features.onnx import weights_digest

    # the digest keys the feature cache: two bundles of one name and version never share features
    return model, f"bundle {b.name} v{b.version} (backbone {weights_digest(model.backbone)})"


def before_metrics(model, inputs, prepared, cfg) -> Metrics:
    """The bundle as it was, on the same test split (and per source): what adaptation is judged against."""
    import copy

    from covid_cxr.train.decisions import decision_metrics

    frozen = copy.deepcopy(model)
    return decision_metrics(frozen, inputs, prepared, cfg.model_copy(update={"target_recall": None}))


def before_after_md(before: Metrics, after: Metrics) -> str:
    """Before/after lines for the report (overall and per source)."""
    def line(label: str, m: Metrics) -> str:
        cov = m.recall("COVID-19")
        return f"| {label} | {m.n} | {m.accuracy:.3f} | {m.macro_f1:.3f} | {float('nan') if cov is None else cov:.3f} |"

    rows = ["\n## Site adaptation: before (the --init-from bundle) and after, same test split\n",
            "| model, test images | n | accuracy | macro-F1 | COVID-19 recall |", "|---|---|---|---|---|",
            line("before, all", before), line("after, all", after)]
    for s in after.by_source or {}:
        rows += [line(f"before, {s}", before.by_source[s]), line(f"after, {s}", after.by_source[s])]
    return "\n".join(rows) + "\n"


def trained_on(bundle) -> set[str]:
    """sha256 of the images the bundle trained and validated on (its split, prepared again from its
    own dataset folder and settings); empty when that folder is not at hand."""
    from pathlib import Path

    from covid_cxr.data import prepare

    t = bundle.metadata.training
    if t is None or not Path(t.data.dataset_root).is_dir():
        return set()
    c = t.config
    p = prepare(t.data.dataset_root, c.classes, c.balance, c.max_per_class, c.seed, progress=False)
    if p.manifest.digest() != t.data.manifest_sha256:
        raise ConfigError(f"--init-from {bundle.path}: {t.data.dataset_root} no longer holds the images it was "
                          "trained on; its test split cannot be told apart")
    return {r.sha256 for s in ("train", "val") for r in p.splits[s]}


def exclude_seen(prepared, cfg) -> int:
    """Move test images the --init-from bundle trained or validated on into train, so 'before' and
    'after' are both measured on images the bundle never saw (--data ORIGINAL re-splits the original
    data together with the site's images; without this, the test split would hold the bundle's
    training images and flatter it). Returns how many moved."""
    from covid_cxr.bundle import load_bundle
    from covid_cxr.core.errors import DataError

    seen = trained_on(load_bundle(cfg.init_from))
    moved = [r for r in prepared.splits["test"] if r.sha256 in seen]
    if moved:
        prepared.splits["test"] = [r for r in prepared.splits["test"] if r.sha256 not in seen]
        prepared.splits["train"] = sorted(prepared.splits["train"] + moved, key=lambda r: r.path)
    if not prepared.splits["test"]:
        raise DataError(f"--init-from {cfg.init_from}: every test image was seen by the bundle in training")
    return len(moved)

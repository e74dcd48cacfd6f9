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


def balanced_weights(ys, k: int):
    """Cross-entropy class weights that balance the classes present in `ys` (absent classes: 0)."""
    import torch

    counts = torch.bincount(ys, minlength=k).float()
    return torch.where(counts > 0, counts.sum() / (counts.clamp_min(1) * (counts > 0).sum()), torch.zeros(k))


def fit_site_head(head, x, y, depth: str = "head", prior: float = 0.0, dev=None, steps: int = 300,
                  lr: float = 1e-3, seed: int = 0):
    """The bundle's head refitted on a site's few labelled films (features `x`, labels `y`), all of
    them (no split held back for early stopping: a 3-film validation split only adds noise), full
    batch, a fixed budget, classes weighted to balance. `depth`: "last" (last layer) | "head";
    `prior`: L2 pull towards the development head (L2-SP); `dev` (features, labels): development
    films mixed in at half the loss (the site up-weighted to match them)."""
    import copy

    import numpy as np
    import torch

    torch.manual_seed(seed)
    h = copy.deepcopy(head)
    train = list(h.net[-1].parameters()) if depth == "last" else list(h.parameters())
    for p in h.parameters():
        p.requires_grad_(any(p is q for q in train))
    start = [p.detach().clone() for p in train]
    xs, ys = torch.as_tensor(np.asarray(x, np.float32)), torch.as_tensor(np.asarray(y, np.int64))
    w = balanced_weights(ys, h.net[-1].out_features)
    opt = torch.optim.Adam(train, lr=lr)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        h.train()
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(h(xs), ys, weight=w)
        if dev is not None:
            i = torch.randint(len(dev[1]), (256,), generator=gen)
            dx = torch.as_tensor(np.asarray(dev[0][i.numpy()], np.float32))
            loss = 0.5 * loss + 0.5 * torch.nn.functional.cross_entropy(h(dx), torch.as_tensor(dev[1][i.numpy()]))
        if prior:
            loss = loss + prior / 2 * sum(((p - s) ** 2).sum() for p, s in zip(train, start))
        loss.backward()
        opt.step()
    return h.eval()


# --init-from on a frozen backbone: the site head (fit_site_head) instead of the from-scratch recipe.
# Chosen by benchmarks/site_adapt_heads.py (docs/results/site.md, "Adaptation that pays").
SITE_DEPTH = "head"
SITE_PRIOR = 0.0
SITE_STEPS = 300
FOLDS = 5  # out-of-fold answers: the temperature and the site reference come from films the head did not fit


def labelled_site(feats: dict):
    """(features, labels) of every labelled film adaptation may fit on: train + val (test stays out)."""
    import numpy as np

    x = np.concatenate([feats[s][0].numpy() for s in ("train", "val")])
    y = np.concatenate([feats[s][1].numpy() for s in ("train", "val")])
    return x, y


def out_of_fold_logits(head, x, y, seed: int = 0):
    """Each labelled film's logits from a site head fitted without it (stratified k-fold, k <= the
    smallest class): what the adapted head does on films it has not seen."""
    import numpy as np
    import torch
    from sklearn.model_selection import KFold, StratifiedKFold

    smallest = int(np.bincount(y)[np.bincount(y) > 0].min())
    k = min(FOLDS, smallest) if smallest >= 2 else min(FOLDS, len(y))
    folds = (StratifiedKFold(k, shuffle=True, random_state=seed) if smallest >= 2
             else KFold(k, shuffle=True, random_state=seed))
    out = np.zeros((len(y), head.net[-1].out_features), np.float32)
    for fit_idx, held in folds.split(x, y):
        h = fit_site_head(head, x[fit_idx], y[fit_idx], SITE_DEPTH, SITE_PRIOR, steps=SITE_STEPS, seed=seed)
        with torch.inference_mode():
            out[held] = h(torch.from_numpy(np.asarray(x[held], np.float32))).numpy()
    return out


def adapt_frozen(model, feats: dict, cfg, bundle_trust: dict | None, stages):
    """Site adaptation of a frozen-backbone bundle: the head refitted on the labelled site films, the
    temperature on their out-of-fold answers, the bundle's own gate kept (a Mahalanobis gate refitted
    on tens of films would be degenerate). Returns the Trust whose val answers are the site's
    out-of-fold answers on train + val: the adapted bundle's site reference. With --site-unlabelled,
    the answers take the site's prevalence (site_prior) and the reference is those films."""
    import numpy as np

    from covid_cxr.trust.calibration import fit_temperature, nll, softmax
    from covid_cxr.trust.fit import Trust
    from covid_cxr.trust.ood import OODStats

    x, y = labelled_site(feats)
    oof = out_of_fold_logits(model.head, x, y, cfg.seed)
    model.head.load_state_dict(fit_site_head(model.head, x, y, SITE_DEPTH, SITE_PRIOR, steps=SITE_STEPS,
                                             seed=cfg.seed).state_dict())
    t = fit_temperature(oof, y)
    info = {"calibration": {"temperature": t, "fitted_on": f"out-of-fold answers on the site's {len(y)} labelled "
                            "films (train + val)", "val_nll_before": nll(oof, y, 1.0), "val_nll_after": nll(oof, y, t)}}
    gate, score = None, None
    if bundle_trust and bundle_trust.get("arrays") is not None and "threshold" in bundle_trust["arrays"]:
        gate = OODStats.from_arrays(bundle_trust["arrays"])
        info["ood"] = {**bundle_trust["info"], "fitted_on": "the --init-from bundle's development data (kept)"}
        score = gate.score(np.concatenate([stages.splits[s] for s in ("train", "val")]))
    trust = Trust(t, gate, info, softmax(oof / t), score)
    if cfg.site_unlabelled:
        trust.site_sample = site_prior(model, cfg, trust, trust.val_probs.mean(0))
    return trust


def unlabelled_pass(model, cfg, gate=None):
    """(pooled features, the gate's scores or None, ImageBatch) of the films under --site-unlabelled:
    decoded as `site check` decodes them (unreadable files skipped, listed in the batch and logged),
    lung-cropped as the training films. One backbone pass per chunk: with a gate, StageStats' first
    block is the pooled features."""
    import logging

    import numpy as np
    import torch

    from covid_cxr.lungs.crop import batch_transform
    from covid_cxr.site.check import CHUNK
    from covid_cxr.site.images import ImageBatch, image_files, read_images
    from covid_cxr.trust.stages import StageStats, stage_indices

    transform = batch_transform(cfg.lung_crop, cfg.lungs)
    net = StageStats(model.eval(), stage_indices(model.backbone) if gate is not None else ()).eval()
    paths, batch, blocks = image_files(cfg.site_unlabelled), ImageBatch(), []
    for i in range(0, len(paths), CHUNK):
        batch, x = read_images(paths[i:i + CHUNK], cfg.size, cfg.size, batch)
        if len(x):
            with torch.inference_mode():
                blocks.append(net(torch.from_numpy((transform(x) if transform else x)[:, None])).numpy())
    for path, why in batch.skipped[:5]:
        logging.getLogger(__name__).warning("--site-unlabelled: skipped %s (%s)", path, why)
    stats = np.concatenate(blocks) if blocks else np.zeros((0, model.num_features), np.float32)
    return stats[:, :model.num_features], (gate.score(stats) if gate is not None and len(stats) else None), batch


def site_prior(model, cfg, trust, train_prior):
    """The site's class prevalence, estimated by EM on the adapted head's calibrated answers to the
    site's unlabelled films, moved into the head's last bias (log(prevalence / training prior) on the
    tempered logits) and recorded in trust.info; returns those films' Sample as the model now answers
    them (the reference: the site's own population, class mix included)."""
    import torch

    from covid_cxr.core.config import SITE_PREVALENCE_MIN_IMAGES as MIN_IMAGES
    from covid_cxr.site.reference import sample_of
    from covid_cxr.trust.calibration import softmax
    from covid_cxr.trust.prevalence import estimate_prevalence, logit_shift

    x, ood, batch = unlabelled_pass(model, cfg, trust.ood)
    if len(x) < MIN_IMAGES:
        raise ConfigError(f"--site-unlabelled {cfg.site_unlabelled}: {len(x)} readable images ({len(batch.skipped)} "
                          f"skipped); at least {MIN_IMAGES} are needed to estimate the site's prevalence")
    t, last = trust.temperature, model.head.net[-1]
    with torch.inference_mode():
        z = model.head(torch.from_numpy(x)).numpy()
    est = estimate_prevalence(softmax(z / t), train_prior)
    shift = logit_shift(train_prior, est)
    last.bias.data += torch.as_tensor(t * shift, dtype=last.bias.dtype)
    trust.info["prevalence"] = {"prevalence": {c: round(float(v), 4) for c, v in zip(cfg.classes, est)},
                                "training_prior": {c: round(float(v), 4) for c, v in zip(cfg.classes, train_prior)},
                                "images": len(x), "skipped": len(batch.skipped)}
    return sample_of(softmax(z / t + shift), ood, batch)


def bundle_trust(cfg) -> dict | None:
    """The --init-from bundle's gate: its trust.safetensors arrays and metadata (None without a gate)."""
    from covid_cxr.bundle import load_bundle

    b = load_bundle(cfg.init_from)
    ood = b.metadata.trust.ood if b.metadata.trust is not None else None
    arrays = b.trust_arrays()
    if ood is None or arrays is None:
        return None
    return {"arrays": arrays, "info": ood.model_dump()}


def adapt_site(model, inputs, prepared, cfg, cache_dir):
    """`train --init-from` on a frozen backbone: the site head and its trust layer (adapt_frozen);
    also the bundle's head as it was and the films' stage statistics (for site_section)."""
    from covid_cxr.trust.stages import stage_features

    import copy

    kept = bundle_trust(cfg)
    stages = stage_features(model, prepared, cfg, cache_dir) if kept else None
    head0 = copy.deepcopy(model.head)
    return adapt_frozen(model, inputs.features, cfg, kept, stages), head0, stages


def _present_scores(y, pred, classes) -> tuple[float, dict]:
    """Macro-F1 over the classes the films have, and recall per such class."""
    import numpy as np
    from sklearn.metrics import f1_score, recall_score

    present = sorted(set(np.asarray(y).tolist()))
    f1 = float(f1_score(y, pred, labels=present, average="macro", zero_division=0))
    rec = recall_score(y, pred, labels=present, average=None, zero_division=0)
    return f1, {classes[c]: float(r) for c, r in zip(present, rec)}


def site_section(head0, model, feats, prepared, cfg, trust, stages, reference) -> str:
    """The report's before/after on the site's test split (films adaptation did not fit): macro-F1 and
    recall per class of the bundle, of a logistic regression on the same labelled films' frozen
    features (the baseline to beat), of the adapted model; and the site check's verdict on those
    films against the bundle's reference and against the adapted one."""
    import torch
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    from covid_cxr.bundle import load_bundle
    from covid_cxr.bundle.schema import SiteReference
    from covid_cxr.site.images import read_images
    from covid_cxr.site.reference import sample_of
    from covid_cxr.site.shift import compare
    from covid_cxr.trust.calibration import softmax

    classes = list(prepared.classes)
    xt, yt = feats["test"][0].numpy(), feats["test"][1].numpy()
    x, y = labelled_site(feats)
    lr = make_pipeline(StandardScaler(), LogisticRegression(max_iter=5000)).fit(x, y)
    old = load_bundle(cfg.init_from).metadata
    t0 = old.trust.calibration.temperature if old.trust and old.trust.calibration else 1.0
    with torch.inference_mode():
        p0 = softmax(head0.eval()(torch.from_numpy(xt)).numpy() / t0)
        p1 = softmax(model.head.eval()(torch.from_numpy(xt)).numpy() / trust.temperature)
    batch, _ = read_images([prepared.manifest.root / r.path for r in prepared.splits["test"]], cfg.size, cfg.size)
    ood = trust.ood.score(stages.splits["test"]) if trust.ood is not None and stages is not None else None
    rows = [("before: the --init-from bundle", p0.argmax(1), old.site_reference, p0),
            (f"logistic regression on the frozen features of the same {len(y)} labelled films",
             lr.classes_[lr.predict_proba(xt).argmax(1)], None, None),
            ("after: the adapted bundle", p1.argmax(1), SiteReference.model_validate(reference) if reference else None, p1)]
    out = ["\n## Site adaptation: before, baseline, after (the site's test split, films not adapted on)\n",
           f"{len(yt)} test films; the adapted head was fitted on {len(y)} labelled films (train + val).\n",
           "| model | macro-F1 | recall per class | site check on these films |", "|---|---|---|---|"]
    for label, pred, ref, probs in rows:
        f1, rec = _present_scores(yt, pred, classes)
        verdict = "" if ref is None else compare(ref, sample_of(probs, ood, batch), classes).verdict
        out.append(f"| {label} | {f1:.3f} | {', '.join(f'{k} {v:.2f}' for k, v in rec.items())} | {verdict} |")
    prev = trust.info.get("prevalence")
    if prev:
        share = ", ".join(f"{c} {v:.0%}" for c, v in prev["prevalence"].items())
        out.append(f"\nThe adapted model answers with the site's prevalence, estimated on {prev['images']} unlabelled "
                   f"films (EM; {prev['skipped']} unreadable skipped): {share}.")
    return "\n".join(out) + "\n"

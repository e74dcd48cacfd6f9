"""Site adaptation with few labels (train/adapt.py): the site head, its out-of-fold answers, and
the loop it closes (the adapted bundle's reference is the site: fresh films of it are `fit`,
films of another site still shift). Tiny generated images and features only."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from covid_cxr.bundle import load_bundle
from covid_cxr.models.classifier import Head
from covid_cxr.train.adapt import fit_site_head, out_of_fold_logits


def _site(n: int = 20, dim: int = 16, seed: int = 0):
    """Three well separated feature clusters (a site's labelled films) and a head that calls them all 0."""
    rng = np.random.default_rng(seed)
    y = np.repeat(np.arange(3), n)
    centres = rng.normal(0, 3, (3, dim))
    x = (centres[y] + rng.normal(0, 1, (len(y), dim))).astype(np.float32)
    torch.manual_seed(seed)
    head = Head(dim, 3, hidden=(64,))
    with torch.no_grad():
        head.net[-1].bias.copy_(torch.tensor([3.0, 0.0, 0.0]))  # the development head: wrong at this site
    return x, y, head


def _acc(head, x, y) -> float:
    with torch.inference_mode():
        return float((head.eval()(torch.from_numpy(x)).argmax(1).numpy() == y).mean())


@pytest.mark.slow  # site heads fitted at several depths
def test_the_site_head_learns_the_site_and_depth_and_prior_bound_what_moves():
    x, y, head = _site()
    assert _acc(head, x, y) == pytest.approx(1 / 3)
    full = fit_site_head(head, x, y, depth="head")
    last = fit_site_head(head, x, y, depth="last")
    assert _acc(full, x, y) > 0.95 and _acc(last, x, y) > 0.9
    assert torch.equal(last.net[0].weight, head.net[0].weight)  # depth "last": the first layer stays
    assert not torch.equal(full.net[0].weight, head.net[0].weight)
    held = fit_site_head(head, x, y, depth="head", prior=100.0)
    moved = lambda h: sum(float(((p - q) ** 2).sum()) for p, q in zip(h.parameters(), head.parameters()))  # noqa: E731
    assert moved(held) < moved(full)  # the prior pulls towards the development head
    assert torch.equal(head.net[-1].bias, torch.tensor([3.0, 0.0, 0.0]))  # the bundle's head is not touched


@pytest.mark.slow  # five folds of site heads
def test_out_of_fold_answers_are_on_films_the_head_did_not_fit():
    """Structured labels: out-of-fold accuracy high. Shuffled labels: in-sample the head fits them,
    out of fold it is near chance (it would be near 1 if a film's own answer had seen it)."""
    x, y, head = _site(n=15)
    oof = out_of_fold_logits(head, x, y)
    assert oof.shape == (len(y), 3) and (oof.argmax(1) == y).mean() > 0.9
    shuffled = np.random.default_rng(1).permutation(y)
    assert _acc(fit_site_head(head, x, shuffled), x, shuffled) > 0.8
    assert (out_of_fold_logits(head, x, shuffled).argmax(1) == shuffled).mean() < 0.6


def _darkened(src: Path, out: Path, labelled: bool) -> Path:
    """A second 'site': src's films darkened (gamma 3), in class folders or one unlabelled folder."""
    for i, p in enumerate(sorted(src.rglob("*.png"))):
        x = (np.asarray(Image.open(p).convert("L"), np.float32) / 255) ** 3
        dest = out / p.parent.name / p.name if labelled else out / f"{i}.png"
        dest.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray((x * 255).astype(np.uint8)).save(dest)
    return out


@pytest.mark.slow
def test_an_adapted_bundle_calls_its_site_fit_and_another_site_shifted(tiny_models, tiny_data, tmp_path):
    from covid_cxr.data.synthetic import make_synthetic_dataset
    from covid_cxr.site.check import check_site
    from covid_cxr.train.fit import TrainConfig, train

    size = load_bundle(tiny_models / "tiny").input_hw[0]
    site = _darkened(make_synthetic_dataset(tmp_path / "s1", per_class=12, size=size, seed=1), tmp_path / "site", True)
    fresh = _darkened(make_synthetic_dataset(tmp_path / "s2", per_class=8, size=size, seed=2), tmp_path / "fresh", False)
    assert check_site(load_bundle(tiny_models / "tiny"), fresh).result.verdict == "shift detected"  # before
    cfg = TrainConfig(init_from=str(tiny_models / "tiny"), lr_find=False, progress=False, name="adapted")
    r = train(site, tmp_path / "models", cfg, workdir=tmp_path / "work")
    b = load_bundle(r.bundle_path)
    ref = b.metadata.site_reference
    assert ref.computed_on.startswith("site films adapted on") and ref.n == sum(
        b.metadata.training.data.counts[s][c] for s in ("train", "val") for c in b.classes)
    assert b.metadata.trust.calibration.fitted_on.startswith("out-of-fold")
    assert check_site(b, fresh).result.verdict == "fit"  # fresh films of the site it was adapted on
    assert check_site(b, tiny_data).result.verdict == "shift detected"  # the other site still shifts
    assert "Site adaptation: before" in (b.report_dir / "metrics.md").read_text()


@pytest.mark.slow
def test_the_sites_prevalence_from_its_unlabelled_films_enters_the_adapted_model(tiny_models, tmp_path):
    """--site-unlabelled: the prevalence is estimated on those films and recorded, model.onnx answers
    with it (its mean answer on them moves to it), the reference stays the site's; too few films or no
    --init-from are refused."""
    from covid_cxr.core.errors import ConfigError
    from covid_cxr.data.synthetic import make_synthetic_dataset
    from covid_cxr.site.images import image_files, read_images
    from covid_cxr.train.fit import TrainConfig, train

    size = load_bundle(tiny_models / "tiny").input_hw[0]
    site = _darkened(make_synthetic_dataset(tmp_path / "s1", per_class=12, size=size, seed=1), tmp_path / "site", True)
    skewed = tmp_path / "skewed"  # a site whose films are mostly one class: 20 Normal, 4 of each other
    src = _darkened(make_synthetic_dataset(tmp_path / "s2", per_class=20, size=size, seed=2), tmp_path / "s2d", True)
    for c, k in (("COVID-19", 4), ("Normal", 20), ("Viral Pneumonia", 4)):
        for p in sorted((src / c).glob("*.png"))[:k]:
            (skewed / f"{c[0]}-{p.name}").parent.mkdir(exist_ok=True)
            (skewed / f"{c[0]}-{p.name}").write_bytes(p.read_bytes())
    (skewed / "broken.png").write_bytes(b"not a png")  # reported and skipped
    base = dict(init_from=str(tiny_models / "tiny"), lr_find=False, progress=False)
    plain = load_bundle(train(site, tmp_path / "models", TrainConfig(**base, name="plain"), workdir=tmp_path / "w").bundle_path)
    cfg = TrainConfig(**base, name="prev", site_unlabelled=str(skewed))
    b = load_bundle(train(site, tmp_path / "models", cfg, workdir=tmp_path / "w").bundle_path)
    prev = b.metadata.trust.prevalence
    assert prev.images == 28 and prev.skipped == 1 and sum(prev.prevalence.values()) == pytest.approx(1, abs=1e-3)
    assert prev.prevalence["Normal"] > prev.training_prior["Normal"]
    _, x = read_images(image_files(skewed), size, size)
    normal = b.classes.index("Normal")
    assert b.predict(x)[:, normal].mean() > plain.predict(x)[:, normal].mean()  # the shift is in model.onnx
    assert "answers with the site's prevalence" in (b.report_dir / "metrics.md").read_text()
    ref = b.metadata.site_reference  # the site's own films, as the adapted model answers them
    assert "unlabelled" in ref.computed_on and ref.n == 28 and sum(ref.predicted.values()) == 28
    assert plain.metadata.site_reference.predicted is None  # labelled per class: no class mix
    from covid_cxr.site.check import check_site

    assert check_site(b, skewed).result.verdict == "fit"
    from covid_cxr.bundle.card import card_markdown

    assert "this site's class prevalence, estimated on 28" in card_markdown(b.path, b.metadata)
    assert "class prevalence" not in card_markdown(plain.path, plain.metadata)
    few = tmp_path / "few"
    few.mkdir()
    for p in image_files(skewed)[:5]:
        (few / p.name).write_bytes(p.read_bytes())
    with pytest.raises(ConfigError, match="at least 20"):
        train(site, tmp_path / "models", TrainConfig(**base, name="few", site_unlabelled=str(few)), workdir=tmp_path / "w")
    with pytest.raises(ValueError, match="--init-from"):
        TrainConfig(site_unlabelled=str(skewed))

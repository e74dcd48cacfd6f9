"""The shift tests on generated numbers: what must pass as `fit`, what must be flagged, and Holm."""

from __future__ import annotations

import numpy as np
import pytest
from pydantic import ValidationError

from covid_cxr.bundle.schema import SiteReference
from covid_cxr.site.reference import Sample, build_reference, merged
from covid_cxr.site.shift import FIT, MIN_IMAGES, SHIFT, TOO_FEW, compare, holm, summary_words

CLASSES = ["COVID", "Normal", "Viral Pneumonia"]


def answers(n: int, rng, ood_loc: float = 1.0, mix=(0.4, 0.35, 0.25), sure: float = 4.0):
    """n made-up answers: probabilities leaning to a class drawn from `mix`, ood_score ~ lognormal."""
    cls = rng.choice(3, n, p=mix)
    logits = rng.normal(0, 1, (n, 3))
    logits[np.arange(n), cls] += sure
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    return Sample(probs, rng.lognormal(np.log(ood_loc), 0.3, n))


@pytest.fixture(scope="module")
def reference() -> SiteReference:
    return build_reference(answers(600, np.random.default_rng(0)), CLASSES)


def test_holm_matches_its_definition():
    p = [0.01, 0.04, 0.03, 0.5]
    # sorted 0.01, 0.03, 0.04, 0.5 -> 4*0.01, max(.04, 3*.03), max(.09, 2*.04), max(.09, .5)
    assert np.allclose(holm(p), [0.04, 0.09, 0.09, 0.5])
    assert holm([0.9, 0.9]).max() <= 1.0


def test_same_population_is_fit_and_false_alarms_stay_under_alpha(reference):
    rng = np.random.default_rng(1)
    verdicts = [compare(reference, answers(20, rng), CLASSES).verdict for _ in range(200)]
    assert verdicts.count(SHIFT) / len(verdicts) <= 0.03
    assert verdicts.count(FIT) >= 190


def test_images_further_from_training_are_flagged_in_words(reference):
    r = compare(reference, answers(20, np.random.default_rng(2), ood_loc=3.0), CLASSES)
    assert r.verdict == SHIFT
    moved = {s.name for s in r.moved}
    assert "ood_score" in moved
    assert "further from the training images" in summary_words(r)
    assert r.p_value <= 0.01


def test_a_moved_class_mix_is_flagged_with_its_shares(reference):
    r = compare(reference, answers(50, np.random.default_rng(3), mix=(0.05, 0.05, 0.9)), CLASSES)
    assert r.verdict == SHIFT
    mix = next(s for s in r.signals if s.name == "predicted class mix")
    assert mix.moved and "Viral Pneumonia" in mix.words and "%" in mix.words


def test_too_few_images_gives_no_verdict(reference):
    r = compare(reference, answers(MIN_IMAGES - 1, np.random.default_rng(4), ood_loc=9.0), CLASSES)
    assert r.verdict == TOO_FEW and r.signals == []
    assert str(MIN_IMAGES) in summary_words(r)
    assert compare(reference, answers(MIN_IMAGES, np.random.default_rng(4), ood_loc=9.0), CLASSES).verdict == SHIFT


def test_without_a_gate_the_other_signals_still_test():
    rng = np.random.default_rng(5)
    s = answers(300, rng)
    ref = build_reference(Sample(s.probs, None), CLASSES)
    r = compare(ref, answers(20, rng, sure=0.2), CLASSES)  # unsure answers
    assert [x.name for x in r.signals] == ["confidence", "predicted class mix"]
    assert r.verdict == SHIFT and "less confident" in summary_words(r)


def test_a_reference_without_a_class_mix_tests_everything_else(reference):
    """An adapted bundle's reference holds films labelled per class: a site's own prevalence, far
    from that mix, is not called a shift, while its answers moving still is."""
    rng = np.random.default_rng(6)
    no_mix = build_reference(answers(600, np.random.default_rng(0)), CLASSES, class_mix=False)
    assert no_mix.predicted is None and SiteReference.model_validate(no_mix.model_dump()) == no_mix
    skewed = answers(50, rng, mix=(0.05, 0.05, 0.9))
    assert compare(reference, skewed, CLASSES).verdict == SHIFT  # with the mix: flagged
    r = compare(no_mix, skewed, CLASSES)
    assert r.verdict == FIT and "predicted class mix" not in {s.name for s in r.signals}
    assert compare(no_mix, answers(20, rng, ood_loc=3.0), CLASSES).verdict == SHIFT
    assert merged(reference, no_mix).predicted is None


def test_reference_is_typed_and_merges(reference):
    assert reference.n == 600 and sum(reference.predicted.values()) == 600
    both = merged(reference, reference)
    assert both.n == 1200 and len(both.confidence) == 1200
    with pytest.raises(ValidationError):
        SiteReference.model_validate({**reference.model_dump(), "n": 0})
    with pytest.raises(ValidationError):
        SiteReference.model_validate({**reference.model_dump(), "pixels": [1]})  # extra="forbid"

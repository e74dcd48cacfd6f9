"""The serving monitor: bounded window, tests only when looked at, and its gauges, metadata view
and verdict moving in a live server fed a shifted stream."""

from __future__ import annotations

import base64
import io
import shutil

import numpy as np
import pytest
import requests
from PIL import Image

from covid_cxr.site import monitor as monitor_mod
from covid_cxr.site.images import image_files
from covid_cxr.site.monitor import ShiftMonitor
from covid_cxr.site.reference import Sample, build_reference

CLASSES = ["COVID", "Normal", "Viral Pneumonia"]


def rows(n: int, rng, ood_loc: float = 1.0) -> np.ndarray:
    probs = rng.dirichlet([8, 1, 1], n)[:, rng.permutation(3)] if n else np.zeros((0, 3))
    probs = np.stack([rng.permutation(p) for p in probs]) if n else probs
    ood = rng.lognormal(np.log(ood_loc), 0.3, n)
    return np.column_stack([probs, ood, (ood < 2.0).astype(float)])


@pytest.fixture(scope="module")
def reference():
    r = rows(600, np.random.default_rng(0))
    return build_reference(Sample(r[:, :3], r[:, 3]), CLASSES)


def test_window_is_bounded_and_fit_on_the_reference_population(reference):
    m = ShiftMonitor(reference, CLASSES, window=50)
    rng = np.random.default_rng(1)
    for _ in range(300):
        m.append(rows(1, rng))
    s = m.snapshot()
    assert s["n"] == 50 and s["answers_seen"] == 300 and s["verdict"] == "fit"
    assert abs(sum(s["class_mix"].values()) - 1) < 1e-9 and s["ood_rate"] is not None


def test_a_shifted_stream_is_flagged_and_tests_run_only_when_looked_at(reference, monkeypatch):
    m = ShiftMonitor(reference, CLASSES, window=50)
    rng = np.random.default_rng(2)
    calls = []
    real = monitor_mod.compare
    monkeypatch.setattr(monitor_mod, "compare", lambda *a, **k: calls.append(1) or real(*a, **k))
    for _ in range(30):
        m.append(rows(1, rng, ood_loc=4.0))
    assert calls == []  # appends never test
    s = m.snapshot()
    assert s["verdict"] == "shift detected" and s["p_value"] < 0.01 and s["ood_rate"] > 0.5
    assert m.snapshot() is s and len(calls) == 1  # cached until a new answer arrives
    m.append(rows(1, rng))
    assert m.snapshot() is not s and len(calls) == 2


def test_few_answers_and_no_reference_give_no_verdict(reference):
    m = ShiftMonitor(reference, CLASSES, window=50)
    assert m.snapshot()["verdict"] == "too few images" and m.snapshot()["n"] == 0
    bare = ShiftMonitor(None, CLASSES, window=50)
    bare.append(rows(20, np.random.default_rng(3), ood_loc=5.0))
    assert bare.snapshot()["verdict"] is None and "no site_reference" in bare.snapshot()["summary"]


def _b64(path, dark: bool) -> dict:
    img = Image.open(path).convert("L")
    if dark:
        img = Image.fromarray((np.asarray(img, np.float32) ** 3 / 255 ** 2).astype(np.uint8)).rotate(90)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return {"b64": base64.b64encode(buf.getvalue()).decode()}


def _gauge(text: str, name: str) -> float:
    line = next(li for li in text.splitlines() if li.startswith(name + "{"))
    return float(line.rsplit(" ", 1)[1])


def test_live_server_gauges_and_metadata_move_on_a_shifted_stream(tiny_models, tiny_data, tmp_path):
    from covid_cxr.serve.settings import ServeSettings
    from covid_cxr.serve.testing import running_server

    models = tmp_path / "models"
    shutil.copytree(tiny_models / "tiny" / "1", models / "tiny" / "1")
    files = image_files(tiny_data)
    with running_server(ServeSettings(models=models, monitor_window=30)) as url:
        meta = requests.get(f"{url}/v1/models/tiny/metadata", timeout=10).json()["metadata"]
        assert meta["site_monitor"]["n"] == 0 and meta["site_monitor"]["verdict"] == "too few images"
        for chunk in range(0, 30, 6):
            body = {"instances": [_b64(p, dark=True) for p in files[chunk:chunk + 6]]}
            assert requests.post(f"{url}/v1/models/tiny:predict", json=body, timeout=30).status_code == 200
        mon = requests.get(f"{url}/v1/models/tiny/metadata", timeout=10).json()["metadata"]["site_monitor"]
        assert mon["n"] == 30 and mon["verdict"] == "shift detected", mon
        text = requests.get(f"{url}/metrics", timeout=10).text
        assert _gauge(text, "covid_cxr_shift_detected") == 1.0
        assert _gauge(text, "covid_cxr_shift_p_value") <= 0.01
        assert _gauge(text, "covid_cxr_window_answers") == 30.0
        assert 'covid_cxr_window_class_share{class="' in text and "covid_cxr_window_ood_rate{" in text
    with running_server(ServeSettings(models=models, monitor_window=0)) as url:
        meta = requests.get(f"{url}/v1/models/tiny/metadata", timeout=10).json()["metadata"]
        assert "site_monitor" not in meta
        assert "covid_cxr_shift_detected{" not in requests.get(f"{url}/metrics", timeout=10).text

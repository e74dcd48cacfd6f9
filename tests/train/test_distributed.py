"""Training on 2 processes through Lightning (DDP, gloo on this CPU): the sharded feature
extraction gives the cached features of 1 process, and a fine-tuning run under DDP writes a bundle.

Small on purpose (generated 64 px images, random weights, 1 epoch); timings at scale are measured by
benchmarks/bench_distributed.py.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

from covid_cxr.bundle import load_bundle
from covid_cxr.features.cache import FeatureCache

pytestmark = pytest.mark.slow

FEATURES = textwrap.dedent("""
    import sys
    from pathlib import Path
    import lightning as L
    from covid_cxr.data import prepare
    from covid_cxr.models import create_model
    from covid_cxr.core.config import TrainConfig
    from covid_cxr.train.distributed import launch
    from covid_cxr.features.cache import cached_features

    data, out, devices, SPREAD = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
    cfg = TrainConfig(weights="none", image_size=64, devices=devices, progress=False)
    dist = launch(cfg)  # devices 2: Lightning re-runs this script as rank 1
    L.seed_everything(cfg.seed + SPREAD * dist.rank, verbose=False)  # as train() does (SPREAD 0): the same random backbone everywhere
    p = prepare(data, None, cfg.balance, None, cfg.seed, progress=False)
    model, source = create_model(cfg.arch, cfg.weights, len(p.classes), cfg.hidden, cfg.dropout, p.mean, p.std)
    feats = cached_features(model, p, cfg, source, out, dist)
    (out / f"rank{dist.rank}-of-{dist.world}").write_text(str(tuple(feats["train"][0].shape)))
""")


@pytest.fixture(scope="module")
def small_data(tmp_path_factory):
    from covid_cxr.data.synthetic import make_synthetic_dataset

    return make_synthetic_dataset(tmp_path_factory.mktemp("ddp-data"), per_class=8, size=64)


def _run(args: list[str], cwd) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    r = subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return r


def _cache(folder) -> FeatureCache:
    (path,) = folder.glob("*.safetensors")
    return FeatureCache(path)


def test_two_processes_extract_the_features_of_one(small_data, tmp_path):
    script = tmp_path / "features.py"
    script.write_text(FEATURES)
    _run([str(script), str(small_data), str(tmp_path / "c1"), "1", "0"], tmp_path)
    _run([str(script), str(small_data), str(tmp_path / "c2"), "2", "0"], tmp_path)
    assert sorted(p.name for p in (tmp_path / "c2").glob("rank*")) == ["rank0-of-2", "rank1-of-2"]
    assert (tmp_path / "c1" / "rank0-of-1").read_text() == (tmp_path / "c2" / "rank1-of-2").read_text()
    a, b = _cache(tmp_path / "c1"), _cache(tmp_path / "c2")
    assert set(a.rows) == set(b.rows) and len(a.rows) == 24
    diff = max(float((a.rows[k] - b.rows[k]).abs().max()) for k in a.rows)
    assert diff < 1e-4, diff  # other batch compositions: float rounding only
    # seeded differently, each rank would build its own random backbone: refused, not mixed
    bad = subprocess.run([sys.executable, str(script), str(small_data), str(tmp_path / "c3"), "2", "1"],
                         cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert bad.returncode != 0 and "different backbones" in bad.stderr


def test_finetuning_under_ddp_writes_a_bundle(small_data, tmp_path):
    out = tmp_path / "models"
    r = _run(["-m", "covid_cxr", "train", "--data", str(small_data), "--out", str(out), "--weights", "none",
              "--image-size", "64", "--epochs", "1", "--finetune", "--finetune-epochs", "1", "--devices", "2",
              "--strategy", "ddp",
              "--batch-size", "4", "--name", "ddp"], tmp_path)
    assert r.stdout.count("bundle: ") == 1  # the main process reports; the other one is silent
    b = load_bundle(out / "ddp")
    cfg = b.metadata.training.config
    # staged fine-tuning (issue 9): one epoch of the head on cached features, then one of the last stages
    assert (cfg.devices, cfg.strategy, cfg.finetune, b.metadata.training.history.epochs_run) == (2, "ddp", True, 2)
    (metrics_csv,) = (out / ".work" / "logs" / "ddp").rglob("metrics.csv")
    assert "val_acc" in metrics_csv.read_text().splitlines()[0]
    assert json.loads((b.path / "metadata.json").read_text())["version"] == 1

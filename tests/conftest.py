"""Shared fixtures: the real dataset in ../shared/data and real model bundles built from it."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
_CANDIDATES = [REPO.parent / "shared" / "data" / "covid19-radiography",  # beside the checkout
               Path("/work/shared/data/covid19-radiography")]  # a clean clone elsewhere (CI)
DATA = Path(os.environ["COVID_CXR_DATA"]) if os.environ.get("COVID_CXR_DATA") else \
    next((p for p in _CANDIDATES if p.is_dir()), _CANDIDATES[0])
ARTIFACTS = REPO / "test-artifacts"


@pytest.fixture(scope="session")
def data_dir() -> Path:
    if not DATA.is_dir():
        pytest.fail(f"real dataset not found at {DATA} (set COVID_CXR_DATA)")
    return DATA


@pytest.fixture(scope="session")
def artifacts_dir() -> Path:
    ARTIFACTS.mkdir(exist_ok=True)
    return ARTIFACTS


def sample_images(data_dir: Path, per_class: int = 2) -> dict[str, list[Path]]:
    """A few real X-rays per class folder, in a stable order."""
    out = {}
    for d in sorted(p for p in data_dir.iterdir() if p.is_dir()):
        out[d.name] = sorted(d.glob("*.png"))[:per_class]
    return out


@pytest.fixture(scope="session")
def models_dir(tmp_path_factory, data_dir) -> Path:
    """A model repository with one real efficientnet_lite0 bundle (ImageNet backbone, trained head)."""
    from covid_cxr.train.fit import TrainConfig, train

    out = tmp_path_factory.mktemp("models")
    cfg = TrainConfig(arch="efficientnet_lite0", weights="imagenet", epochs=15, batch_size=32,
                      balance="undersample", max_per_class=40, seed=0, image_size=224, progress=False)
    train(data_dir, out, cfg, workdir=tmp_path_factory.mktemp("work"))
    return out


@pytest.fixture(scope="session")
def bundle_dir(models_dir) -> Path:
    """The newest version folder of the fixture model: MODELS/efficientnet_lite0/<v>."""
    from covid_cxr.bundle import load_bundle

    return load_bundle(models_dir / "efficientnet_lite0").path


@pytest.fixture
def rng():
    return np.random.default_rng(0)

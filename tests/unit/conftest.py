"""The fast unit tier (`make test-fast`): no ../shared/data, tiny generated images, `--weights none`,
64-pixel inputs. One tiny real bundle per session is shared by the bundle tests."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from tests.unit.builds import TINY, built_once, train_tiny


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> Path:
    """A generated 3-class dataset in plain class folders: 12 drawn 64x64 images per class."""
    from covid_cxr.data.synthetic import make_synthetic_dataset

    return make_synthetic_dataset(tmp_path_factory.mktemp("tiny-data"), per_class=12, size=TINY)


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory, worker_id) -> Path:
    """MODELS/tiny/1, trained once per run (built_once), tracked in MLflow's local file store
    MODELS/.work/mlruns, which test_tracking reads back."""
    def build(folder: Path, scratch: Path) -> None:
        train_tiny(folder, scratch, name="tiny", logger="mlflow",
                   tracking_uri=(folder / ".work" / "mlruns").as_uri())

    return built_once(tmp_path_factory, worker_id, "tiny-models", build)


@pytest.fixture
def bundle_copy(tiny_models, tmp_path) -> Path:
    """A private copy of the tiny bundle (MODELS/tiny/1) that a test may break."""
    dst = tmp_path / "models" / "tiny" / "1"
    shutil.copytree(tiny_models / "tiny" / "1", dst)
    return dst

"""`covid-cxr data download DEST`: the COVID-19 Radiography Database from Kaggle, through kagglehub.

kagglehub reads the credentials as it always does (KAGGLE_USERNAME/KAGGLE_KEY, or
~/.kaggle/kaggle.json; the dataset is public, but Kaggle may still ask for them). Before anything,
one TCP connection to Kaggle is tried with a short timeout, so an offline machine gets one line
saying what to do within seconds instead of kagglehub's retries.
"""

from __future__ import annotations

import socket
from pathlib import Path
from urllib.parse import urlparse

from covid_cxr.core.errors import UserError

DATASET = "tawsifurrahman/covid19-radiography-database"
CONNECT_TIMEOUT_S = 5.0


class DownloadError(UserError):
    """The dataset could not be fetched; the message says what to do instead."""


def _endpoint() -> str:
    """Kaggle's API address as kagglehub's client reads it (KAGGLE_API_ENDPOINT overrides)."""
    import os

    from kagglehub.config import DEFAULT_KAGGLE_API_ENDPOINT

    return os.environ.get("KAGGLE_API_ENDPOINT", DEFAULT_KAGGLE_API_ENDPOINT)


def check_reachable(endpoint: str, timeout: float = CONNECT_TIMEOUT_S) -> None:
    url = urlparse(endpoint)
    host, port = url.hostname or endpoint, url.port or (80 if url.scheme == "http" else 443)
    try:
        socket.create_connection((host, port), timeout=timeout).close()
    except OSError as exc:
        raise DownloadError(f"cannot reach {host}:{port} ({exc.strerror or exc}): download the COVID-19 "
                            f"Radiography Database ({DATASET}) on a machine online, copy it here and pass "
                            "its folder to --data") from None


def download(dest: Path, force: bool = False) -> Path:
    """Fetch the dataset into `dest` (kagglehub unpacks it); returns the folder to pass to --data."""
    try:
        import kagglehub
    except ImportError:
        raise DownloadError("covid-cxr data download needs kagglehub: pip install kagglehub") from None
    check_reachable(_endpoint())
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    try:
        path = Path(kagglehub.dataset_download(DATASET, output_dir=str(dest), force_download=force))
    except Exception as exc:  # kagglehub raises its own and requests' types (auth, 404, network)
        raise DownloadError(f"kagglehub could not fetch {DATASET}: {type(exc).__name__}: "
                            f"{str(exc).splitlines()[0] if str(exc) else ''} (credentials: KAGGLE_USERNAME "
                            "and KAGGLE_KEY, or ~/.kaggle/kaggle.json)") from None
    return data_root(path)


def data_root(path: Path) -> Path:
    """The folder holding the class folders (the archive nests them one level down)."""
    nested = [p for p in path.iterdir() if p.is_dir() and (p / "COVID").is_dir()] if path.is_dir() else []
    return nested[0] if len(nested) == 1 else path

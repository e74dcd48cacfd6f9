"""Serving: FastAPI app factory, TensorFlow Serving REST protocol, upload API, web page."""

from covid_cxr.serve.settings import ServeSettings

__all__ = ["ServeSettings", "create_app"]


def create_app(settings: ServeSettings):
    """Lazy re-export (importing the app pulls in FastAPI and ONNX Runtime)."""
    from covid_cxr.serve.app import create_app as _create_app

    return _create_app(settings)

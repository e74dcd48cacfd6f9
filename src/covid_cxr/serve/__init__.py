"""Serving: FastAPI app factory, TensorFlow Serving REST protocol, upload API, web page."""

"""Defer importing a heavy module until something actually uses it (here: torch in the server).

`covid_cxr.bundle` imports torch at module level for export and parity checks, which the server
never calls; importing torch costs ~600 MB of resident memory, more than the whole ONNX Runtime
server. `defer("torch")` puts a stand-in into `sys.modules`: `import torch` binds the stand-in,
and the first attribute read (`torch.no_grad`, `from torch import nn`, Grad-CAM's model loading)
imports the real torch, which from then on replaces the stand-in everywhere it is looked up.

Only the `serve` command (a process of its own) uses this. Once `covid_cxr.bundle` imports torch
inside the functions that need it, this module can go.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
import threading
import types

_lock = threading.Lock()


class _Deferred(types.ModuleType):
    """Stand-in module: any attribute read imports the real module and forwards to it."""

    def __getattr__(self, attr: str):
        return getattr(_real(self.__name__), attr)


def _real(name: str) -> types.ModuleType:
    with _lock:
        if isinstance(sys.modules.get(name), _Deferred):
            del sys.modules[name]
        return importlib.import_module(name)


def defer(name: str) -> bool:
    """Install the stand-in unless `name` is already imported (or not installed); True if it did."""
    if name in sys.modules or importlib.util.find_spec(name) is None:
        return False
    sys.modules[name] = _Deferred(name)
    return True

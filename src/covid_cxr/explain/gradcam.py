"""Grad-CAM (and relatives, through the grad-cam package) on the architecture's registered layer.

The classifier's backbone is frozen (``requires_grad=False``), so as it stands no gradient would
reach the target layer and the grad-cam package would silently record none. Rather than unfreezing
weights, every explanation runs on a *light copy* of the model: its modules are copied, its
parameters and buffers are shared (no extra memory, always the model's current weights), in-place
activations are switched off (DenseNet's / VGG's ``ReLU(inplace=True)`` would otherwise overwrite
a hooked tensor), and a forward hook makes the target layer's output a fresh leaf that requires
grad. Backward then runs only from the logits down to the target layer: no weight gradients, no
backward through the stem, which keeps it cheap on a CPU.

Public face:
    explain_array(model, pixels_hw, class_index=None, method="gradcam") -> Explanation
    overlay(pixels_hw, cam, alpha=0.4) -> uint8 RGB
    overlay_for_bundle(bundle, pixels_hw, ...) -> (png_bytes, Explanation)   # the server's call
"""

from __future__ import annotations

import copy
import threading
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn

from covid_cxr.models.loading import load_torch

from covid_cxr.explain.render import (  # noqa: F401  (re-exported)
    _METHOD_CLASSES,
    DEFAULT_METHOD,
    METHODS,
    Explanation,
    overlay,
    png_bytes,
)
from covid_cxr.explain.render import as_batch as _as_batch

SCORECAM_BATCH = 64


def method_class(name: str) -> type:
    """The grad-cam class behind a method name (see METHODS)."""
    key = name.strip().lower()
    if key not in _METHOD_CLASSES:
        raise ValueError(f"unknown CAM method {name!r}; choose from {', '.join(METHODS)}")
    import pytorch_grad_cam

    return getattr(pytorch_grad_cam, _METHOD_CLASSES[key])


# --------------------------------------------------------------------------- model preparation

_HOOK_DICTS = ("_forward_hooks", "_forward_hooks_with_kwargs", "_forward_hooks_always_called",
               "_forward_pre_hooks", "_forward_pre_hooks_with_kwargs", "_backward_hooks",
               "_backward_pre_hooks")


def cam_copy(model: nn.Module) -> nn.Module:
    """Copy `model`'s modules, sharing its parameters and buffers, without its hooks, with every
    in-place activation switched off, in eval mode. The original is not touched."""
    memo: dict[int, object] = {}
    for t in list(model.parameters()) + list(model.buffers()):
        memo[id(t)] = t
    for m in model.modules():
        for attr in _HOOK_DICTS:
            d = getattr(m, attr, None)
            if d is not None:
                memo[id(d)] = type(d)()
    clone = copy.deepcopy(model, memo)
    for m in clone.modules():
        if isinstance(getattr(m, "inplace", None), bool):
            m.inplace = False
    return clone.eval()


def _gradient_entry(module: nn.Module, args, output):
    """Forward hook: cut the graph below the target layer and let gradients start from here."""
    if isinstance(output, torch.Tensor) and torch.is_grad_enabled():
        return output.detach().requires_grad_(True)
    return None


def target_layer_name(model: nn.Module) -> str:
    spec = getattr(model, "spec", None)
    if spec is None or not getattr(spec, "cam_layer", ""):
        raise ValueError("model has no registered Grad-CAM layer (expected a covid_cxr Classifier)")
    return spec.cam_layer


class Explainer:
    """Grad-CAM for one classifier, reusable across images and methods (thread-safe)."""

    def __init__(self, model: nn.Module, layer: str | None = None, temperature: float = 1.0):
        self.temperature = float(temperature)  # the bundle's calibration: probabilities as model.onnx gives them
        self.layer_name = layer or target_layer_name(model)
        self.model = cam_copy(model)
        backbone = getattr(self.model, "backbone", self.model)
        # Several comma-separated layers (an ensemble: one per member): grad-cam averages their maps.
        try:
            self.layers = [backbone.get_submodule(n.strip()) for n in self.layer_name.split(",")]
        except AttributeError as exc:
            raise ValueError(f"Grad-CAM layer {self.layer_name!r} not found in the backbone: {exc}") from exc
        self.layer = self.layers[0]
        self._hooks = [m.register_forward_hook(_gradient_entry) for m in self.layers]  # before grad-cam's
        self._lock = threading.Lock()
        head = getattr(self.model, "head", None)
        linears = [m for m in head.modules() if isinstance(m, nn.Linear)] if head is not None else []
        self.num_classes: int | None = linears[-1].out_features if linears else None

    def close(self) -> None:
        for h in self._hooks:
            h.remove()

    def explain(self, pixels: np.ndarray, class_index: int | Sequence[int] | None = None,
                method: str = DEFAULT_METHOD) -> list[Explanation]:
        """Explain one image (H x W) or a batch (N x H x W) of float pixels in [0, 1].

        `class_index`: None (each image's predicted class), one index for all, or one per image.
        """
        from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

        cls = method_class(method)
        batch = _as_batch(pixels)
        n = len(batch)
        if class_index is None:
            wanted: list[int | None] = [None] * n
        elif isinstance(class_index, (int, np.integer)):
            wanted = [int(class_index)] * n
        else:
            wanted = [None if c is None else int(c) for c in class_index]
            if len(wanted) != n:
                raise ValueError(f"{len(wanted)} class indices for {n} images")
        for t in wanted:
            if t is not None and self.num_classes is not None and not 0 <= t < self.num_classes:
                raise ValueError(f"class index {t} out of range: the model has {self.num_classes} classes")
        with self._lock, torch.inference_mode(False), torch.enable_grad():
            x = torch.from_numpy(np.ascontiguousarray(batch[:, None]))
            if any(t is None for t in wanted) and not all(t is None for t in wanted):
                with torch.no_grad():
                    predicted = self.model(x).argmax(dim=1).tolist()
                wanted = [p if t is None else t for t, p in zip(wanted, predicted)]
            # all None: grad-cam picks each image's predicted class from the same forward pass
            targets = None if wanted[0] is None else [ClassifierOutputTarget(t) for t in wanted]
            cam = cls(model=self.model, target_layers=self.layers)
            cam.batch_size = SCORECAM_BATCH  # ScoreCAM: masked copies per forward pass (its default: 16)
            try:
                maps = cam(input_tensor=x, targets=targets)
                logits = cam.outputs.detach()
            finally:
                cam.activations_and_grads.release()
        probs = torch.softmax(logits.float() / self.temperature, dim=1).numpy()
        if targets is None:
            wanted = [int(np.argmax(p)) for p in probs]
        maps = np.nan_to_num(np.asarray(maps, dtype=np.float32), nan=0.0, posinf=0.0, neginf=0.0)
        maps = np.clip(maps, 0.0, 1.0)
        return [Explanation(m, int(t), p.astype(np.float32), method.strip().lower())
                for m, t, p in zip(maps, wanted, probs)]


def explain_array(model: nn.Module, pixels_hw: np.ndarray, class_index: int | None = None,
                  method: str = DEFAULT_METHOD, layer: str | None = None) -> Explanation:
    """Grad-CAM map of one grayscale image (H x W float [0, 1], already at the model's input size)
    for the predicted class or `class_index`, on the architecture's registered layer."""
    explainer = Explainer(model, layer)
    try:
        return explainer.explain(pixels_hw, class_index, method)[0]
    finally:
        explainer.close()


# --------------------------------------------------------------------------- bundles (server)

_CACHE_SIZE = 4
_cache: OrderedDict[str, Explainer] = OrderedDict()
_cache_lock = threading.Lock()


def explainer_for_bundle(bundle) -> Explainer:
    """The bundle's PyTorch model, loaded once per bundle folder (a few kept, least recent dropped)."""
    from covid_cxr.bundle import load_bundle

    if isinstance(bundle, (str, Path)):
        bundle = load_bundle(bundle)
    key = str(Path(bundle.path).resolve())
    with _cache_lock:
        found = _cache.get(key)
        if found is not None:
            _cache.move_to_end(key)
            return found
    # outside the lock: loading takes a while. Layer and architecture come from the bundle's metadata.
    explainer = Explainer(load_torch(bundle), layer=bundle.metadata.architecture.cam_layer,
                          temperature=bundle.temperature)
    with _cache_lock:
        found = _cache.get(key)
        if found is not None:
            explainer.close()
            _cache.move_to_end(key)
            return found
        _cache[key] = explainer
        while len(_cache) > _CACHE_SIZE:
            _cache.popitem(last=False)[1].close()
        return explainer


def overlay_for_bundle(bundle, pixels_hw_float01: np.ndarray, class_index: int | None = None,
                       method: str = DEFAULT_METHOD, alpha: float = 0.4) -> tuple[bytes, Explanation]:
    """Explain one decoded image with a bundle's model: resize to its input size, Grad-CAM, blend.

    Returns the overlay as PNG bytes (at the model's input size) and the explanation; for a bundle
    trained on lung-only input, over the cropped image the model saw."""
    from covid_cxr.bundle import load_bundle
    from covid_cxr.data.decode import resize

    if isinstance(bundle, (str, Path)):
        bundle = load_bundle(bundle)
    h, w = bundle.input_hw
    pixels = resize(_as_batch(pixels_hw_float01)[0], h, w)
    pixels = bundle.prepare(np.clip(pixels, 0.0, 1.0)[None])[0]  # the lung crop of a --lung-crop bundle
    if bundle.has_cam and method.strip().lower() == DEFAULT_METHOD:  # the graph's map: no torch model
        from covid_cxr.explain.render import GraphExplainer

        explanation = GraphExplainer(bundle).explain(pixels, class_index)[0]
    else:
        explanation = explainer_for_bundle(bundle).explain(pixels, class_index, method)[0]
    return png_bytes(overlay(pixels, explanation.cam, alpha)), explanation

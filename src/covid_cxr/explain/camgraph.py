"""Grad-CAM as plain forward arithmetic, so that it can be exported to ONNX (`cam.onnx`) and the
server explains with ONNX Runtime alone, without torch.

Why this is exact: the classifier's head sees the *mean* of the last feature map A (N x K x h x w).
The gradient of a class score s w.r.t. A[k, i, j] is therefore (1 / hw) * ds/dpooled_k for every
(i, j), and Grad-CAM's channel weights (the spatial mean of that gradient) are ds/dpooled / hw.
For an MLP head (Linear, ReLU, Dropout in eval) ds/dpooled is the product of its weight matrices
with the ReLU masks of this very forward pass: a Jacobian computed forwards. An ensemble's score
(the log of its members' averaged, temperature-scaled probabilities, what EnsembleClassifier
returns) has a closed-form gradient w.r.t. each member's logits as well. The rest copies
pytorch-grad-cam's GradCAM: ReLU, min-max per map, bilinear resize (cv2's INTER_LINEAR =
half-pixel), mean over target layers (members) and min-max again.

This holds only where the Grad-CAM layer *is* the map the head pools (EfficientNet-Lite's bn2,
ResNet's layer4, DenseNet's norm5; not VGG's features.29, which a max-pool follows):
`closed_form_holds` checks it on the model itself.
"""

from __future__ import annotations

import torch
from torch import nn

from covid_cxr.models.classifier import Classifier, EnsembleClassifier

TARGET_SINGLE = "logit of the class (what pytorch-grad-cam's ClassifierOutputTarget takes)"
TARGET_ENSEMBLE = "log of the members' averaged temperature-scaled probability of the class (the ensemble's output)"


def head_jacobian(head: nn.Module, pooled: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits N x C, d logits / d pooled N x C x K) of a covid_cxr Head (Linear/ReLU/Dropout)."""
    t, ops = pooled, []
    for layer in head.net:
        if isinstance(layer, nn.Linear):
            t = layer(t)
            ops.append(("weight", layer.weight))
        elif isinstance(layer, nn.ReLU):
            ops.append(("mask", (t > 0).to(t.dtype)))
            t = torch.relu(t)
        elif not isinstance(layer, nn.Dropout):  # Dropout: identity in eval
            raise ValueError(f"no closed-form Grad-CAM through a {type(layer).__name__} in the head")
    jac = None
    for kind, op in reversed(ops):  # the chain rule, from the logits down to the pooled features
        if kind == "weight":
            jac = op if jac is None else jac @ op
        else:  # a ReLU mask, N x width
            jac = jac * op[:, None, :]
    if jac.dim() == 2:
        jac = jac.expand(pooled.shape[0], -1, -1)
    return t, jac


def _minmax(cam: torch.Tensor) -> torch.Tensor:
    """pytorch-grad-cam's scale_cam_image, per map (the last two dimensions)."""
    cam = cam - cam.amin(dim=(-2, -1), keepdim=True)
    return cam / (1e-7 + cam.amax(dim=(-2, -1), keepdim=True))


class CamGraph(nn.Module):
    """N x H x W x 1 images in [0, 1] -> N x C x H x W Grad-CAM maps in [0, 1], one per class."""

    def __init__(self, model: nn.Module, height: int, width: int):
        super().__init__()
        self.ensemble = isinstance(model, EnsembleClassifier)
        self.members = nn.ModuleList(model.members if self.ensemble else [model])
        self.temperatures = list(getattr(model, "temperatures", [1.0]))
        self.size = (int(height), int(width))

    def forward(self, images_nhwc: torch.Tensor) -> torch.Tensor:
        x = images_nhwc.permute(0, 3, 1, 2)
        feats, logits, jacs = [], [], []
        for m in self.members:
            a = m.backbone.forward_features((x - m.mean) / m.std)
            z, jac = head_jacobian(m.head, a.mean(dim=(2, 3)))
            feats.append(a)
            logits.append(z)
            jacs.append(jac)
        maps = []
        for k, (a, jac) in enumerate(zip(feats, jacs)):
            grads = self._score_gradient(logits, k) @ jac if self.ensemble else jac  # N x C x K
            weights = grads / float(a.shape[2] * a.shape[3])  # the spatial mean of dscore/dA
            cam = torch.relu(torch.einsum("nck,nkhw->nchw", weights, a))
            cam = nn.functional.interpolate(_minmax(cam), size=self.size, mode="bilinear", align_corners=False)
            maps.append(cam)
        return _minmax(torch.relu(torch.stack(maps).mean(dim=0))).clamp(0.0, 1.0)

    def _score_gradient(self, logits: list[torch.Tensor], k: int) -> torch.Tensor:
        """d log(mean_m softmax(z_m / T_m))[c] / d z_k for every class c: N x C x C (row c)."""
        probs = [torch.softmax(z / t, dim=1) for z, t in zip(logits, self.temperatures)]
        mean = torch.stack(probs).mean(dim=0).clamp_min(1e-12)  # N x C
        p = probs[k]
        eye = torch.eye(p.shape[1], dtype=p.dtype)
        coef = p / (len(probs) * self.temperatures[k] * mean)  # N x C
        return coef[:, :, None] * (eye[None] - p[:, None, :])


def _member_layers(model: nn.Module) -> list[tuple[Classifier, str]]:
    """(member, its Grad-CAM layer inside its backbone) for a classifier or an ensemble."""
    if isinstance(model, EnsembleClassifier):
        names = [n.strip() for n in model.spec.cam_layer.split(",")]
        if len(names) != len(model.members):
            return []
        return [(m, n.split("backbone.", 1)[-1]) for m, n in zip(model.members, names)]
    return [(model, model.spec.cam_layer)]


def closed_form_holds(model: nn.Module, height: int, width: int) -> bool:
    """Whether each Grad-CAM layer's output is exactly the feature map the head pools (then
    CamGraph is pytorch-grad-cam's GradCAM); checked on one random image, not assumed."""
    pairs = _member_layers(model)
    if not pairs or not all(isinstance(m, Classifier) for m, _ in pairs):
        return False
    x = torch.rand(1, 1, height, width, generator=torch.Generator().manual_seed(0))
    for m, name in pairs:
        seen: list[torch.Tensor] = []
        try:
            layer = m.backbone.get_submodule(name)
        except AttributeError:
            return False
        hook = layer.register_forward_hook(lambda mod, args, out: seen.append(out))
        try:
            with torch.no_grad():
                feats = m.backbone.forward_features((x - m.mean) / m.std)
        finally:
            hook.remove()
        if len(seen) != 1 or not isinstance(seen[0], torch.Tensor) or seen[0].shape != feats.shape \
                or not torch.equal(seen[0], feats):
            return False
    return True


def cam_target(model: nn.Module) -> str:
    return TARGET_ENSEMBLE if isinstance(model, EnsembleClassifier) else TARGET_SINGLE

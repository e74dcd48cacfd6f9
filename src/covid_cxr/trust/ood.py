"""Out-of-distribution gate: how far an image's pooled backbone features lie from the training
images', as the squared Mahalanobis distance to the nearest class mean under one shared covariance
(Lee et al. 2018), with Ledoit-Wolf shrinkage so 1,280 feature dimensions and a few thousand images
still give a well-conditioned precision matrix.

Why this and not the softmax: a classifier trained on three classes must spread its probability
over those three, so a flower or random noise gets `Normal 1.000`. The features still say the image
is unlike anything seen in training. The energy score (-logsumexp of the logits, Liu et al. 2020)
was measured beside it (benchmarks/bench_ood.py) and rejects far fewer non-X-rays.

Fitted on the training split; the threshold accepts `ACCEPT` of the validation split. The class
means, the Cholesky factor of the precision matrix and the threshold become constants of the
exported ONNX graph (`TrustedModel`), so every reader of the bundle gets `ood_score` and
`in_distribution` without extra code.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

ACCEPT = 0.95  # share of the validation split the threshold accepts
METHOD = "mahalanobis"


@dataclass
class OODStats:
    means: np.ndarray  # C x F class means of the training features
    chol: np.ndarray  # F x F lower-triangular L with precision = L @ L.T
    threshold: float  # scores above it are out of distribution
    shrinkage: float = 0.0

    def score(self, feats: np.ndarray) -> np.ndarray:
        """Squared Mahalanobis distance to the nearest class mean (numpy, float64)."""
        d = np.asarray(feats, np.float64)[:, None, :] - self.means[None].astype(np.float64)
        z = d @ self.chol.astype(np.float64)
        return (z ** 2).sum(axis=2).min(axis=1)

    def accepts(self, feats: np.ndarray) -> np.ndarray:
        return self.score(feats) <= self.threshold


def fit_gaussians(feats: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray, float]:
    """Class means, and the Cholesky factor of the shared (shrunk) covariance's inverse."""
    from sklearn.covariance import LedoitWolf

    feats = np.asarray(feats, np.float64)
    labels = np.asarray(labels)
    classes = np.unique(labels)
    means = np.stack([feats[labels == c].mean(axis=0) for c in classes])
    centred = feats - means[np.searchsorted(classes, labels)]
    lw = LedoitWolf(assume_centered=True).fit(centred)
    precision = np.linalg.inv(lw.covariance_)
    precision = (precision + precision.T) / 2
    return means, np.linalg.cholesky(precision), float(lw.shrinkage_)


def fit_ood(train: tuple[np.ndarray, np.ndarray], val_feats: np.ndarray, accept: float = ACCEPT) -> OODStats:
    """Gaussians from the training split; threshold at the `accept` quantile of validation scores."""
    means, chol, shrink = fit_gaussians(*train)
    stats = OODStats(means, chol, float("inf"), shrink)
    stats.threshold = float(np.quantile(stats.score(val_feats), accept)) if len(val_feats) else float("inf")
    return stats


def energy(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """The energy score -T logsumexp(logits / T): the alternative measured in benchmarks/bench_ood.py."""
    z = np.asarray(logits, np.float64) / temperature
    m = z.max(axis=1)
    return -temperature * (m + np.log(np.exp(z - m[:, None]).sum(axis=1)))


def trusted_module(classifier, temperature: float, stats: OODStats | None):
    """The exported model: NHWC images -> probabilities (temperature-scaled)[, ood_score, in_distribution]."""
    import torch
    from torch import nn

    class TrustedModel(nn.Module):
        def __init__(self):
            super().__init__()
            self.classifier = classifier
            self.register_buffer("temperature", torch.tensor(float(temperature)))
            if stats is not None:
                self.register_buffer("means", torch.from_numpy(stats.means.astype(np.float32)))
                self.register_buffer("chol", torch.from_numpy(stats.chol.astype(np.float32)))
                self.register_buffer("threshold", torch.tensor(float(stats.threshold)))

        def forward(self, images_nhwc: torch.Tensor):
            feats = self.classifier.features(images_nhwc.permute(0, 3, 1, 2))
            probs = torch.softmax(self.classifier.head(feats) / self.temperature, dim=1)
            if stats is None:
                return probs
            z = (feats[:, None, :] - self.means[None]) @ self.chol
            score = (z * z).sum(dim=2).amin(dim=1)
            return probs, score, (score <= self.threshold).to(probs.dtype)

    return TrustedModel().eval()


def ood_summary(stats: OODStats, val_feats: np.ndarray, test_feats: np.ndarray | None, n_train: int) -> dict:
    """What the bundle's metadata records about the gate."""
    out = {"method": METHOD, "score": "squared Mahalanobis distance of the pooled backbone features to the "
           "nearest training-class mean (shared Ledoit-Wolf covariance); larger = less like the training images",
           "threshold": stats.threshold, "accept_target": ACCEPT, "fitted_on": "train split",
           "threshold_on": "val split", "n_train": int(n_train), "feature_dim": int(stats.means.shape[1]),
           "shrinkage": stats.shrinkage, "val_accept_rate": float(stats.accepts(val_feats).mean())}
    if test_feats is not None and len(test_feats):
        out["test_accept_rate"] = float(stats.accepts(test_feats).mean())
    return out

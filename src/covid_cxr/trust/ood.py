"""Out-of-distribution gate: how far an image lies from the training images in the backbone's
features, as Lee et al. (2018)'s feature ensemble of Mahalanobis scores. Each block of
`trust.stages.StageStats` (the pooled features the head sees; each intermediate stage's channel means
and standard deviations) gets class-conditional Gaussians with one shared Ledoit-Wolf covariance (a
well-conditioned precision matrix from a few thousand images), and its squared distance to the
nearest class mean is divided by its own 95 % validation quantile; the gate's score is the sum.

Why: the pooled features alone (the first gate) let through 37 % of inverted X-rays, 19 % of single
corners, 4-5 % of blank images and rotated X-rays; the early stages' intensity and texture statistics
catch them (docs/results/trust.md). Lee et al. weight the stages by a regression on OOD
examples; with none to fit on honestly, each stage is put on the same scale by its validation
quantile and the scores added (the sum beat the max on a dev set of generated images). The energy
score (-logsumexp of the logits, Liu et al. 2020) was measured beside it (benchmarks/bench_ood.py)
and rejects far fewer non-X-rays.

Fitted on the training split; the threshold accepts `ACCEPT` of the validation split. The class
means, the Cholesky factors of the precision matrices, the scales and the threshold become constants
of the exported ONNX graph (`TrustedModel`), so every reader of the bundle gets `ood_score` and
`in_distribution` without extra code.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

ACCEPT = 0.95  # share of the validation split the threshold accepts
METHOD = "mahalanobis-stages"
COMBINE = "sum of the stages' squared Mahalanobis distances, each divided by its 95 % validation quantile"
ENSEMBLE_METHOD = "mahalanobis-stages-ensemble"
ENSEMBLE_COMBINE = ("mean over the members of each member's mahalanobis-stages ood_score divided by that "
                    "member's threshold")


@dataclass
class StageGaussians:
    """One block of the feature vector (columns start:stop) and its class-conditional Gaussians."""

    name: str
    start: int
    stop: int
    means: np.ndarray  # C x F class means of the training features
    chol: np.ndarray  # F x F lower-triangular L with precision = L @ L.T
    scale: float = 1.0  # the block's distances are divided by it (its validation quantile)
    shrinkage: float = 0.0

    def score(self, feats: np.ndarray) -> np.ndarray:
        """Squared Mahalanobis distance to the nearest class mean / scale (numpy, float64)."""
        x = np.asarray(feats, np.float64)[:, self.start:self.stop]
        z = (x[:, None, :] - self.means[None].astype(np.float64)) @ self.chol.astype(np.float64)
        return (z ** 2).sum(axis=2).min(axis=1) / self.scale


@dataclass
class OODStats:
    stages: list[StageGaussians]
    threshold: float  # scores above it are out of distribution
    indices: tuple[int, ...] = ()  # the backbone stages StageStats computes (() = pooled features only)

    def score(self, feats: np.ndarray) -> np.ndarray:
        """The gate's score of StageStats' output (N x D): the stages' normalised distances, added."""
        return np.sum([s.score(feats) for s in self.stages], axis=0)

    def accepts(self, feats: np.ndarray) -> np.ndarray:
        return self.score(feats) <= self.threshold

    def arrays(self) -> dict[str, np.ndarray]:
        """trust.safetensors' tensors (numpy-readable; names are in metadata.json)."""
        out = {"threshold": np.array([self.threshold], np.float64), "indices": np.array(self.indices, np.int64)}
        for k, s in enumerate(self.stages):
            out.update({f"stage{k}.means": s.means.astype(np.float64), f"stage{k}.chol": s.chol.astype(np.float64),
                        f"stage{k}.bounds": np.array([s.start, s.stop], np.int64),
                        f"stage{k}.scale": np.array([s.scale], np.float64)})
        return out

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray]) -> OODStats:
        """From trust.safetensors; a bundle of the first gate (means, chol: pooled features) as one stage."""
        threshold = float(arrays["threshold"][0])
        if "means" in arrays:
            return cls([StageGaussians("pooled", 0, arrays["means"].shape[1], arrays["means"], arrays["chol"])],
                       threshold)
        n = sum(1 for k in arrays if k.endswith(".bounds"))
        stages = [StageGaussians(f"stage{k}", *map(int, arrays[f"stage{k}.bounds"]), arrays[f"stage{k}.means"],
                                 arrays[f"stage{k}.chol"], float(arrays[f"stage{k}.scale"][0])) for k in range(n)]
        return cls(stages, threshold, tuple(int(i) for i in arrays["indices"]))


@dataclass
class EnsembleOOD:
    """An ensemble's gate: each member's own gate on its own backbone, their scores put on one scale
    (each divided by its member's threshold, so 1 means "at that member's threshold") and averaged;
    one threshold refitted on the validation split accepts `ACCEPT` of it, like a single model's.
    Why not "reject if any member rejects": its acceptance is set by how the members' rejections
    overlap (93.7 % of validation for the recipe's three members), not by a threshold one can fit."""

    members: list[OODStats]
    threshold: float

    def combine(self, member_scores) -> np.ndarray:
        """Members' ood_score (one array each, as their gates answer) -> the ensemble's."""
        return np.mean([np.asarray(s, np.float64) / m.threshold for s, m in zip(member_scores, self.members)], axis=0)

    def score(self, member_feats) -> np.ndarray:
        """From each member's StageStats output (numpy; the check on the exported graph)."""
        return self.combine([m.score(f) for m, f in zip(self.members, member_feats)])

    def accepts(self, member_feats) -> np.ndarray:
        return self.score(member_feats) <= self.threshold

    def arrays(self) -> dict[str, np.ndarray]:
        out = {"threshold": np.array([self.threshold], np.float64)}
        for i, m in enumerate(self.members):
            out.update({f"members.{i}.{k}": v for k, v in m.arrays().items()})
        return out

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray]) -> EnsembleOOD:
        n = 1 + max(int(k.split(".")[1]) for k in arrays if k.startswith("members."))
        members = [OODStats.from_arrays({k[len(f"members.{i}."):]: v for k, v in arrays.items()
                                         if k.startswith(f"members.{i}.")}) for i in range(n)]
        return cls(members, float(arrays["threshold"][0]))


def gate_from_arrays(arrays: dict[str, np.ndarray]) -> OODStats | EnsembleOOD:
    """trust.safetensors' gate: a single model's or an ensemble's (its members' under `members.<i>.`)."""
    if any(k.startswith("members.") for k in arrays):
        return EnsembleOOD.from_arrays(arrays)
    return OODStats.from_arrays(arrays)


def fit_ensemble_gate(members: list[OODStats], val_scores, test_scores=None, accept: float = ACCEPT) -> tuple[EnsembleOOD, dict]:
    """The ensemble's gate from its members' gates and their ood_score on the validation split
    (one array per member); returns it and what metadata.json records."""
    gate = EnsembleOOD(members, float("inf"))
    val = gate.combine(val_scores)
    gate.threshold = float(np.quantile(val, accept))
    info = {"method": ENSEMBLE_METHOD, "score": ENSEMBLE_COMBINE + "; larger = less like the training images",
            "combine": ENSEMBLE_COMBINE, "threshold": gate.threshold, "accept_target": accept,
            "threshold_on": "val split", "member_thresholds": [m.threshold for m in members],
            "val_accept_rate": float((val <= gate.threshold).mean())}
    if test_scores is not None:
        info["test_accept_rate"] = float((gate.combine(test_scores) <= gate.threshold).mean())
    return gate, info


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


def fit_ood(train: tuple[np.ndarray, np.ndarray], val_feats: np.ndarray, layout: list[tuple[str, int, int]],
            indices: tuple[int, ...] = (), accept: float = ACCEPT) -> OODStats:
    """Gaussians per block from the training split; each block's scale and then the threshold at the
    `accept` quantile of the validation split's scores."""
    stages = []
    for name, start, stop in layout:
        means, chol, shrink = fit_gaussians(train[0][:, start:stop], train[1])
        stage = StageGaussians(name, start, stop, means, chol, 1.0, shrink)
        if len(val_feats):
            stage.scale = max(float(np.quantile(stage.score(val_feats), accept)), 1e-12)
        stages.append(stage)
    stats = OODStats(stages, float("inf"), tuple(indices))
    stats.threshold = float(np.quantile(stats.score(val_feats), accept)) if len(val_feats) else float("inf")
    return stats


def energy(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """The energy score -T logsumexp(logits / T): the alternative measured in benchmarks/bench_ood.py."""
    z = np.asarray(logits, np.float64) / temperature
    m = z.max(axis=1)
    return -temperature * (m + np.log(np.exp(z - m[:, None]).sum(axis=1)))


def trusted_module(classifier, temperature: float, stats: OODStats | EnsembleOOD | None):
    """The exported model: NHWC images -> probabilities (temperature-scaled)[, ood_score, in_distribution]."""
    import torch
    from torch import nn

    if isinstance(stats, EnsembleOOD):
        return ensemble_trusted_module(classifier, stats)

    from covid_cxr.trust.stages import StageStats

    class TrustedModel(nn.Module):
        def __init__(self):
            super().__init__()
            self.classifier = classifier
            self.register_buffer("temperature", torch.tensor(float(temperature)))
            if stats is not None:
                self.stats = StageStats(classifier, stats.indices)
                self.bounds = [(s.start, s.stop, float(s.scale)) for s in stats.stages]
                for k, s in enumerate(stats.stages):
                    self.register_buffer(f"means{k}", torch.from_numpy(s.means.astype(np.float32)))
                    self.register_buffer(f"chol{k}", torch.from_numpy(s.chol.astype(np.float32)))
                self.register_buffer("threshold", torch.tensor(float(stats.threshold)))

        def forward(self, images_nhwc: torch.Tensor):
            x = images_nhwc.permute(0, 3, 1, 2)
            if stats is None:
                return torch.softmax(self.classifier(x) / self.temperature, dim=1)
            feats = self.stats(x)
            probs = torch.softmax(self.classifier.head(feats[:, :self.classifier.num_features]) / self.temperature, dim=1)
            score = sum(self._stage(feats, k) for k in range(len(self.bounds)))
            return probs, score, (score <= self.threshold).to(probs.dtype)

        def _stage(self, feats: torch.Tensor, k: int) -> torch.Tensor:
            start, stop, scale = self.bounds[k]
            z = (feats[:, None, start:stop] - getattr(self, f"means{k}")[None]) @ getattr(self, f"chol{k}")
            return (z * z).sum(dim=2).amin(dim=1) / scale

    return TrustedModel().eval()


def ensemble_trusted_module(ensemble, gate: EnsembleOOD):
    """An ensemble (models.classifier.EnsembleClassifier) with its gate: each member as its own
    bundle exports it (temperature, stage statistics, gate; one backbone pass each), probabilities
    averaged, scores combined as `EnsembleOOD.combine`."""
    import torch
    from torch import nn

    class TrustedEnsemble(nn.Module):
        def __init__(self):
            super().__init__()
            self.members = nn.ModuleList(trusted_module(m, t, g) for m, t, g in
                                         zip(ensemble.members, ensemble.temperatures, gate.members))
            self.register_buffer("member_thresholds", torch.tensor([m.threshold for m in gate.members]))
            self.register_buffer("threshold", torch.tensor(float(gate.threshold)))

        def forward(self, images_nhwc: torch.Tensor):
            outs = [m(images_nhwc) for m in self.members]
            probs = torch.stack([o[0] for o in outs]).mean(0)
            score = (torch.stack([o[1] for o in outs], dim=1) / self.member_thresholds).mean(dim=1)
            return probs, score, (score <= self.threshold).to(probs.dtype)

    return TrustedEnsemble().eval()


def ood_summary(stats: OODStats, val_feats: np.ndarray, test_feats: np.ndarray | None, n_train: int) -> dict:
    """What the bundle's metadata records about the gate."""
    stages = [{"name": s.name, "statistics": "pooled features (the head's input)" if s.name == "pooled"
               else "channel means and standard deviations", "dim": s.stop - s.start, "scale": s.scale,
               "shrinkage": s.shrinkage} for s in stats.stages]
    out = {"method": METHOD, "score": "Mahalanobis feature ensemble (Lee et al. 2018): per stage, the squared "
           "distance to the nearest training-class mean (shared Ledoit-Wolf covariance); " + COMBINE +
           "; larger = less like the training images", "threshold": stats.threshold, "accept_target": ACCEPT,
           "fitted_on": "train split", "threshold_on": "val split", "n_train": int(n_train),
           "feature_dim": int(stats.stages[-1].stop), "combine": COMBINE, "stages": stages,
           "val_accept_rate": float(stats.accepts(val_feats).mean())}
    if test_feats is not None and len(test_feats):
        out["test_accept_rate"] = float(stats.accepts(test_feats).mean())
    return out

"""Torch datasets and Lightning DataModules: images (for feature extraction and fine-tuning) and
cached feature vectors (for training the head of a frozen backbone)."""

from __future__ import annotations

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, TensorDataset

from covid_cxr.data.decode import load_for_model
from covid_cxr.data.prepare import PreparedData


class ImageDataset(Dataset):
    """Records -> (1 x H x W float tensor in [0, 1], class index). Augmentation only when asked."""

    def __init__(self, prepared: PreparedData, split: str, size: int, augment: bool = False):
        self.root = prepared.manifest.root
        self.records = prepared.splits[split]
        self.labels = [prepared.label_index(r) for r in self.records]
        self.size = size
        self.augment = _augmentation() if augment else None

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int):
        x = torch.from_numpy(load_for_model(self.root / self.records[i].path, self.size, self.size))[None]
        if self.augment is not None:
            x = self.augment(x).clamp_(0, 1)
        return x, self.labels[i]


def _augmentation():
    """Mild, anatomy-preserving: small rotation/shift/zoom and brightness/contrast (no flips:
    the heart is on the left)."""
    from torchvision.transforms import v2

    return v2.Compose([
        v2.RandomAffine(degrees=7, translate=(0.05, 0.05), scale=(0.95, 1.05)),
        v2.ColorJitter(brightness=0.15, contrast=0.15),
    ])


def _loader(ds: Dataset, batch_size: int, shuffle: bool, seed: int, num_workers: int = 0) -> DataLoader:
    g = torch.Generator().manual_seed(seed)
    return DataLoader(ds, batch_size=batch_size, shuffle=shuffle, generator=g, num_workers=num_workers,
                      persistent_workers=num_workers > 0)


class ImageDataModule(L.LightningDataModule):
    def __init__(self, prepared: PreparedData, size: int, batch_size: int = 32, augment: bool = False,
                 num_workers: int = 0):
        super().__init__()
        self.prepared, self.size, self.batch_size = prepared, size, batch_size
        self.augment, self.num_workers = augment, num_workers

    def _ds(self, split: str, augment: bool = False) -> ImageDataset:
        return ImageDataset(self.prepared, split, self.size, augment)

    def train_dataloader(self):
        return _loader(self._ds("train", self.augment), self.batch_size, True, self.prepared.seed, self.num_workers)

    def val_dataloader(self):
        return _loader(self._ds("val"), self.batch_size, False, 0, self.num_workers)

    def test_dataloader(self):
        return _loader(self._ds("test"), self.batch_size, False, 0, self.num_workers)


class FeatureDataModule(L.LightningDataModule):
    """Pre-computed backbone features per split: {split: (N x F float tensor, N long tensor)}."""

    def __init__(self, features: dict[str, tuple[torch.Tensor, torch.Tensor]], batch_size: int = 32, seed: int = 0):
        super().__init__()
        self.features, self.batch_size, self.seed = features, batch_size, seed

    def _dl(self, split: str, shuffle: bool) -> DataLoader:
        return _loader(TensorDataset(*self.features[split]), self.batch_size, shuffle, self.seed)

    def train_dataloader(self):
        return self._dl("train", True)

    def val_dataloader(self):
        return self._dl("val", False)

    def test_dataloader(self):
        return self._dl("test", False)


def labels_of(prepared: PreparedData, split: str) -> np.ndarray:
    return np.array([prepared.label_index(r) for r in prepared.splits[split]], dtype=np.int64)

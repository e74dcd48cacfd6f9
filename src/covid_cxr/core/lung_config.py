"""Lung-segmentation training defaults, in one place (the `covid-cxr lungs train` options are built
from these fields; a segmentation bundle records them). Torch-free: the bundle schema imports it."""

from __future__ import annotations

import hashlib
import json

from pydantic import BaseModel, ConfigDict, Field, PositiveInt

# What a plausible pair of lungs looks like in a mask (fraction of the image; two blobs). The
# dataset's own check used 3-70 %; infants on whole-body films and tight crops sit near the ends.
MIN_AREA, MAX_AREA = 0.03, 0.70
MIN_BLOB_SHARE = 0.10  # the smaller of the two largest blobs holds at least this share of the lung area
# Lung-only classifier input (`train --lung-crop`); a classifier bundle records the values it was trained with.
CROP_MARGIN = 0.08  # box: of the lungs' box side, added on every side
CROP_DILATE = 0.02  # mask: of the image side, the mask's edge widened so the pleura stays in


class LungConfig(BaseModel):
    """Every lung-training setting with its default. Why these: the machine is 2 shared CPU cores,
    so the model trains at 128 px (masks are smooth blobs; probabilities are upsampled bilinearly
    to the image's size before thresholding) with the encoder's high-resolution stem and first
    three stages frozen (backward through depthwise convolutions at high resolution is most of the
    CPU cost; those layers are generic edge filters anyway), in channels-last layout (the same
    numbers, 33 instead of 45 CPU-ms per image and step here; freezing a fourth stage or halving
    the decoder saves only 3-12 % more and costs capacity: benchmarks/bench_lung_train.py).
    `source_balance` 0.5: v7's outlines (the lung behind the heart and below the dome) are where
    Dice falls short, and v7 is 9 % of the pairs; drawing by (pairs of the source)^-0.5 gives it
    18 % of an epoch's draws (each v7 pair about twice an epoch) while quex keeps half of them.
    Full balance (1.0) would show each v7 pair ~4 times an epoch (over-fitting 175 pairs) and halve
    quex's exposure, whose Dice target has the least headroom.
    `epochs` 12 with `max_minutes` 18: the measured 20-minute run (docs/results/lungs.md: 6
    epochs fitted in 18 minutes on a busy machine, held-out Dice 0.958 / 0.960 / 0.930 for quex /
    crdvp / v7); a quieter machine gets further through the schedule in the same time."""

    model_config = ConfigDict(extra="ignore", validate_assignment=True)

    encoder: str = Field("efficientnet_lite0", description="covid-cxr architecture used as the U-Net encoder")
    weights: str = Field("imagenet", description="encoder weights: imagenet | none | PATH")
    image_size: int = Field(128, ge=32, description="square side the network sees")
    decoder_channels: list[PositiveInt] = Field([64, 48, 32, 16, 8], min_length=5, max_length=5,
                                                description="U-Net decoder widths (5 stages, comma-separated)")
    frozen_stages: int = Field(3, ge=0, le=7, description="encoder stages kept frozen (stem + blocks 0..N-1)")
    channels_last: bool = Field(True, description="train in channels-last memory layout (same model, "
                                "~1.4x faster on CPU)")
    source_balance: float = Field(0.5, ge=0, le=1, description="draw each training pair with weight "
                                  "(pairs of its manifest source)^-x: 0 as the data come, 1 every source "
                                  "equally often (v7's few pairs as often as quex's many)")
    epochs: int = Field(12, ge=1, description="most epochs (early stopping may end sooner)")
    batch_size: int = Field(16, ge=1, description="image/mask pairs per training step")
    lr: float = Field(2e-3, gt=0, description="Adam learning rate")
    patience: int = Field(3, ge=1, description="early stopping patience on validation Dice")
    max_minutes: float | None = Field(18.0, gt=0, description="stop training after this many minutes "
                                      "(the best epoch so far is kept; data, test and bundle come on top)")
    seed: int = Field(0, description="seed of the split and the sampling")
    split_fractions: list[float] = Field([0.7, 0.1, 0.2], description="train / val / test (by duplicate group)")
    max_images: int | None = Field(None, ge=3, description="use at most this many pairs (tests, quick runs)")
    name: str = Field("lungs", description="bundle name")
    progress: bool = Field(True, exclude=True, description="progress bars (not recorded)")

    def run_id(self) -> str:
        """Stable id of what is trained (for --resume); the stopping rule may change between tries."""
        d = self.model_dump(exclude={"name", "epochs", "patience", "max_minutes"})
        return f"lungs-{hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:10]}"

    @property
    def size(self) -> int:  # the name fit.start_run and friends use
        return self.image_size


DEFAULTS = LungConfig()

"""Lung-segmentation training defaults, in one place (the `covid-cxr lungs train` options are built
from these fields; a segmentation bundle records them). Torch-free: the bundle schema imports it."""

from __future__ import annotations

import hashlib
import json

from pydantic import BaseModel, ConfigDict, Field

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
    CPU cost; those layers are generic edge filters anyway)."""

    model_config = ConfigDict(extra="ignore", validate_assignment=True)

    encoder: str = Field("efficientnet_lite0", description="covid-cxr architecture used as the U-Net encoder")
    weights: str = Field("imagenet", description="encoder weights: imagenet | none | PATH")
    image_size: int = Field(128, ge=32, description="square side the network sees")
    decoder_channels: list[int] = Field([64, 48, 32, 16, 8], description="U-Net decoder widths (5 stages)")
    frozen_stages: int = Field(3, ge=0, le=7, description="encoder stages kept frozen (stem + blocks 0..N-1)")
    epochs: int = Field(4, ge=1, description="most epochs (early stopping may end sooner)")
    batch_size: int = Field(16, ge=1)
    lr: float = Field(2e-3, gt=0, description="Adam learning rate")
    patience: int = Field(3, ge=1, description="early stopping patience on validation Dice")
    seed: int = 0
    split_fractions: list[float] = Field([0.7, 0.1, 0.2], description="train / val / test (by duplicate group)")
    max_images: int | None = Field(None, ge=3, description="use at most this many pairs (tests, quick runs)")
    name: str = Field("lungs", description="bundle name")
    progress: bool = Field(True, exclude=True, description="progress bars (not recorded)")

    def run_id(self) -> str:
        """Stable id of what is trained (for --resume); the stopping rule may change between tries."""
        d = self.model_dump(exclude={"name", "epochs", "patience"})
        return f"lungs-{hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:10]}"

    @property
    def size(self) -> int:  # the name fit.start_run and friends use
        return self.image_size


DEFAULTS = LungConfig()

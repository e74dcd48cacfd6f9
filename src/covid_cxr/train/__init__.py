"""Training: LightningModule, frozen-feature cache, LR range test, fit orchestration."""

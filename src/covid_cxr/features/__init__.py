"""Frozen-backbone features: the trunk exported once to ONNX (per architecture, size and weights)
and run by ONNX Runtime, and the on-disk feature cache that training, the OOD gate's statistics and
fine-tuning's cached trunk activations all read. Below trust and train: both use it."""

"""A bundle's classifier back in PyTorch (Grad-CAM, fine-tuning from a bundle, parity checks),
built from its metadata (not the live registry) and its safetensors weights."""

from __future__ import annotations

from covid_cxr.bundle.reader import Bundle, BundleError


def load_torch(bundle: Bundle):
    """The bundle's classifier in PyTorch, built from its metadata (not the live registry)."""
    from safetensors.torch import load_file

    from covid_cxr.models.classifier import classifier_from_metadata

    model = classifier_from_metadata(bundle.metadata)
    try:
        state = load_file(str(bundle.path / "model.safetensors"))
    except Exception as exc:  # safetensors raises its own types for damaged files
        raise BundleError(f"{bundle.path / 'model.safetensors'}: unreadable: {exc}") from None
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        raise BundleError(f"{bundle.path / 'model.safetensors'}: does not fit metadata.json's "
                          f"architecture: {str(exc).splitlines()[0]}") from None
    return model.eval()

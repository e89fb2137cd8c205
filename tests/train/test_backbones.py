"""Backbones by name: the c4/c5/head contract, weight semantics, and proof that the
EfficientNet-Lite0 weights load into a correct architecture (it classifies real photos)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from skimage import data
from torchvision.models import EfficientNet_B0_Weights

from dsah_rt.errors import UserError
from dsah_rt.train.backbones import BACKBONES, IMAGENET_MEAN, Backbone, WeightsError, build_backbone, register_backbone
from dsah_rt.train.backbones.efficientnet_lite0 import (
    EFFICIENTNET_LITE_MEAN, EFFICIENTNET_LITE_STD, EfficientNetLite0, SamePadConv2d, efficientnet_lite0_weights_path,
    load_efficientnet_lite0,
)
from dsah_rt.train.backbones.small import SmallBackbone
from dsah_rt.train.backbones.vgg import VGG16_HUB_FILE, vgg16_hub_path

pytestmark = pytest.mark.usefixtures("single_thread")

IMAGENET_CATEGORIES = EfficientNet_B0_Weights.IMAGENET1K_V1.meta["categories"]  # in code, no download
CAT_CLASSES = {"tabby", "tiger cat", "Persian cat", "Siamese cat", "Egyptian cat"}
COFFEE_CLASSES = {"espresso", "cup", "coffee mug"}


def test_registry() -> None:
    assert {"vgg16", "efficientnet_lite0", "small"} <= set(BACKBONES)
    with pytest.raises(UserError, match="unknown backbone"):
        build_backbone("resnet50", weights=None)
    with pytest.raises(ValueError, match="already registered"):
        register_backbone("small")(lambda weights: SmallBackbone())


def _check_contract(backbone: Backbone, size: int) -> None:
    x = torch.rand(2, 3, size, size)
    with torch.no_grad():
        c4, c5 = backbone.forward_features(x)
        assert c4.shape == (2, backbone.c4_channels, math.ceil(size / 16), math.ceil(size / 16))
        assert c5.shape == (2, backbone.c5_channels, math.ceil(size / 32), math.ceil(size / 32))
        assert backbone(x).shape == (2, backbone.head_features)


def test_small_contract_and_weights(tmp_path) -> None:
    torch.manual_seed(0)
    small = build_backbone("small", weights="none").eval()
    assert small.weights_source == "none (random init)" and small.input_size == 64
    _check_contract(small, 64)
    with pytest.raises(WeightsError, match="no pretrained weights"):
        build_backbone("small", weights="imagenet")

    path = tmp_path / "small.pt"
    torch.save(small.state_dict(), path)
    loaded = build_backbone("small", weights=path).eval()
    assert loaded.weights_source == str(path)
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), small(x))


def test_drop_head() -> None:
    small = build_backbone("small", weights=None)
    head = small.drop_head()
    assert isinstance(head, torch.nn.Module) and small.head is None and small.head_features == 0
    assert not any(name.startswith("head.") for name, _ in small.named_parameters())
    with pytest.raises(RuntimeError):
        small(torch.rand(1, 3, 64, 64))


def test_same_padding_matches_tensorflow() -> None:
    torch.manual_seed(0)
    conv = SamePadConv2d(2, 3, 3, stride=2)
    for size in (7, 8, 224, 225):
        assert conv(torch.rand(1, 2, size, size)).shape[-1] == math.ceil(size / 2)
    x = torch.rand(1, 2, 8, 8)
    # TF "SAME" on an even input with stride 2: the one extra pixel goes bottom/right only
    torch.testing.assert_close(conv(x), F.conv2d(F.pad(x, (0, 1, 0, 1)), conv.weight, stride=2))
    five = SamePadConv2d(2, 3, 5, stride=1)
    torch.testing.assert_close(five(x), F.conv2d(x, five.weight, padding=2))  # stride 1: symmetric


# ------------------------------------------------------------------------------ VGG-16


def test_vgg16_imagenet_without_cached_file_is_an_error(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    expected = tmp_path / "hub" / "checkpoints" / VGG16_HUB_FILE
    assert vgg16_hub_path() == expected
    with pytest.raises(WeightsError, match=VGG16_HUB_FILE) as err:
        build_backbone("vgg16", weights="imagenet")
    assert str(expected) in str(err.value)
    with pytest.raises(WeightsError, match="not found"):
        build_backbone("vgg16", weights=tmp_path / "missing.pth")


def test_vgg16_structure() -> None:
    vgg = build_backbone("vgg16", weights=None).eval()
    assert (vgg.c4_channels, vgg.c5_channels, vgg.head_features, vgg.input_size) == (512, 512, 4096, 224)
    assert vgg.mean == IMAGENET_MEAN and vgg.weights_source == "none (random init)"
    _check_contract(vgg, 64)
    # c4 is pool4's output and c5 pool5's
    assert isinstance(vgg.to_c4[-1], torch.nn.MaxPool2d) and isinstance(vgg.to_c5[-1], torch.nn.MaxPool2d)


# ------------------------------------------------------------------------ EfficientNet-Lite0


@pytest.fixture(scope="module")
def lite0() -> EfficientNetLite0:
    return load_efficientnet_lite0("imagenet")[0].eval()


def test_efficientnet_lite0_state_dict_loads_strictly() -> None:
    state = torch.load(efficientnet_lite0_weights_path(), map_location="cpu", weights_only=True)
    result = EfficientNetLite0().load_state_dict(state, strict=True)
    assert result.missing_keys == [] and result.unexpected_keys == []


def _preprocess(image) -> torch.Tensor:
    """Resize to 224x224 and normalise as the TF-ported checkpoint expects: (pixel - 127) / 128."""
    x = torch.from_numpy(image).permute(2, 0, 1).float()[None] / 255
    x = F.interpolate(x, size=(224, 224), mode="bilinear", antialias=True, align_corners=False)
    mean = torch.tensor(EFFICIENTNET_LITE_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(EFFICIENTNET_LITE_STD).view(1, 3, 1, 1)
    return (x - mean) / std


@pytest.mark.parametrize(
    "image, classes", [(data.chelsea(), CAT_CLASSES), (data.coffee(), COFFEE_CLASSES)], ids=["chelsea", "coffee"]
)
def test_efficientnet_lite0_classifies_photos(lite0: EfficientNetLite0, image, classes: set[str]) -> None:
    with torch.no_grad():
        probs = lite0(_preprocess(image)).softmax(dim=1)[0]
    top = probs.topk(5)
    names = [IMAGENET_CATEGORIES[i] for i in top.indices.tolist()]
    assert names[0] in classes, f"top-5: {list(zip(names, top.values.tolist()))}"
    assert top.values[0] > 0.5


def test_efficientnet_lite0_backbone_is_the_classifier_cut(lite0: EfficientNetLite0) -> None:
    backbone = build_backbone("efficientnet_lite0", weights="imagenet").eval()
    assert backbone.weights_source == f"imagenet ({efficientnet_lite0_weights_path()})"
    assert backbone.mean == EFFICIENTNET_LITE_MEAN and backbone.input_size == 224
    x = _preprocess(data.chelsea())
    with torch.no_grad():
        c4, c5 = backbone.forward_features(x)
        assert c4.shape == (1, 112, 14, 14) and c5.shape == (1, 1280, 7, 7)
        # the pooled head under the checkpoint's own classifier gives the validated logits back
        torch.testing.assert_close(lite0._fc(backbone(x)), lite0(x), rtol=1e-4, atol=1e-4)
    _check_contract(backbone, 96)


def test_efficientnet_lite0_weights_from_path(tmp_path) -> None:
    path = efficientnet_lite0_weights_path()
    assert build_backbone("efficientnet_lite0", weights=str(path)).weights_source == str(path)
    assert build_backbone("efficientnet_lite0", weights=None).weights_source == "none (random init)"
    wrong = tmp_path / "small.pt"
    torch.save(SmallBackbone().state_dict(), wrong)
    with pytest.raises(WeightsError, match="do not fit"):
        build_backbone("efficientnet_lite0", weights=wrong)
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(WeightsError, match="cannot read"):
        build_backbone("efficientnet_lite0", weights=garbage)

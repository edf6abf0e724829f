"""Zero-configuration sweep: ``layer=None``, default options, on 40+ torchvision and timm architectures.

    python -m benchmarks.sweep [--smoke] [--only SUBSTRING] [--out DIR] [--threads N]

For every architecture (random weights, seed 0 — no weights are downloaded; weights the library
initialises to exactly zero are re-drawn, see :func:`_redraw_zero_heads`, else some maps are blank
whatever the method):

1. ``camlens.explain(model, x)`` with nothing but the model and a 224x224 input (``--smoke``: a few
   small models at 64x64): the top class, Grad-CAM, ``layer=None``;
2. the layer camlens picked and how it read it (``nchw``, ``nhwc``, ``tokens`` with the prefix count
   and patch grid);
3. agreement: the maximum absolute difference of the final maps in [0, 1] from Grad-CAM written
   in plain torch here (:func:`_by_hand`) and from pytorch-grad-cam's ``GradCAM``, both on the same
   layer and class with a reshape. For ViT, DeiT, Swin (and the other families marked *hand*) the
   reshape is written here by hand, the way the peer's docs write it — an independent check of
   camlens' layout reading; elsewhere it is built from the layout camlens found (a check of the
   engine, not of the reading);
4. "ok": finite, non-degenerate (pixel std > 0.05 and at least 5 % of pixels > 0.1), the recommended
   layer where one is documented, within 1e-4 of the plain-torch Grad-CAM, and (*hand* rows) of
   pytorch-grad-cam. Where pytorch-grad-cam differs elsewhere the table says why (DenseNet: the model's in-place ReLU
   after ``features`` changes the activations pytorch-grad-cam stored, so it explains the ReLU's
   output with that output's gradients, not the layer's);
5. the time of one camlens call (after the checks, so warm).

Writes ``<out>/sweep-<device>.md`` (the table, also copied into docs/sweep.md by a full run) and
``.json``. Exit status 1 when fewer than 95 % of the architectures are ok (``--smoke``: any fails).
"""

from __future__ import annotations

import os

os.environ.setdefault("TQDM_DISABLE", "1")

import argparse
import json
import math
import platform
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import torch
from torch import Tensor, nn

import camlens
from camlens.backends.torch.probing import map_layout, token_prefix

TOL = 1e-4
ROOT = Path(__file__).resolve().parent.parent

Reshape = Optional[Callable[[Tensor], Tensor]]


def _tokens(prefix: int, grid: tuple[int, int]) -> Callable[[Tensor], Tensor]:
    """pytorch-grad-cam's documented ViT ``reshape_transform``: drop the prefix tokens, grid, channels first."""
    def rt(t: Tensor) -> Tensor:
        return t[:, prefix:, :].reshape(t.size(0), grid[0], grid[1], t.size(2)).permute(0, 3, 1, 2)
    return rt


def _nhwc(t: Tensor) -> Tensor:
    """pytorch-grad-cam's Swin ``reshape_transform`` for (B, h, w, C) stages."""
    return t.permute(0, 3, 1, 2)


@dataclass
class Arch:
    """One architecture: how to build it, its family, input size and (for *hand* checks) the peer's own
    reshape_transform for the layer camlens should pick."""

    name: str
    family: str
    build: Callable[[], nn.Module]
    size: int = 224
    hand: Reshape = None  # the reshape written by hand, the peer's way (None: from camlens' layout)
    want: Optional[str] = None  # the layer the literature recommends, where one is documented
    note: str = ""  # what the table should say about this row
    clip: Optional[tuple[int, int, int]] = None  # a video / volume model: the input's (D, H, W); size unused


def _tv(name: str, **kw: Any) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        import torchvision
        return getattr(torchvision.models, name)(weights=None, **kw)
    return build


def _video(name: str, **kw: Any) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        import torchvision.models.video as tvv
        return getattr(tvv, name)(weights=None, **kw)
    return build


def _ncdhw_last(t: Tensor) -> Tensor:
    """Swin3D's channels-last stages (B, d, h, w, C) -> (B, C, d, h, w), by hand."""
    return t.permute(0, 4, 1, 2, 3)


def _clip_tokens(prefix: int, grid: tuple[int, int, int]) -> Callable[[Tensor], Tensor]:
    """Clip tokens (B, P + t*h*w, C) -> (B, C, t, h, w), by hand."""
    def rt(t: Tensor) -> Tensor:
        return t[:, prefix:, :].reshape(t.size(0), *grid, t.size(2)).permute(0, 4, 1, 2, 3)
    return rt


def _timm(name: str, **kw: Any) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        import timm
        return timm.create_model(name, pretrained=False, **kw)
    return build


def architectures(smoke: bool) -> list[Arch]:
    """The sweep's list: CNNs and every transformer family the issue names."""
    if smoke:
        return [Arch("resnet18 (tv)", "CNN", _tv("resnet18"), 64, want="layer4"),
                Arch("vit_tiny_patch16 (timm, 64²)", "ViT", _timm("vit_tiny_patch16_224", img_size=64), 64,
                     hand=_tokens(1, (4, 4)), want="blocks.11.norm1"),
                Arch("swin_t (tv)", "Swin", _tv("swin_t"), 64, hand=_nhwc, want="features.7")]
    t14 = _tokens(1, (14, 14))
    return [
        # CNNs
        Arch("resnet18", "CNN", _tv("resnet18"), want="layer4"),
        Arch("resnet50", "CNN", _tv("resnet50"), want="layer4"),
        Arch("resnext50_32x4d", "CNN", _tv("resnext50_32x4d"), want="layer4"),
        Arch("vgg11_bn", "CNN", _tv("vgg11_bn"), want="features"),
        Arch("densenet121", "CNN", _tv("densenet121")),
        Arch("mobilenet_v2", "CNN", _tv("mobilenet_v2"), want="features"),
        Arch("mobilenet_v3_small", "CNN", _tv("mobilenet_v3_small"), want="features"),
        Arch("efficientnet_b0", "CNN", _tv("efficientnet_b0"), want="features"),
        Arch("regnet_y_400mf", "CNN", _tv("regnet_y_400mf")),
        Arch("shufflenet_v2_x1_0", "CNN", _tv("shufflenet_v2_x1_0")),
        Arch("squeezenet1_1", "CNN", _tv("squeezenet1_1")),
        Arch("mnasnet0_5", "CNN", _tv("mnasnet0_5")),
        Arch("timm efficientnet_b0", "CNN", _timm("efficientnet_b0"), want="bn2"),
        Arch("timm tf_efficientnet_lite0", "CNN", _timm("tf_efficientnet_lite0"), want="bn2"),
        # ConvNeXt and friends (NCHW stages, channels-last inside blocks)
        Arch("convnext_tiny", "ConvNeXt", _tv("convnext_tiny")),
        Arch("timm convnext_atto", "ConvNeXt", _timm("convnext_atto")),
        Arch("timm convnextv2_atto", "ConvNeXt", _timm("convnextv2_atto")),
        Arch("timm edgenext_xx_small", "ConvNeXt", _timm("edgenext_xx_small")),
        # ViT / DeiT / BEiT-style / EVA-style (tokens with prefix tokens)
        Arch("vit_b_16 (tv)", "ViT", _tv("vit_b_16"), hand=t14, want="encoder.layers.encoder_layer_11.ln_1"),
        Arch("timm vit_tiny_patch16_224", "ViT", _timm("vit_tiny_patch16_224"), hand=t14, want="blocks.11.norm1"),
        Arch("timm vit_small_patch16_224", "ViT", _timm("vit_small_patch16_224"), hand=t14, want="blocks.11.norm1"),
        Arch("timm vit_small_patch14_reg4_dinov2 (224²)", "ViT", _timm("vit_small_patch14_reg4_dinov2", img_size=224),
             hand=_tokens(5, (16, 16)), want="blocks.11.norm1"),
        Arch("timm deit_tiny_patch16_224", "DeiT", _timm("deit_tiny_patch16_224"), hand=t14, want="blocks.11.norm1"),
        Arch("timm deit_tiny_distilled_patch16_224", "DeiT", _timm("deit_tiny_distilled_patch16_224"),
             hand=_tokens(2, (14, 14)), want="blocks.11.norm1"),
        Arch("timm deit3_small_patch16_224", "DeiT", _timm("deit3_small_patch16_224"), hand=t14,
             want="blocks.11.norm1"),
        Arch("timm beit_base_patch16_224", "BEiT", _timm("beit_base_patch16_224"), hand=t14, want="blocks.11.norm1"),
        Arch("timm eva02_tiny_patch14_224", "EVA", _timm("eva02_tiny_patch14_224"), hand=_tokens(1, (16, 16)),
             want="blocks.11.norm1"),
        Arch("timm cait_xxs24_224", "CaiT", _timm("cait_xxs24_224"), hand=t14, want="blocks_token_only.1.norm1"),
        Arch("timm xcit_nano_12_p16_224", "XCiT", _timm("xcit_nano_12_p16_224"), hand=t14,
             want="cls_attn_blocks.1.norm1"),
        # Swin-like (channels-last stages)
        Arch("swin_t (tv)", "Swin", _tv("swin_t"), hand=_nhwc, want="features.7"),
        Arch("swin_v2_t (tv)", "Swin", _tv("swin_v2_t"), hand=_nhwc, want="features.7"),
        Arch("timm swin_tiny_patch4_window7_224", "Swin", _timm("swin_tiny_patch4_window7_224"), hand=_nhwc,
             want="layers.3"),
        Arch("timm swinv2_tiny_window8_256 (256²)", "Swin", _timm("swinv2_tiny_window8_256"), 256, hand=_nhwc,
             want="layers.3"),
        # hybrids and other token layouts
        Arch("maxvit_t (tv)", "MaxViT", _tv("maxvit_t")),
        Arch("timm maxvit_tiny_tf_224", "MaxViT", _timm("maxvit_tiny_tf_224")),
        Arch("timm levit_128s", "LeViT", _timm("levit_128s"),
             note="random weights: after the first attention-downsampling stage every token carries the same "
                  "features (relative spread ~1e-7), so every map of every method is flat; needs trained weights"),
        Arch("timm efficientformer_l1", "EfficientFormer", _timm("efficientformer_l1")),
        Arch("timm efficientformerv2_s0", "EfficientFormer", _timm("efficientformerv2_s0")),
        Arch("timm mixer_s16_224", "Mixer", _timm("mixer_s16_224"), hand=_tokens(0, (14, 14)), want="norm"),
        Arch("timm resmlp_12_224", "Mixer", _timm("resmlp_12_224"), hand=_tokens(0, (14, 14))),
        Arch("timm pvt_v2_b0", "PVT", _timm("pvt_v2_b0")),
        Arch("timm twins_pcpvt_small", "Twins", _timm("twins_pcpvt_small")),
        Arch("timm twins_svt_small", "Twins", _timm("twins_svt_small")),
        Arch("timm coat_lite_tiny", "CoaT", _timm("coat_lite_tiny")),
        Arch("timm poolformer_s12", "MetaFormer", _timm("poolformer_s12")),
        Arch("timm mobilevit_xs (256²)", "MobileViT", _timm("mobilevit_xs"), 256),
        Arch("timm fastvit_t8", "FastViT", _timm("fastvit_t8")),
        Arch("timm efficientvit_b0", "EfficientViT", _timm("efficientvit_b0")),
        # volumes and video clips (B, 3, D, H, W): maps (B, T, D, H, W), trilinear
        Arch("r3d_18 (tv video)", "3-D CNN", _video("r3d_18"), clip=(8, 112, 112), want="layer4"),
        Arch("mc3_18 (tv video)", "3-D CNN", _video("mc3_18"), clip=(8, 112, 112), want="layer4"),
        Arch("r2plus1d_18 (tv video)", "3-D CNN", _video("r2plus1d_18"), clip=(8, 112, 112), want="layer4"),
        Arch("s3d (tv video)", "3-D CNN", _video("s3d"), clip=(16, 224, 224),
             note="random weights: the features reaching the head are ~1e-9 (the signal fades through the random "
                  "inception blocks), so the logits are the head's biases and the top class's Grad-CAM is negative "
                  "everywhere: a flat map, as the plain-torch reference agrees (Eigen-CAM on the same layer: std "
                  "0.34); needs trained weights"),
        Arch("swin3d_t (tv video)", "Swin3D", _video("swin3d_t"), clip=(8, 112, 112), hand=_ncdhw_last,
             want="features.6"),
        Arch("mvit_v2_s (tv video)", "MViT", _video("mvit_v2_s"), clip=(16, 224, 224),
             hand=_clip_tokens(1, (8, 7, 7)), want="blocks.15.norm1"),
    ]


def _redraw_zero_heads(net: nn.Module) -> int:
    """Re-draw weights that are all zero at initialisation: Linear / conv weights (timm and torchvision
    zero-init some heads: no gradient at all) drawn N(0, 0.02^2), norm-layer scales (LeViT zero-inits
    the BatchNorm closing each residual branch: every token then carries the same features, and every
    map of any method is flat) set to 1."""
    n = 0
    g = torch.Generator().manual_seed(1)
    norms = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.LayerNorm, nn.GroupNorm)
    with torch.no_grad():
        for m in net.modules():
            w = getattr(m, "weight", None)
            if not isinstance(w, Tensor) or not w.numel() or w.any():
                continue
            if isinstance(m, (nn.Linear, nn.Conv2d, nn.Conv3d)):
                w.copy_(torch.randn(w.shape, generator=g) * 0.02)
                n += 1
            elif isinstance(m, norms):
                w.fill_(1.0)
                n += 1
    return n


def _layout(net: nn.Module, name: str, x: Tensor) -> tuple[str, Reshape]:
    """How camlens reads ``name``'s output on ``x`` (the same rule as the engine), and that reading as
    a pytorch-grad-cam ``reshape_transform``."""
    if x.ndim == 5:  # volumes / clips: the backend's reading of 3-D maps
        from camlens.backends.torch.volume_probe import volume_layouts

        lay = volume_layouts(net, x, [name])[name]
        grid = "x".join(map(str, lay.grid)) if lay.grid else "?"
        if lay.kind == "volume-last":
            return f"channels-last 3-D (grid {grid})", _ncdhw_last
        if lay.kind == "volume-tokens":
            return f"clip tokens (prefix {lay.prefix}, grid {grid})", _clip_tokens(lay.prefix, lay.grid)
        return "ncdhw", None
    out: dict[str, Any] = {}
    h = net.get_submodule(name).register_forward_hook(lambda m, i, o: out.setdefault("o", o))
    try:
        with torch.no_grad():
            net(x)
    finally:
        h.remove()
    o = out["o"][0] if isinstance(out["o"], (tuple, list)) else out["o"]
    lay = map_layout(tuple(o.shape), x.shape[0], tuple(x.shape[-2:]), token_prefix(net))
    if lay is None:
        return "nchw", None
    if lay.kind == "nhwc":
        return "nhwc", _nhwc
    return f"tokens (prefix {lay.prefix}, grid {lay.grid[0]}x{lay.grid[1]})", _tokens(lay.prefix, lay.grid)


class _Scaled(nn.Module):
    """The model with its outputs times ``k``: the same maps (Grad-CAM is linear in the score, maps are
    min-maxed), raw maps of order 1 — pytorch-grad-cam divides by ``max + 1e-7``, which flattens the
    ~1e-15 maps of some random-weight models (torchvision EfficientNet) and would hide a real comparison."""

    def __init__(self, net: nn.Module, k: float) -> None:
        super().__init__()
        self.net, self.k = net, k

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x) * self.k


def _pgc(net: nn.Module, layer: nn.Module, x: Tensor, cls: int, reshape: Reshape, k: float) -> Tensor:
    from pytorch_grad_cam import GradCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    with GradCAM(model=_Scaled(net, k), target_layers=[layer], reshape_transform=reshape) as cam:
        return torch.from_numpy(cam(input_tensor=x, targets=[ClassifierOutputTarget(cls)]))


def _by_hand(net: nn.Module, layer: nn.Module, x: Tensor, cls: int, reshape: Reshape) -> Tensor:
    """Grad-CAM in plain torch: the layer's output and the gradient of the class logit w.r.t. it
    (the network goes on with a copy, so that a later in-place op, e.g. DenseNet's
    ``relu(inplace=True)``, changes neither), the reshape, ReLU(sum_c mean_hw(g_c) a_c), bilinear
    upsampling (half-pixel), min-max."""
    store: dict[str, Tensor] = {}

    def hook(m: nn.Module, i: Any, o: Any) -> Any:
        t = o[0] if isinstance(o, (tuple, list)) else o
        store["a"], store["v"] = t, t.detach()
        return t.clone() if isinstance(o, Tensor) else None

    h = layer.register_forward_hook(hook)
    try:
        out = net(x)
    finally:
        h.remove()
    g, = torch.autograd.grad(out[0, cls], store["a"])
    a, g = (store["v"], g) if reshape is None else (reshape(store["v"]), reshape(g))
    dims = tuple(range(2, a.ndim))  # (h, w), or (d, h, w) for volumes
    cam = torch.relu((g.double().mean(dims, keepdim=True) * a.double()).sum(1, keepdim=True))
    mode = "trilinear" if a.ndim == 5 else "bilinear"
    cam = torch.nn.functional.interpolate(cam, size=tuple(x.shape[2:]), mode=mode, align_corners=False)[0, 0]
    lo, hi = cam.min(), cam.max()
    return ((cam - lo) / (hi - lo)).float() if hi > lo else torch.zeros_like(cam).float()


def run_one(a: Arch) -> dict[str, Any]:
    size = "x".join(map(str, a.clip)) if a.clip else f"{a.size}²"
    row: dict[str, Any] = {"arch": a.name, "family": a.family, "size": size, "layer": None, "layout": None,
                           "want": a.want, "check": "hand" if a.hand is not None else "layout", "diff": None,
                           "diff_pgc": None, "std": None, "coverage": None, "time_s": None, "ok": False,
                           "error": None, "redrawn": 0, "note": a.note}
    try:
        torch.manual_seed(0)
        net = a.build().eval()
        row["redrawn"] = _redraw_zero_heads(net)
        shape = (1, 3, *a.clip) if a.clip else (1, 3, a.size, a.size)
        x = torch.randn(*shape, generator=torch.Generator().manual_seed(0))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            exp = camlens.explain(net, x)  # nothing but the model and the input
        layer = exp.layers[0]
        row["layer"] = layer
        row["layout"], auto = _layout(net, layer, x)
        maps = exp.maps[0, 0].float()
        row["std"] = float(maps.std())
        row["coverage"] = float((maps > 0.1).float().mean())
        cls = exp.targets[0][0].cls
        reshape = a.hand if a.hand is not None else auto
        mod = net.get_submodule(layer)
        row["diff"] = float((maps - _by_hand(net, mod, x, cls, reshape)).abs().max())
        k = 1.0 / max(float(exp.raw.abs().max()), 1e-30)
        if a.clip is None:  # (pytorch-grad-cam resizes volumes with cubic splines: not comparable at full size)
            row["diff_pgc"] = float((maps - _pgc(net, mod, x, cls, reshape, k)[0].float()).abs().max())
        t = time.perf_counter()
        camlens.explain(net, x)
        row["time_s"] = time.perf_counter() - t
        row["ok"] = (bool(torch.isfinite(exp.maps).all()) and row["std"] > 0.05 and row["coverage"] > 0.05
                     and row["diff"] < TOL and (a.hand is None or a.clip is not None or row["diff_pgc"] < TOL)
                     and (a.want is None or layer == a.want))
    except Exception as err:  # one architecture's failure is a row, not the end of the sweep
        row["error"] = f"{type(err).__name__}: {str(err)[:300]}"
    return row


def _md(rows: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    ok = sum(r["ok"] for r in rows)
    lines = [f"# Zero-configuration sweep ({meta['device']})", "",
             f"`python -m benchmarks.sweep`: `camlens.explain(model, x)` — `layer=None`, Grad-CAM, the top class, "
             f"no option — on {len(rows)} architectures, random weights (no download; weights initialised to exactly "
             "zero — some classifier heads, LeViT's residual-closing BatchNorm scales — re-drawn). **ok**: finite, non-degenerate (pixel std > 0.05, > 5 % of pixels above 0.1), the "
             "recommended layer where one is documented, and the final maps within 1e-4 of Grad-CAM written in "
             "plain torch on the same layer and class (and, *hand* rows, of pytorch-grad-cam's GradCAM) — with a "
             "reshape written by hand the peer's way (check *hand*: ViT, DeiT, Swin, ...) or built from camlens' "
             "reading (*layout*). pytorch-grad-cam is given the model's outputs scaled so its raw maps are of "
             "order 1 (it divides by max + 1e-7); on DenseNet it differs because the model's in-place ReLU "
             "after `features` changes the activations its hook stored (it explains the ReLU's output). Video / "
             "volume rows (input D x H x W): 3-D maps, trilinear upsampling, compared with plain torch only "
             "(pytorch-grad-cam resizes volumes with cubic splines).", "",
             f"**{ok} / {len(rows)} ok ({100 * ok / len(rows):.0f} %).** {meta['machine']}; torch {meta['torch']}, "
             f"timm {meta['timm']}, torchvision {meta['torchvision']}; {meta['date']}.", "",
             "| architecture | family | input | layer picked | layout | check | max diff: plain torch | "
             "pytorch-grad-cam | map std | time (s) | ok |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    notes = [f"* {r['arch']}: {r['note']}" for r in rows if r.get("note")]
    for r in rows:
        if r["error"]:
            lines.append(f"| {r['arch']} | {r['family']} | {r['size']} | {r['layer'] or '—'} | — | — | — | — | — | — "
                         f"| no: {r['error'].replace('|', '/')[:160]} |")
            continue
        want = "" if r["want"] is None or r["want"] == r["layer"] else f" (want {r['want']})"
        pgc = "—" if r["diff_pgc"] is None else f"{r['diff_pgc']:.1e}"
        lines.append(f"| {r['arch']} | {r['family']} | {r['size']} | `{r['layer']}`{want} | {r['layout']} | "
                     f"{r['check']} | {r['diff']:.1e} | {pgc} | {r['std']:.2f} | {r['time_s']:.2f} | "
                     f"{'yes' if r['ok'] else 'no'} |")
    return "\n".join(lines + ([""] + notes if notes else [])) + "\n"


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--smoke", action="store_true", help="3 small models at 64x64 (what make test runs)")
    ap.add_argument("--only", default=None, help="architectures whose name contains this")
    ap.add_argument("--out", type=Path, default=None, help="output folder (default benchmarks/results)")
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    archs = [a for a in architectures(args.smoke) if args.only is None or args.only in a.name]
    out = args.out or ROOT / "benchmarks" / "results"
    out.mkdir(parents=True, exist_ok=True)
    import timm
    import torchvision

    meta = {"device": "cpu", "machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} "
            f"threads", "torch": torch.__version__, "timm": timm.__version__, "torchvision": torchvision.__version__,
            "date": time.strftime("%Y-%m-%d"), "command": " ".join(sys.argv)}
    rows = []
    for a in archs:
        r = run_one(a)
        rows.append(r)
        diff = "—" if r["diff"] is None else f"{r['diff']:.1e}"
        print(f"{a.name:45s} {str(r['layer']):45s} {r['layout'] or '':32s} diff={diff} ok={r['ok']} "
              f"{r['error'] or ''}", flush=True)
    stem = "sweep-cpu" + ("-smoke" if args.smoke else "") + (f"-only-{args.only}" if args.only else "")
    (out / f"{stem}.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    (out / f"{stem}.md").write_text(_md(rows, meta))
    if not args.smoke and args.only is None and args.out is None:
        (ROOT / "docs" / "sweep.md").write_text(_md(rows, meta))
    ok = sum(r["ok"] for r in rows)
    print(f"{ok} / {len(rows)} ok; wrote {out / stem}.md, .json")
    need = len(rows) if args.smoke else math.ceil(0.95 * len(rows))
    return 0 if ok >= need else 1


if __name__ == "__main__":
    sys.exit(main())

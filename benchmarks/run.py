"""Side-by-side benchmark suite: camlens vs pytorch-grad-cam, torchcam and captum.

    python -m benchmarks.run [--device cpu|cuda] [--quick] [--smoke] [--threads 2] [--only CASE_SUBSTRING]
                             [--out DIR]

Principles, for every case:

* everyone gets the SAME model (random weights, fixed seed), input, layer and targets;
* the maps are checked to agree BEFORE anything is timed (max abs difference of the final maps in
  [0, 1]; 1e-4, Score-CAM 1e-3) — a fast wrong map does not count. Where a peer defines a method
  differently, the difference is measured and explained in the note, and a second check shows
  that the peer agrees once that one difference is aligned (otherwise the run fails);
* each peer is called its own best way (pytorch-grad-cam and captum: a batch of copies of the
  image for T targets; torchcam: one forward, one call per class) and includes its own
  post-processing to the same output (maps upsampled to the input size and min-maxed), except
  where the row says feature-size maps;
* timing is interleaved (each repeat runs every function once, in turn) after a warm-up, in one
  process; medians, the interquartile range and the ratio peer / camlens are reported, plus a
  lower bound (e.g. one plain forward + ``autograd.grad`` to the layer) where one is defined.

Writes ``<out>/<device>.md`` (table), ``<out>/<device>.json`` (all raw timings) and
``<out>/<device>.png`` (chart, :mod:`benchmarks.chart`). ``--smoke`` (resnet18 and 64x64 inputs
everywhere, Score-CAM at layer2, a batch of 8; one timed call per function, the check's own; written
to a temporary folder unless ``--out``) proves that every agreement check passes and the files are
written; ``--only`` runs the cases whose name contains the substring and writes
``<device>-only-<substring>.*`` so that a partial run never replaces the full results.
Exit status 1 if any peer's maps disagree (the files are still written; that peer is not timed).

The JSON: ``{"meta": {machine, versions, load, command, cases...}, "rows": [row...]}``; a row has
``case``, ``title``, ``note``, ``camlens`` ``{times_s, median_s, iqr_s}`` (None: option not available),
``peers`` ``{name: {diff, tol, aligned_diff, how, ok, note, times_s, median_s, iqr_s, ratio}}``,
``bound`` ``{name, times_s, median_s, iqr_s, camlens_over_bound}`` or None, ``extra`` (other timed
functions) and case-specific numbers (``camlens_T_over_1``, ``speedup_vs_full``, ``pearson_vs_full``,
``diff_to_default``, ``speedup_vs_default``).
"""

from __future__ import annotations

import os

os.environ.setdefault("TQDM_DISABLE", "1")  # pytorch-grad-cam's Score-CAM progress bars (before tqdm loads)

import argparse
import datetime
import importlib.metadata
import platform
import sys
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import camlens

from .timing import Sizes, plan, run_cases, _stats, _timed, _timeit

GRAD_TOL = 1e-4  # max abs difference of final maps in [0, 1]
SCORE_TOL = 1e-3  # Score-CAM: softmax of scores of masked inputs, more rounding
PGC, TC, CAPTUM = "pytorch-grad-cam", "torchcam", "captum"
TC_LOOP = f"{TC} (per-class loop)"
SHORT = {PGC: "pgc", TC: "tc", CAPTUM: "captum", TC_LOOP: "tc loop"}

Fn = Callable[[], Any]


# ----------------------------------------------------------------------------------------------------------
# shared helpers


@dataclass
class Setup(Sizes):
    """What every case shares: device, sizes, repeat counts and the models (built once, seeded)."""

    device: torch.device = torch.device("cpu")
    models: dict[str, nn.Module] = field(default_factory=dict)

    @property
    def arch(self) -> str:
        """The main model: resnet50, or resnet18 for ``--smoke``."""
        return "resnet18" if self.smoke else "resnet50"

    @property
    def warmup(self) -> int:
        return 0 if self.smoke else 1

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()

    def model(self, name: str) -> nn.Module:
        """``resnet18``, ``resnet50``, ``threeheads-<arch>`` or ``tiny-cnn``; random weights from seed 0, eval mode."""
        if name not in self.models:
            import torchvision

            torch.manual_seed(0)
            arch = name.split("-", 1)[1] if name.startswith("threeheads-") else None
            net = (TinyCNN() if name == "tiny-cnn" else ThreeHeads(arch) if arch
                   else getattr(torchvision.models, name)())
            self.models[name] = net.eval().to(self.device)
        return self.models[name]

    def x(self, batch: int = 1, seed: int = 0, size: Optional[int] = None) -> Tensor:
        s = size or self.size
        return torch.randn(batch, 3, s, s, generator=torch.Generator().manual_seed(seed)).to(self.device)


class ThreeHeads(nn.Module):
    """A torchvision ResNet trunk whose forward returns a dict of 3 Linear heads (10 classes each) on the
    pooled ``layer4`` features, so ``layer4`` is the last spatial layer."""

    def __init__(self, arch: str, classes: int = 10) -> None:
        super().__init__()
        import torchvision

        r = getattr(torchvision.models, arch)()
        self.stem = nn.Sequential(r.conv1, r.bn1, r.relu, r.maxpool)
        self.layer1, self.layer2, self.layer3, self.layer4 = r.layer1, r.layer2, r.layer3, r.layer4
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.heads = nn.ModuleDict({k: nn.Linear(r.fc.in_features, classes) for k in "abc"})

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        f = self.layer4(self.layer3(self.layer2(self.layer1(self.stem(x)))))
        p = self.pool(f).flatten(1)
        return {k: h(p) for k, h in self.heads.items()}


class TinyCNN(nn.Module):
    """Three 3x3 convolutions (16, 32, 64 channels, the last two with stride 2), GAP, Linear(64, 10): a
    model so small that camlens' own per-call work (hooks, checks, target resolution, post-processing)
    shows against the forward + backward."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(),
                                      nn.Conv2d(16, 32, 3, stride=2, padding=1), nn.ReLU(),
                                      nn.Conv2d(32, 64, 3, stride=2, padding=1), nn.ReLU())
        self.fc = nn.Linear(64, 10)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.features(x).mean((2, 3)))


class Concat(nn.Module):
    """For peers that need one output tensor: the dict's heads side by side (head ``h``, class ``c`` is
    column ``10 * index(h) + c``). Same numbers, so the same maps."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: Tensor) -> Tensor:
        return torch.cat(list(self.net(x).values()), dim=1)


def _cpu(t: Any) -> Tensor:
    """Maps as a float CPU tensor (numpy arrays from pytorch-grad-cam too)."""
    if not isinstance(t, Tensor):
        t = torch.from_numpy(t)
    return t.detach().float().cpu()


def _maxdiff(ours: Any, theirs: Any) -> float:
    """Max abs difference of two map stacks holding the same maps in the same order (shapes may differ by
    size-1 dims, e.g. camlens' (B, T, H, W) vs a peer's (B*T, H, W))."""
    a, b = _cpu(ours), _cpu(theirs)
    if a.numel() != b.numel():
        raise ValueError(f"map shapes differ: {tuple(a.shape)} vs {tuple(b.shape)}")
    return (a.reshape(-1) - b.reshape(-1)).abs().max().item()


def _pearson(a: Any, b: Any) -> float:
    a, b = _cpu(a).flatten().double(), _cpu(b).flatten().double()
    a, b = a - a.mean(), b - b.mean()
    return float((a @ b) / (a.norm() * b.norm()))


def _minmax(m: Tensor) -> Tensor:
    """Per-map min-max over the last two dims (a constant map becomes 0), for the peers' maps."""
    flat = m.flatten(-2)
    lo, hi = flat.amin(-1, keepdim=True), flat.amax(-1, keepdim=True)
    return ((flat - lo) / (hi - lo).clamp_min(1e-12)).view_as(m)


def _up(maps: Tensor, size: tuple[int, int]) -> Tensor:
    """Feature-size maps ``(N, h, w)`` -> ``(N, H, W)``: bilinear (align_corners=False) + min-max, as camlens."""
    return _minmax(F.interpolate(maps[:, None].float(), size=size, mode="bilinear", align_corners=False)[:, 0])


def _module(model: nn.Module, name: str) -> nn.Module:
    return dict(model.named_modules())[name]


@dataclass
class Peer:
    """A peer's timed call (its own best way, returning maps comparable with camlens') and how to check it.

    ``aligned``: for a peer whose definition differs from camlens', a function returning two map stacks
    that must agree within ``tol`` once that one difference is aligned; ``how`` says what was aligned.
    """

    fn: Fn
    tol: float = GRAD_TOL
    note: str = ""
    aligned: Optional[Callable[[], tuple[Any, Any]]] = None
    how: str = ""


def _measure(s: Setup, case: str, title: str, ours: Fn, peers: dict[str, Peer], reps: int,
             bound: Optional[tuple[str, Fn]] = None, extra: Optional[dict[str, Fn]] = None,
             note: str = "", warmup: Optional[int] = None, ref: Optional[Tensor] = None,
             inner: int = 1) -> dict[str, Any]:
    """Check every peer's maps against camlens' (``ref``: camlens' maps if already computed), then time
    camlens, the agreeing peers, the bound and the ``extra`` functions interleaved (``inner`` calls per
    timed repeat, see :func:`_timeit`). Returns the row."""
    check_t: dict[str, float] = {}  # durations of the check calls: --smoke's single timing
    if ref is None:
        ref, check_t["camlens"] = _timed(ours, s.sync)
    row: dict[str, Any] = {"case": case, "title": title, "peers": {}, "bound": None, "extra": {}, "note": note,
                           "camlens_shape": list(ref.shape)}
    fns: dict[str, Fn] = {"camlens": ours}
    for name, p in peers.items():
        maps, check_t[name] = _timed(p.fn, s.sync)
        diff = _maxdiff(ref, maps)
        entry: dict[str, Any] = {"diff": diff, "tol": p.tol, "note": p.note, "aligned_diff": None, "how": p.how}
        ok = diff < p.tol
        if not ok and p.aligned is not None:
            a, b = p.aligned()
            entry["aligned_diff"] = _maxdiff(a, b)
            ok = entry["aligned_diff"] < p.tol
        entry["ok"] = ok
        row["peers"][name] = entry
        msg = f"  {name}: max diff {diff:.1e}" + (f" (aligned: {entry['aligned_diff']:.1e})" if entry["aligned_diff"]
                                                   is not None else "")
        print(msg + ("" if ok else "  <-- MAPS DISAGREE, not timed"), flush=True)
        if ok:
            fns[name] = p.fn
    if bound is not None:
        fns[bound[0]] = bound[1]
    fns.update(extra or {})
    if s.smoke:  # one call each, no warm-up: the check's own call where there was one
        times = {k: [check_t[k] if k in check_t else _timed(fn, s.sync)[1]] for k, fn in fns.items()}
    else:
        times = _timeit(fns, reps, s.sync, s.warmup if warmup is None else warmup, inner)
    row["camlens"] = _stats(times["camlens"])
    med = row["camlens"]["median_s"]
    for name, entry in row["peers"].items():
        if name in times:
            entry.update(_stats(times[name]))
            entry["ratio"] = entry["median_s"] / med
    if bound is not None:
        row["bound"] = {"name": bound[0], **_stats(times[bound[0]])}
        row["bound"]["camlens_over_bound"] = med / row["bound"]["median_s"]
    for name in extra or {}:
        row["extra"][name] = _stats(times[name])
    _print_row(row)
    return row


def _print_row(row: dict[str, Any]) -> None:
    parts = [f"camlens {row['camlens']['median_s'] * 1e3:.1f} ms"]
    for name, e in row["peers"].items():
        parts.append(f"{name} {e['median_s'] * 1e3:.1f} ms (x{e['ratio']:.2f})" if "ratio" in e else f"{name} —")
    if row["bound"]:
        parts.append(f"{row['bound']['name']} {row['bound']['median_s'] * 1e3:.1f} ms "
                     f"(camlens / bound {row['bound']['camlens_over_bound']:.2f})")
    print(f"{row['title']}: " + ", ".join(parts) + (f" — {row['note']}" if row["note"] else ""), flush=True)


# ----------------------------------------------------------------------------------------------------------
# the peers, each called its own best way


def pgc_peer(method: str, model: nn.Module, layer: nn.Module, x: Tensor, targets: Optional[list[Any]]) -> Fn:
    """pytorch-grad-cam: T targets of one image as a batch of T copies; ``targets`` are class columns (ints)
    or None (its top class per image). Built per call so its hooks never fire in the other functions."""
    import pytorch_grad_cam
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    cls = getattr(pytorch_grad_cam, {"gradcam": "GradCAM", "gradcampp": "GradCAMPlusPlus", "layercam": "LayerCAM",
                                     "scorecam": "ScoreCAM"}[method])
    xb = x.expand(len(targets), -1, -1, -1) if targets is not None and x.shape[0] == 1 else x
    tg = None if targets is None else [ClassifierOutputTarget(c) for c in targets]

    def run() -> Any:
        with cls(model=model, target_layers=[layer]) as cam:
            return cam(input_tensor=xb, targets=tg)

    return run


def tc_grad_peer(method: str, model: nn.Module, layer: nn.Module, x: Tensor, classes: Optional[list[int]]) -> Fn:
    """torchcam gradient methods: one forward, then one extractor call per class (retain_graph between them),
    feature-size maps upsampled + min-maxed as camlens does. ``classes=None``: each image's top class, one call
    with a class list for the batch."""
    import torchcam.methods as tcm

    cls = {"gradcam": tcm.GradCAM, "gradcampp": tcm.GradCAMpp, "layercam": tcm.LayerCAM}[method]
    size = tuple(x.shape[-2:])

    def run() -> Tensor:
        with cls(model, layer) as ex:
            scores = model(x)
            if classes is None:
                maps = ex(class_idx=scores.argmax(1).tolist(), scores=scores)[0]
            else:
                maps = torch.cat([ex(class_idx=c, scores=scores, retain_graph=i < len(classes) - 1)[0]
                                  for i, c in enumerate(classes)])
        return _up(maps, size)

    return run


def captum_peer(model: nn.Module, layer: nn.Module, x: Tensor, classes: Optional[list[int]]) -> Fn:
    """captum LayerGradCam: a batch of copies with ``target=list`` (``classes=None``: a no_grad forward for
    each image's top class first), ReLU on, bilinear ``LayerAttribution.interpolate``, min-max."""
    from captum.attr import LayerAttribution, LayerGradCam

    size = tuple(x.shape[-2:])
    xb = x.expand(len(classes), -1, -1, -1) if classes is not None and x.shape[0] == 1 else x

    def run() -> Tensor:
        tgt = classes
        if tgt is None:
            with torch.no_grad():
                tgt = model(xb).argmax(1).tolist()
        attr = LayerGradCam(model, layer).attribute(xb, target=list(tgt), relu_attributions=True)
        return _minmax(LayerAttribution.interpolate(attr, size, interpolate_mode="bilinear")[:, 0].detach())

    return run


def forward_grad(model: nn.Module, layer: nn.Module, x: Tensor, score: Callable[[Any], Tensor]) -> Fn:
    """The limit for gradient methods: one plain forward + ``autograd.grad`` of one score to the layer output
    captured by a forward hook."""
    store: dict[str, Tensor] = {}

    def run() -> None:
        h = layer.register_forward_hook(lambda m, i, o: store.__setitem__("a", o))
        try:
            out = model(x)
        finally:
            h.remove()
        torch.autograd.grad(score(out), store["a"])

    return run


def _acts_grads(model: nn.Module, layer: nn.Module, x: Tensor, cls: int) -> tuple[Tensor, Tensor]:
    """Layer activations and the gradient of logit ``cls`` of image 0, by hand (hook + autograd.grad)."""
    store: dict[str, Tensor] = {}
    h = layer.register_forward_hook(lambda m, i, o: store.__setitem__("a", o))
    try:
        out = model(x)
    finally:
        h.remove()
    g, = torch.autograd.grad(out[0, cls], store["a"])
    return store["a"].detach(), g


# ----------------------------------------------------------------------------------------------------------
# the cases: name -> function(setup) -> rows

CASES: dict[str, Callable[[Setup], list[dict[str, Any]]]] = {}


def case(name: str) -> Callable:
    """Register a case function under ``name`` (``--only`` matches substrings of it)."""

    def register(fn: Callable[[Setup], list[dict[str, Any]]]) -> Callable:
        CASES[name] = fn
        return fn

    return register


def _classes(T: int) -> list[int]:
    return list(range(0, 100 * T, 100))[:T]


def _gradcam_row(s: Setup, name: str, layer_name: str, T: int) -> dict[str, Any]:
    """Grad-CAM, one image, T targets, at ``layer_name``: all three peers + forward+grad (1 target)."""
    model, x = s.model(s.arch), s.x()
    layer, classes = _module(model, layer_name), _classes(T)
    peers = {PGC: Peer(pgc_peer("gradcam", model, layer, x, classes)),
             TC: Peer(tc_grad_peer("gradcam", model, layer, x, classes)),
             CAPTUM: Peer(captum_peer(model, layer, x, classes))}
    extra = {}
    if T > 1:  # camlens' own cost of many targets: the same call with the first target only
        extra["camlens 1 target"] = lambda: camlens.explain(model, x, targets=classes[:1], layer=layer_name).maps
    row = _measure(s, name, f"{s.arch} {s.size}² Grad-CAM {layer_name}, {T} target{'s' * (T > 1)}",
                   lambda: camlens.explain(model, x, targets=classes, layer=layer_name).maps, peers,
                   s.reps(), bound=("forward+grad", forward_grad(model, layer, x, lambda o: o[0, classes[0]])),
                   extra=extra)
    if T > 1:
        r = row["camlens"]["median_s"] / row["extra"]["camlens 1 target"]["median_s"]
        row["camlens_T_over_1"] = r
        row["note"] = f"camlens {T} targets / 1 target = {r:.2f}; bound is for 1 target"
    return [row]


@case("gradcam-1t-layer4")
def gradcam_1t_layer4(s: Setup) -> list[dict[str, Any]]:
    return _gradcam_row(s, "gradcam-1t-layer4", "layer4", 1)


@case("gradcam-1t-layer3")
def gradcam_1t_layer3(s: Setup) -> list[dict[str, Any]]:
    return _gradcam_row(s, "gradcam-1t-layer3", "layer3", 1)


@case("gradcam-10t-layer4")
def gradcam_10t_layer4(s: Setup) -> list[dict[str, Any]]:
    return _gradcam_row(s, "gradcam-10t-layer4", "layer4", 10)


@case("gradcam-10t-layer3")
def gradcam_10t_layer3(s: Setup) -> list[dict[str, Any]]:
    return _gradcam_row(s, "gradcam-10t-layer3", "layer3", 10)


OVERHEAD_INNER = 40  # calls per timed repeat in the overhead case: ~1 ms calls scatter ±30 % one by one


@case("tiny-cnn-overhead")
def tiny_cnn_overhead(s: Setup) -> list[dict[str, Any]]:
    """camlens' per-call overhead: Grad-CAM of one target on a 3-conv CNN at 64², where the forward and
    backward take about a millisecond; ``camlens / bound`` is the overhead factor over a hand-written
    forward + ``autograd.grad``."""
    model, x = s.model("tiny-cnn"), s.x(size=64)
    layer = model.features
    peers = {PGC: Peer(pgc_peer("gradcam", model, layer, x, [3])),
             TC: Peer(tc_grad_peer("gradcam", model, layer, x, [3])),
             CAPTUM: Peer(captum_peer(model, layer, x, [3]))}
    row = _measure(s, "tiny-cnn-overhead", "tiny CNN (3 convs) 64² Grad-CAM, 1 target: per-call overhead",
                   lambda: camlens.explain(model, x, targets=[3], layer="features").maps, peers, s.reps(),
                   bound=("forward+grad", forward_grad(model, layer, x, lambda o: o[0, 3])),
                   inner=1 if s.smoke else OVERHEAD_INNER,
                   note=f"random weights; the bound is a plain forward + autograd.grad of the logit to the layer; "
                        f"each timing is the mean of {OVERHEAD_INNER} calls in a row")
    return [row]


@case("multihead-3x5")
def multihead(s: Setup) -> list[dict[str, Any]]:
    """3 dict heads x 5 classes = 15 targets of one image in one camlens call. The peers need one output
    tensor: they get the model wrapped by :class:`Concat` and the matching columns."""
    model = s.model(f"threeheads-{s.arch}")
    x, layer = s.x(), model.layer4
    targets = [f"{h}:{c}" for h in "abc" for c in range(5)]
    cols = [10 * "abc".index(h) + c for h in "abc" for c in range(5)]
    flat = Concat(model)
    peers = {PGC: Peer(pgc_peer("gradcam", flat, layer, x, cols)),
             TC: Peer(tc_grad_peer("gradcam", flat, layer, x, cols)),
             CAPTUM: Peer(captum_peer(flat, layer, x, cols))}
    note = ("dict output: peers get a wrapper returning the 3 heads concatenated (same numbers) and the "
            "matching columns (pytorch-grad-cam zips its targets with the output, which for a dict are its keys; "
            "captum and torchcam need a tensor); bound is for 1 target")
    return [_measure(s, "multihead-3x5", f"3-head {s.arch} {s.size}² Grad-CAM layer4, 3 heads x 5 targets",
                     lambda: camlens.explain(model, x, targets=targets, layer="layer4").maps, peers, s.reps(),
                     bound=("forward+grad", forward_grad(model, layer, x, lambda o: o["a"][0, 0])), note=note)]


def _vit(s: Setup) -> nn.Module:
    """torchvision ViT-B/16 (``--smoke``: a 2-block ViT on 64x64), random weights from seed 0; its head,
    which torchvision initialises to zero (every gradient 0), re-drawn N(0, 0.02^2)."""
    key = "vit-smoke" if s.smoke else "vit_b_16"
    if key not in s.models:
        import torchvision

        torch.manual_seed(0)
        net = (torchvision.models.VisionTransformer(image_size=64, patch_size=16, num_layers=2, num_heads=4,
                                                    hidden_dim=64, mlp_dim=128) if s.smoke
               else torchvision.models.vit_b_16())
        nn.init.normal_(net.heads.head.weight, std=0.02)
        s.models[key] = net.eval().to(s.device)
    return s.models[key]


@case("vit-b16-gradcam-10t")
def vit_gradcam_10t(s: Setup) -> list[dict[str, Any]]:
    """Grad-CAM of 10 classes of one image on a ViT-B/16 at the input norm of its last block (camlens'
    ``layer=None``): camlens reads the tokens itself, pytorch-grad-cam gets its documented
    ``reshape_transform`` (drop the class token, 14x14 grid, channels first)."""
    model = _vit(s)
    x, classes = s.x(), _classes(10)
    layer_name = f"encoder.layers.encoder_layer_{len(model.encoder.layers) - 1}.ln_1"
    layer = _module(model, layer_name)
    g = s.size // 16

    def reshape(t: Tensor) -> Tensor:
        return t[:, 1:, :].reshape(t.size(0), g, g, t.size(2)).permute(0, 3, 1, 2)

    def pgc() -> Any:
        import pytorch_grad_cam
        from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

        with pytorch_grad_cam.GradCAM(model=model, target_layers=[layer], reshape_transform=reshape) as cam:
            return cam(input_tensor=x.expand(len(classes), -1, -1, -1),
                       targets=[ClassifierOutputTarget(c) for c in classes])

    note = ("random weights (head re-drawn: torchvision starts it at zero); torchcam and captum have no token "
            "reading (their Grad-CAM averages over the token axis of a (B, N, C) layer), so they are not run")
    extra = {"camlens 1 target": lambda: camlens.explain(model, x, targets=classes[:1], layer=layer_name).maps}
    row = _measure(s, "vit-b16-gradcam-10t", f"{'ViT (2 blocks)' if s.smoke else 'ViT-B/16'} {s.size}² Grad-CAM "
                   f"last block's ln_1, 10 targets",
                   lambda: camlens.explain(model, x, targets=classes).maps, {PGC: Peer(pgc)}, s.reps("heavy"),
                   bound=("forward+grad", forward_grad(model, layer, x, lambda o: o[0, classes[0]])),
                   extra=extra, note=note)
    r = row["camlens"]["median_s"] / row["extra"]["camlens 1 target"]["median_s"]
    row["camlens_T_over_1"] = r
    row["note"] = f"camlens 10 targets / 1 target = {r:.2f}; bound is for 1 target; " + note
    return [row]


def _cam_rows(s: Setup, name: str, upsample: bool) -> list[dict[str, Any]]:
    """CAM for every class of one image. torchcam's fastest way: ``compute_cams`` with the list of all classes
    (its one image's features broadcast over the class weights); also its documented per-class loop."""
    from torchcam.methods import CAM

    model, x = s.model(s.arch), s.x()
    K = model.fc.out_features
    size = tuple(x.shape[-2:])
    fin = (lambda m: _up(m, size)) if upsample else (lambda m: m)

    def tc_all() -> Tensor:
        with CAM(model, "layer4", "fc") as ex:
            with torch.no_grad():
                model(x)
            return fin(ex.compute_cams(list(range(K)))[0])

    def tc_loop() -> Tensor:
        with CAM(model, "layer4", "fc") as ex:
            with torch.no_grad():
                model(x)
            return fin(torch.cat([ex(class_idx=c)[0] for c in range(K)]))

    def fwd() -> None:
        with torch.no_grad():
            model(x)

    what = f"upsampled to {s.size}²" if upsample else "feature-size maps"
    note = ("relu=False on camlens' side: torchcam's CAM keeps negative evidence"
            + ("; torchcam's maps upsampled + min-maxed as camlens does" if upsample else ""))
    return [_measure(s, name, f"{s.arch} {s.size}² CAM layer4, all {K} classes, {what}",
                     lambda: camlens.explain(model, x, targets="all", layer="layer4", method="cam",
                                             upsample=upsample, relu=False).maps,
                     {TC: Peer(tc_all, note="compute_cams with the list of all classes (its public call without the "
                                            "batch-size precheck: the image's features broadcast over the weights)"),
                      TC_LOOP: Peer(tc_loop, note="one extractor call per class")},
                     s.reps("heavy" if upsample else "normal"), bound=("forward (no_grad)", fwd), note=note)]


@case("cam-all-feature")
def cam_all_feature(s: Setup) -> list[dict[str, Any]]:
    return _cam_rows(s, "cam-all-feature", upsample=False)


@case("cam-all-upsampled")
def cam_all_upsampled(s: Setup) -> list[dict[str, Any]]:
    return _cam_rows(s, "cam-all-upsampled", upsample=True)


def _torchcam_scorecam_with_pgc_masks():  # type: ignore[no-untyped-def]
    """torchcam's ScoreCAM with pytorch-grad-cam's (and camlens') masks — only for the alignment check:
    raw activations upsampled with align_corners=True, then min-maxed per mask (``(U - min) / (max - min +
    1e-8)``), instead of min-maxed at feature size and upsampled with align_corners=False."""
    from torchcam.methods import ScoreCAM

    class Aligned(ScoreCAM):
        def _get_weights(self, class_idx, *_, targets=None):  # type: ignore[no-untyped-def]
            with self._hooks_off(), self._eval_mode():
                return self._get_score_weights([a.clone() for a in self.hook_a], class_idx, targets)

        def _upsample(self, activation: Tensor) -> Tensor:
            up = F.interpolate(activation, self._input.shape[2:], mode="bilinear", align_corners=True)
            return self._normalize(up, 2)

    return Aligned


@case("scorecam")
def scorecam(s: Setup) -> list[dict[str, Any]]:
    """Score-CAM resnet18 layer4, 1 target; peers at their default batch sizes; then camlens' Faster
    Score-CAM (``max_channels`` 128 and 64) against the full camlens map. ``--smoke``: layer2 (128 channels,
    a quarter of layer4's masked forwards) and ``max_channels`` 64 and 32."""
    from torchcam.methods import ScoreCAM as TcScoreCAM

    model, x = s.model("resnet18"), s.x()
    layer_name, ks = ("layer2", (64, 32)) if s.smoke else ("layer4", (128, 64))
    layer, cls, size = _module(model, layer_name), 0, tuple(x.shape[-2:])

    def ours(**kw: Any) -> Fn:
        return lambda: camlens.explain(model, x, targets=cls, layer=layer_name, method="scorecam", **kw).maps

    def tc(extractor: type) -> Fn:
        def run() -> Tensor:
            with extractor(model, layer_name) as ex:
                with torch.no_grad():
                    model(x)
                return _up(ex(class_idx=cls)[0], size)
        return run

    full_map = ours()()
    peers = {PGC: Peer(pgc_peer("scorecam", model, layer, x, [cls]), SCORE_TOL, note="batch size 16 (default)"),
             TC: Peer(tc(TcScoreCAM), SCORE_TOL, note="batch size 32 (default)",
                      aligned=lambda: (full_map, tc(_torchcam_scorecam_with_pgc_masks())()),
                      how="torchcam min-maxes each channel at feature size, then upsamples the mask with "
                          "align_corners=False; camlens and pytorch-grad-cam upsample with align_corners=True, "
                          "then min-max. With torchcam patched to that mask")}
    fast = {f"camlens max_channels={k}": ours(max_channels=k) for k in ks}
    pearson = {k: _pearson(full_map, fn()) for k, fn in fast.items()}  # also their warm-up
    title = f"resnet18 {s.size}² Score-CAM {layer_name}, 1 target"
    row = _measure(s, "scorecam", title, ours(), peers, s.reps("scorecam"), extra=fast,
                   note="camlens batch size 32 (default)", warmup=0, ref=full_map)  # the checks are the warm-up
    rows = [row]
    for k, st in row.pop("extra").items():
        speed = row["camlens"]["median_s"] / st["median_s"]
        rows.append({"case": "scorecam", "title": f"{title}, {k.split(' ')[1]}", "camlens": st, "peers": {},
                     "bound": None, "extra": {}, "speedup_vs_full": speed, "pearson_vs_full": pearson[k],
                     "note": f"Faster Score-CAM: x{speed:.2f} faster than full camlens Score-CAM, Pearson r "
                             f"{pearson[k]:.4f} with its map; an approximation, so no peer agreement check"})
        print(f"  {k}: {st['median_s'] * 1e3:.1f} ms (x{speed:.2f} vs full), Pearson {pearson[k]:.4f}")
    row["extra"] = {}
    return rows


def _family_row(s: Setup, name: str, method: str, layer_name: str) -> dict[str, Any]:
    """Grad-CAM++ / LayerCAM, 1 target: pytorch-grad-cam and torchcam (captum has neither)."""
    model, x = s.model(s.arch), s.x()
    layer, cls, size = _module(model, layer_name), 0, tuple(x.shape[-2:])
    tc = Peer(tc_grad_peer(method, model, layer, x, [cls]))
    if method == "gradcampp":
        def tc_formula() -> tuple[Tensor, Tensor]:
            # torchcam's GradCAMpp divides alpha in place on a boolean-indexed COPY (alpha[mask].div_(...)),
            # so its alpha stays g^2 and its weights are sum_ij relu(g) * g^2; that formula, by hand:
            a, g = _acts_grads(model, layer, x, cls)
            w = (g.pow(2) * g.relu()).flatten(2).sum(-1)
            raw = (w[:, :, None, None] * a).sum(1).relu()
            return _up(raw, size), tc.fn()
        tc.aligned, tc.how = tc_formula, ("torchcam's Grad-CAM++ weights are sum relu(g)·g² (its alpha division "
                                          "is a no-op: in-place div_ on a boolean-indexed copy), not "
                                          "sum relu(g)·g²/(2g² + sum(A)·g³). With that formula by hand")
    peers = {PGC: Peer(pgc_peer(method, model, layer, x, [cls])), TC: tc}
    label = {"gradcampp": "Grad-CAM++", "layercam": "LayerCAM"}[method]
    return _measure(s, name, f"{s.arch} {s.size}² {label} {layer_name}, 1 target",
                    lambda: camlens.explain(model, x, targets=cls, layer=layer_name, method=method).maps, peers,
                    s.reps(), bound=("forward+grad", forward_grad(model, layer, x, lambda o: o[0, cls])),
                    note="captum has no Grad-CAM++ / LayerCAM")


@case("gradcampp-layer4")
def gradcampp_layer4(s: Setup) -> list[dict[str, Any]]:
    return [_family_row(s, "gradcampp-layer4", "gradcampp", "layer4")]


@case("layercam-layer4")
def layercam_layer4(s: Setup) -> list[dict[str, Any]]:
    return [_family_row(s, "layercam-layer4", "layercam", "layer4")]


@case("layercam-layer3")
def layercam_layer3(s: Setup) -> list[dict[str, Any]]:
    return [_family_row(s, "layercam-layer3", "layercam", "layer3")]


@case("batch32-top1")
def batch32(s: Setup) -> list[dict[str, Any]]:
    """32 images (``--smoke``: 8), each its own top class (targets=None everywhere)."""
    B = 8 if s.smoke else 32
    model, x = s.model(s.arch), s.x(batch=B)
    layer = model.layer4
    peers = {PGC: Peer(pgc_peer("gradcam", model, layer, x, None), note="targets=None"),
             TC: Peer(tc_grad_peer("gradcam", model, layer, x, None), note="class_idx = argmax list"),
             CAPTUM: Peer(captum_peer(model, layer, x, None), note="no_grad forward for the argmax, then attribute")}
    bound = forward_grad(model, layer, x, lambda o: o.gather(1, o.argmax(1, keepdim=True)).sum())
    return [_measure(s, "batch32-top1", f"{s.arch} {s.size}² Grad-CAM layer4, batch of {B}, top class each",
                     lambda: camlens.explain(model, x, targets=None, layer="layer4").maps, peers, s.reps("heavy"),
                     bound=("forward+grad", bound),
                     note="captum needs a forward for the top classes before its own")]


def _option_row(s: Setup, name: str, label: str, opts: dict[str, Any]) -> dict[str, Any]:
    """camlens-only: Grad-CAM layer4, 1 target with an explain() option, against the default call."""
    model, x = s.model(s.arch), s.x()
    title = f"{s.arch} {s.size}² Grad-CAM layer4, 1 target, {label}"

    def base() -> Tensor:
        return camlens.explain(model, x, targets=0, layer="layer4").maps

    def opt() -> Tensor:
        return camlens.explain(model, x, targets=0, layer="layer4", **opts).maps

    try:
        diff = _maxdiff(base(), opt())
    except TypeError as e:  # the option is not accepted (yet)
        print(f"{title}: option not available ({e})", flush=True)
        return {"case": name, "title": title, "camlens": None, "peers": {}, "bound": None, "extra": {},
                "note": f"option not available: {e}"}
    row = _measure(s, name, title, opt, {}, s.reps(), extra={"camlens (default)": base})
    speed = row["extra"]["camlens (default)"]["median_s"] / row["camlens"]["median_s"]
    row.update(diff_to_default=diff, speedup_vs_default=speed,
               note=f"x{speed:.2f} vs the default call; max abs diff to its (fp32) maps {diff:.1e}; no peer")
    return row


@case("option-channels_last")
def option_channels_last(s: Setup) -> list[dict[str, Any]]:
    return [_option_row(s, "option-channels_last", "channels_last=True", {"channels_last": True})]


@case("option-bf16")
def option_bf16(s: Setup) -> list[dict[str, Any]]:
    return [_option_row(s, "option-bf16", 'precision="bf16"', {"precision": "bf16"})]


# ----------------------------------------------------------------------------------------------------------
# output


def _ms(st: Optional[dict[str, Any]]) -> str:
    if not st or "median_s" not in st:
        return "—"
    iqr = st.get("iqr_s")
    return f"{st['median_s'] * 1e3:.1f} ({iqr * 1e3:.1f})" if iqr is not None else f"{st['median_s'] * 1e3:.1f}"


def _shown(p: Path) -> str:
    """``p`` relative to the working directory when inside it."""
    try:
        return str(p.resolve().relative_to(Path.cwd()))
    except ValueError:
        return str(p)


def write_markdown(res: dict[str, Any], path: Path) -> None:
    """The table: one row per result row, one column pair (time, ratio) per peer."""
    meta, rows = res["meta"], res["rows"]
    peer_names: list[str] = []
    for r in rows:
        peer_names += [p for p in r["peers"] if p not in peer_names]
    head = ["case", "camlens ms (IQR)"]
    for p in peer_names:
        head += [f"{p} ms (IQR)", f"{SHORT.get(p, p)} / camlens"]
    head += ["lower bound ms (IQR)", "camlens / bound", "max diff", "note"]
    lines = [f"# camlens vs pytorch-grad-cam, torchcam, captum — {meta['device']}", "",
             f"Machine: {meta['processor']}, {meta['cpu_count']} CPUs, {meta['threads']} torch threads, "
             f"torch {meta['torch']}, {', '.join(f'{k} {v}' for k, v in meta['versions'].items())}; "
             f"{meta['date']}; load average {meta['load_start']} at start, {meta['load_end']} at end"
             f"{'; --smoke (tiny models and inputs, 1 repeat)' if meta['smoke'] else ''}"
             f"{'; --quick' if meta['quick'] else ''}{'; cases: ' + ', '.join(meta['cases']) if meta['only'] else ''}.",
             "",
             "Same model (random weights), input, layer and targets for everyone; maps checked to agree before "
             "timing (max abs diff of final maps in [0, 1]; tolerance 1e-4, Score-CAM 1e-3); then "
             f"{meta['repeats']}; median (IQR) in ms; ratio > 1: camlens is faster. "
             "Lower bounds: forward+grad = one plain forward + autograd.grad of one target's logit to the layer "
             "output; forward (no_grad) = one plain forward.",
             "",
             f"Reproduce: `{meta['command']}`; chart from the raw timings: "
             f"`python -m benchmarks.chart {_shown(path.with_suffix('.json'))}`.",
             "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["title"], _ms(r["camlens"]) if r["camlens"] else "option not available"]
        for p in peer_names:
            e = r["peers"].get(p)
            if e is None:
                cells += ["—", "—"]
            elif "ratio" not in e:
                cells += [f"maps disagree ({e['diff']:.1e})", "—"]
            else:
                cells += [_ms(e), f"{e['ratio']:.2f}"]
        b = r["bound"]
        cells += [f"{b['name']}: {_ms(b)}" if b else "—", f"{b['camlens_over_bound']:.2f}" if b else "—"]
        diffs = []
        for p, e in r["peers"].items():
            d = f"{SHORT.get(p, p)} {e['diff']:.1e}"
            if e["aligned_diff"] is not None:
                d += f" (aligned {e['aligned_diff']:.1e})"
            diffs.append(d)
        cells.append(" · ".join(diffs) or "—")
        notes = [r["note"]] if r["note"] else []
        notes += [f"{p}: {e['note']}" for p, e in r["peers"].items() if e["note"]]
        notes += [f"{p}: {e['how']} max diff {e['aligned_diff']:.1e}" for p, e in r["peers"].items()
                  if e["aligned_diff"] is not None]
        cells.append("; ".join(notes).replace("|", "/"))
        lines.append("| " + " | ".join(cells) + " |")
    path.write_text("\n".join(lines) + "\n")


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--quick", action="store_true", help="fewer repeats (3; Score-CAM 1)")
    ap.add_argument("--smoke", action="store_true",
                    help="resnet18, 64x64 inputs, 1 repeat: checks agreement and outputs")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--only", default=None, help="run only the cases whose name contains this")
    ap.add_argument("--out", type=Path, default=None,
                    help="output folder (default benchmarks/results; with --smoke a temporary folder)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", message=".*maps are constant.*")  # tiny --smoke maps can be all zero
    dev = torch.device(args.device)
    planned = plan(args.out, args.smoke, args.only, CASES, dev.type, Path(__file__).parent / "results")
    if planned is None:
        return 2
    out_dir, names, stem = planned
    s = Setup(smoke=args.smoke, quick=args.quick, device=dev)
    meta = {"device": dev.type, "processor": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(),
            "threads": torch.get_num_threads(), "torch": torch.__version__,
            "versions": {k: importlib.metadata.version(d) for k, d in
                         [("camlens", "camlens"), (PGC, "grad-cam"), (TC, "torchcam"), (CAPTUM, "captum")]},
            "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
            "load_start": [round(v, 2) for v in os.getloadavg()], "smoke": args.smoke, "quick": args.quick,
            "only": args.only, "cases": names,
            "repeats": ("one timed call per function (the check's own), no warm-up: NOT a benchmark"
                        if args.smoke else
                        f"interleaved timing after warm-up, {s.reps()} repeats ({s.reps('heavy')} for batch-32 "
                        f"and upsampled CAM, {s.reps('scorecam')} for Score-CAM, warmed up by its checks)"),
            "command": "python -m benchmarks.run " + " ".join(sys.argv[1:] if argv is None else argv)}
    if dev.type == "cuda":
        meta["processor"] += f", {torch.cuda.get_device_name(dev)}"
    res = run_cases(CASES, names, s, meta, out_dir, stem, write_markdown)
    meta, rows = res["meta"], res["rows"]
    from .chart import plot

    plot(res, out_dir / f"{stem}.png")
    print(f"wrote {out_dir / stem}.md, .json, .png ({meta['wall_s']:.0f} s)")
    bad = [(r["title"], p) for r in rows for p, e in r["peers"].items() if not e["ok"]]
    for title, p in bad:
        print(f"MAPS DISAGREE: {title}: {p}", file=sys.stderr)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())

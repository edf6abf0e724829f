"""Volumes and video clips: inputs ``(B, C, D, H, W)`` (3-D medical volumes, or clips whose T frames
are the D axis), explained by the methods that declare ``volumes=True``.

How: the layer's 3-D map ``(B, C, d, h, w)`` is read as ``(B, C, d, h*w)``
(:class:`~camlens.backends.base.MapLayout` kind ``"volume"``; video transformers' channels-last maps
``(B, d, h, w, C)``, kind ``"volume-last"``, e.g. Swin3D, and clip tokens ``(B, P + d*h*w, C)``, kind
``"volume-tokens"``, e.g. MViT, are permuted to it: the backend's ``volume_layouts``, see
:mod:`camlens.backends.torch.volume_probe`), so the maths of every method that only reduces over all
positions of a map or works position by position (the Grad-CAM family, Eigen-CAM, CAM, Score-CAM, the
random baseline) is the volume's own; its raw maps ``(B, T, d, h*w)`` are read back as
``(B, T, d, h, w)``, then ReLU → trilinear upsampling to ``(D, H, W)`` (``align_corners=False``, as
``F.interpolate(mode="trilinear")``) → min-max per map over the whole volume (Score-CAM masks the
volume with each channel upsampled trilinearly). Ablation-CAM feeds its ablated copies back into the
layer in its own layout. Methods with maps at input resolution (occlusion with 3-D boxes, guided
backprop, Guided Grad-CAM, the centre prior) give saliency ``(B, T, D, H, W)``: ReLU → capped at a
quantile of the whole volume → min-max per volume (:func:`finish_saliency_volume`).
``differentiable=True``, ``noise_smooth=`` and ``aug_smooth=`` (H, W flipped and rescaled, D kept) work
as for images; ``layout=`` / ``reshape=`` override the reading (:func:`volume_reads`). Attention
methods, D-RISE and ``tile=`` are refused
with an error naming what works.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

from ..backends.base import VOLUME_KINDS, Backend, MapLayout, get_backend, namespace
from ..core.errors import ConfigError, InputError, LayerError
from ..core.explanation import Explanation
from ..core.layouts import layer_reads
from ..core.postprocess import fuse as fuse_maps
from ..core.postprocess import clip_quantile, normalize, relu as relu_maps, to_float32
from ..core.targets import Categories
from ..methods import Method, MethodOutput, available_methods
from .passes import pass_explanation, run_pass
from .wrappers import aug_smoothed, noise_smoothed

Tensor = Any  # an array of the model's backend

__all__ = ["takes_volumes", "volume_methods", "check_volume_call", "unflatten_raws", "process_volume", "finish_saliency_volume",
           "explain_volume", "volume_reads", "VolumeReshape"]

VOLUME = MapLayout("volume")


def takes_volumes(model: Any) -> bool:
    """Is ``model`` (a framework model) a 3-D CNN, so that a 4-D input ``(C, D, H, W)`` is one volume?
    (:meth:`Backend.input_rank`; a backend without it: never.)"""
    rank = getattr(get_backend(model), "input_rank", None)
    return rank is not None and rank(model) == 5


def volume_methods() -> list[str]:
    """Names of the registered methods that explain volumes (``Method.volumes``)."""
    return sorted(n for n, m in available_methods().items() if m.volumes)


def check_volume_call(meth: Method, shape: tuple, **unsupported: bool) -> None:
    """A clear error for a method or an option that does not take a volume input of ``shape``."""
    seen = f"the input has shape {tuple(shape)} (B, C, D, H, W): a volume or video clip"
    if not meth.volumes:
        raise ConfigError(f"method {meth.name!r} does not explain volumes yet ({seen}); methods that do: "
                          f"{', '.join(volume_methods())}. For a 2-D method, explain slices / frames as "
                          "(B, C, H, W) images with a 2-D model")
    on = [k for k, v in unsupported.items() if v]
    if on:
        raise ConfigError(f"{', '.join(on)} do(es) not combine with volume inputs yet ({seen}); drop "
                          f"{'them' if len(on) > 1 else 'it'}")


def unflatten_raws(raws: dict[str, Tensor], grids: dict[str, tuple[int, int, int]]) -> dict[str, Tensor]:
    """Raw maps ``(B, T, d, h*w)`` of each layer -> ``(B, T, d, h, w)`` (``grids``: layer -> ``(d, h, w)``)."""
    out = {}
    for name, m in raws.items():
        d, h, w = grids[name]
        out[name] = namespace(m).reshape(m, (*m.shape[:-2], d, h, w))
    return out


def _normalize_volume(maps: Tensor, warn: bool = True) -> Tensor:
    """Min-max of ``(B, T, D, H, W)`` per ``(b, t)`` over the whole volume (read as ``(B, T, D*H, W)``)."""
    xp = namespace(maps)
    *lead, D, H, W = maps.shape
    return xp.reshape(normalize(xp.reshape(maps, (*lead, D * H, W)), warn=warn), maps.shape)


def process_volume(raws: list[Tensor], size: Optional[tuple[int, int, int]], *, relu: bool = True,
                   fuse: str = "mean") -> Tensor:
    """Raw volume maps ``(B, T, d, h, w)`` of one or more layers -> maps ``(B, T, D, H, W)`` in [0, 1].

    One layer: ReLU → trilinear upsample to ``size`` (``None``: the largest layer's grid) → min-max
    over each whole volume. Several: each ReLU'd and min-maxed, upsampled, fused (mean / max) and
    min-maxed again, as :func:`camlens.core.postprocess.process` does for images.
    """
    from ..backends.base import ops_for

    if size is None:
        size = max((tuple(r.shape[-3:]) for r in raws), key=lambda s: s[0] * s[1] * s[2])
    ops = ops_for(raws[0])
    if len(raws) == 1:
        m = relu_maps(raws[0]) if relu else raws[0]
        return _normalize_volume(ops.resize(m, size))
    per = [ops.resize(_normalize_volume(relu_maps(r) if relu else r, warn=False), size) for r in raws]
    return _normalize_volume(fuse_maps(per, fuse))  # type: ignore[arg-type]


_VOLUME_OF = {"nchw": "volume", "nhwc": "volume-last", "tokens": "volume-tokens"}  # explain(layout=...) on volumes


class VolumeReshape:
    """A user's ``reshape=`` function for a volume layer: ``fn(a) -> (B, C, d, h, w)``, read as
    ``(B, C, d, h*w)`` like any 3-D map; ``grid`` is the ``(d, h, w)`` of its latest result (the raws
    of the pass that just ran are read back on it)."""

    def __init__(self, fn: Any) -> None:
        self.fn = fn
        self.grid: Optional[tuple[int, int, int]] = None

    def __call__(self, a: Tensor) -> Tensor:
        out = self.fn(a)
        if not hasattr(out, "shape") or len(out.shape) != 5:
            seen = tuple(out.shape) if hasattr(out, "shape") else type(out).__name__
            raise LayerError(f"for a volume / clip input, reshape= must return the layer's 3-D map (B, C, d, h, w); "
                             f"it returned {seen}")
        self.grid = tuple(int(v) for v in out.shape[-3:])  # type: ignore[assignment]
        return namespace(out).reshape(out, (*out.shape[:-2], out.shape[-2] * out.shape[-1]))


def volume_reads(layout: Any, reshape: Any, names: list[str],
                 auto: Callable[[list[str]], dict[str, MapLayout]]) -> dict[str, MapLayout]:
    """How to read each layer of a volume pass: ``explain(layout=..., reshape=...)`` where the user gave
    one, else camlens' own reading ``auto(layer names)`` (the backend's ``volume_layouts``, asked only
    for the layers it must read).

    ``layout``: ``"nchw"`` / ``"volume"`` (``(B, C, d, h, w)`` as is), ``"nhwc"`` / ``"volume-last"``
    (``(B, d, h, w, C)``), ``"tokens"`` / ``"volume-tokens"`` (``(B, P + t*h*w, C)``), or a
    :class:`MapLayout` of those kinds with ``grid=(t, h, w)`` and ``prefix=P`` (a token reading without
    a grid takes the model's, when camlens finds it); per layer as a dict. ``reshape``: ``fn(a) ->
    (B, C, d, h, w)`` (:class:`VolumeReshape`), applied alike to the gradients (so linear)."""
    user = layer_reads(layout, reshape, names) or {}
    out = auto([n for n in names if n not in user]) if len(user) < len(names) else {}
    for n, spec in user.items():
        if isinstance(spec, MapLayout) and spec.kind == "reshape" and callable(spec.fn):
            out[n] = MapLayout("reshape", fn=VolumeReshape(spec.fn))
            continue
        lay = MapLayout(spec) if isinstance(spec, str) else spec
        if not isinstance(lay, MapLayout):
            raise ConfigError(f"layout= takes a kind name or a camlens.MapLayout, got {spec!r}")
        kind = _VOLUME_OF.get(lay.kind, lay.kind)
        if kind not in VOLUME_KINDS:
            raise ConfigError(f"layout={lay.kind!r} does not read a volume layer; for volumes / clips use one of "
                              f"{sorted(_VOLUME_OF)} or {list(VOLUME_KINDS)}")
        grid, prefix = lay.grid, lay.prefix
        if kind == "volume-tokens" and grid is None:
            try:
                found: Optional[MapLayout] = auto([n]).get(n)
            except LayerError as err:
                raise LayerError(f"layout='tokens' for the volume layer {n!r} needs its grid: "
                                 f"camlens.MapLayout('tokens', grid=(t, h, w), prefix=P). ({err})") from None
            if found is None or found.kind != "volume-tokens":
                raise LayerError(f"layout='tokens' for the volume layer {n!r} needs its grid: "
                                 "camlens.MapLayout('tokens', grid=(t, h, w), prefix=P)")
            grid, prefix = found.grid, found.prefix if prefix is None else prefix
        if grid is not None and len(grid) != 3:
            raise ConfigError(f"a volume layer's grid is (t, h, w), got {grid!r} for layer {n!r}")
        out[n] = MapLayout(kind, None if grid is None else tuple(int(g) for g in grid), prefix)
    return out


def finish_saliency_volume(sal: Tensor, relu: bool = True, clip: float = 1.0) -> Tensor:
    """Saliency volumes ``(B, T, D, H, W)`` at input resolution (occlusion, guided backprop) -> maps in
    [0, 1]: ReLU (optional) → capped at the ``clip`` quantile of each whole volume → min-max per volume,
    as :func:`camlens.engine.finish.finish` does for images."""
    xp = namespace(sal)
    *lead, D, H, W = sal.shape
    flat = xp.reshape(to_float32(sal), (*lead, D * H, W))  # per volume: quantile and min-max over all voxels
    flat = clip_quantile(xp.clip(flat, min=0) if relu else flat, clip)
    return xp.reshape(normalize(flat), sal.shape)


def explain_volume(net: Any, x: Tensor, targets: Any, *, bk: Backend, meth: Method, opts: dict, layer: Any,
                   categories: Categories, top_k: Optional[int], fuse: str, relu: bool, upsample: bool,
                   eval_mode: bool, combine: str, precision: str, channels_last: Optional[bool], heads: Any,
                   sign: int, activation: Any, display: Any = None, differentiable: bool = False,
                   noise_smooth: int = 0, noise_sigma: float = 0.15, seed: int = 0, aug_smooth: bool = False,
                   layout: Any = None, reshape: Any = None, **unsupported: bool) -> Explanation:
    """:func:`camlens.explain` for ``x`` ``(B, C, D, H, W)``: maps ``(B, T, D, H, W)``, raws ``(B, T, d, h, w)``.

    ``differentiable``: as :func:`camlens.explain`'s (maps keep their graph back to the model's
    parameters and input; the model keeps its own mode and ``requires_grad``). ``noise_smooth``,
    ``noise_sigma``, ``seed``: SmoothGrad-style averaging of the raw maps over noisy copies of each
    volume (:func:`camlens.engine.wrappers.noise_smoothed`), as for images. ``layout``, ``reshape``:
    how to read the layers (:func:`volume_reads`).
    ``unsupported``: option name -> whether it was given (an error names those that were).
    """
    check_volume_call(meth, tuple(x.shape), **unsupported)
    rank = getattr(bk, "input_rank", None)
    if rank is not None and rank(net) == 4:
        raise InputError(f"the input has shape {tuple(x.shape)} (B, C, D, H, W), but the model's first spatial "
                         f"layer is 2-D ({type(net).__name__} takes (B, C, H, W) images); pass images, e.g. the "
                         "slices / frames x.movedim(2, 1).flatten(0, 1), or a 3-D model")
    if meth.needs_layer:
        layers = bk.resolve_layers(net, layer if layer is not None else bk.default_layer(net, x))
    else:
        layers = []
    names = [n for n, _ in layers]
    layouts = getattr(bk, "volume_layouts", None)  # (B, C, d, h, w), channels-last or clip tokens

    def reads(xs: Tensor) -> dict[str, MapLayout]:  # the user's reading of each layer, or camlens' at xs' size
        def auto(ns: list[str]) -> dict[str, MapLayout]:
            return layouts(net, xs, ns) if layouts is not None else {n: VOLUME for n in ns}
        return volume_reads(layout, reshape, names, auto)

    read = reads(x)
    out_size = tuple(int(s) for s in x.shape[-3:]) if upsample else None
    with bk.session(net, eval_mode=eval_mode, freeze=not differentiable, restore_buffers=not differentiable):
        fwd = bk.layout(net, channels_last, precision)
        p = run_pass(net, x, targets, layers, meth, opts, categories, top_k, combine, fwd, head_keys=heads,
                     differentiable=differentiable, backend=bk, read=read, sign=sign, activation=activation)
        result = p.result
        if noise_smooth:
            result = noise_smoothed(net, x, p, layers, meth, opts, noise_smooth, noise_sigma, seed, fwd, read=read)

        def finished(res: MethodOutput, size: Optional[tuple[int, int, int]], layouts: Optional[dict]
                     ) -> tuple[Tensor, dict]:  # raws (B, T, d, h*w) on the pass's grids -> maps, raws
            grids = {n: lay.grid if lay.kind in VOLUME_KINDS else lay.fn.grid for n, lay in (layouts or {}).items()
                     if lay.kind in VOLUME_KINDS or isinstance(lay.fn, VolumeReshape)}
            raws = unflatten_raws(res.raws or {}, grids)
            with bk.graph(differentiable):
                if raws:
                    return process_volume(list(raws.values()), size, relu=relu, fuse=fuse), raws
                return finish_saliency_volume(res.saliency, relu, res.clip), raws

        maps, raws = finished(result, out_size, p.layouts)
        if aug_smooth:
            def maps_of(xa: Tensor) -> Tensor:  # one pass on an augmented batch, maps at its own size
                q = run_pass(net, xa, p.rows, layers, meth, opts, None, None, layout=fwd, read=reads(xa))
                return finished(q.result, tuple(int(s) for s in xa.shape[-3:]) if upsample else None, q.layouts)[0]

            maps = aug_smoothed(net, x, p, layers, meth, opts, maps, out_size, relu, fuse, fwd, maps_of=maps_of,
                                read=read, norm=_normalize_volume)
    return pass_explanation(p, maps, raws, x, names, meth, opts, display, combine, differentiable, bk,
                            saliency=result.saliency, pixel=result.pixel)

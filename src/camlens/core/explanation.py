"""The result of :func:`camlens.explain`, and its file format (:meth:`Explanation.save`, :func:`load`).

File format ``camlens.explanation``, version 1 (:data:`FORMAT`, :data:`FORMAT_VERSION`): ONE ``.npz``
file (``numpy.savez_compressed``, a zip of ``.npy`` arrays) that any NumPy reads with
``np.load(path, allow_pickle=False)``; nothing in it is pickled. Its entries:

* ``__meta__``: ``(N,)`` uint8, the UTF-8 bytes of one JSON object (below);
* ``maps``, ``scores``, ``probs``, ``inputs``: the tensors of the same names; ``raw`` unless it is
  the first layer's raw maps (``meta["raw"] == "raws/0"``, the usual case, stored once);
  ``raws/{i}``: the raw maps of layer ``meta["raws"][i]``; ``heads/{i}``: the output of head
  ``meta["heads"][i]``; ``pixel``, ``display`` (uint8 ``(B, H, W, 3)``), ``segments`` and ``weights`` when set.

The JSON object holds ``format`` (``"camlens.explanation"``), ``format_version`` (``1``),
``camlens_version``, ``method``, ``layers``, ``options`` (the method's resolved options; a value
JSON cannot hold is stored as its ``repr`` string and its name listed in ``options_repr``; tuples
become lists), ``raws`` (layer names in order), ``raw``, ``heads`` (head keys in order; ints stay
ints, strs strs), ``targets`` (B lists of T ``{"head", "cls", "label", "has_fn", "head_only"}``, and
``"detection": {"box", "label", "score", "index"}`` for a box target of a detector),
``components`` (the same, or ``null``; ``"sign"`` and ``"activation"`` too where they are not the
defaults ``1`` / ``null``) and ``arrays``: per entry its original ``dtype`` (e.g.
``"torch.bfloat16"``), ``device`` (e.g. ``"cuda:0"``), ``shape`` and ``stored_as`` (the NumPy
dtype in the file). Tensors keep their dtype; a dtype NumPy lacks is stored widened (bf16 and
float8 as float32, complex32 as complex64) and cast back on load, bit for bit.

Score functions cannot be saved: such a target loads as a :class:`LoadedTarget` with ``fn=None``
and ``has_fn=True``; its ``head``, ``cls``, ``label`` and ``head_only`` are kept.

Framework-free: the arrays are any backend's (torch tensors, NumPy arrays); what a file entry needs
from the framework it came from (its host values, dtype and device names, and the way back) is the
backend's :meth:`~camlens.backends.base.Ops.to_file` / :meth:`~camlens.backends.base.Ops.from_file`.
"""

from __future__ import annotations

import dataclasses
import json
import math
import numbers
import os
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

import numpy as np

from ..backends.base import available_backends, ops_for, ops_named, to_float32
from .errors import ConfigError, InputError, InputFileNotFoundError, InputTypeError, TargetError
from .detection import Detection
from .targets import ResolvedTarget, is_array

Tensor = Any  # an array: a torch tensor, a NumPy array, ...

__all__ = ["Explanation", "load", "LoadedTarget", "FORMAT", "FORMAT_VERSION", "Deferred"]

#: The ``format`` string in every saved explanation's metadata.
FORMAT = "camlens.explanation"
#: The newest format version this camlens writes and reads.
FORMAT_VERSION = 1
META_KEY = "__meta__"


@dataclass
class Explanation:
    """Maps for B images and T targets each.

    Attributes:
        maps: ``(B, T, H, W)`` final maps in [0, 1], on the model's device.
        raw: ``(B, T, h, w)`` the first (or only) layer's weighted sum before ReLU, upsampling and
            normalisation.
        raws: per layer name, its raw maps ``(B, T, h_l, w_l)``.
        scores: ``(B, T)`` the explained scores (pre-softmax logits for class targets; ``-S`` for
            targets with ``sign=-1``: the maps explain exactly these scores).
        probs: ``(B, T)`` probability of each target's class on its head under the head's
            activation (softmax by default, sigmoid for multi-label heads; NaN where a target has
            no class or its head no probabilities, e.g. a score function, a region, a regression).
        targets: B lists of T resolved targets (head, cls, label); per image because ``top_k``
            picks different classes for different images.
        inputs: ``(B, 3, H, W)`` the model input that was explained.
        layers: the layer names used.
        method: the method name.
        display: optional ``(B, H, W, 3)`` uint8 images for overlays (set when camlens
            preprocessed the images itself).
        heads: the model's outputs by head key, detached.
        pixel: ``(B, T, C, H, W)`` per-input-channel attributions of input-space methods
            (guided backprop, guided Grad-CAM), else ``None``.
        components: with ``combine=`` other than ``"separate"``, the B lists of targets that were
            folded into each image's single combined target.
        options: the method's options as :func:`camlens.explain` resolved them (defaults filled in).
        segments: perturbation methods over superpixels (``lime``, ``kernelshap``): ``(B, H, W)`` int32
            NumPy, each pixel's segment index ``0 .. M_b - 1`` (else ``None``).
        weights: with ``segments``: ``(B, T, M)`` float32 NumPy, the weight of every segment for every
            target (``maps`` before min-max is ``weights[b, t][segments[b]]``); ``M`` is the largest
            ``M_b``, an image with fewer segments is NaN-padded.
        source: where the input came from, set by :func:`camlens.stream` (a path, a key, an index);
            ``None`` from :func:`camlens.explain`. Not saved by :meth:`save`.

    :meth:`save` writes it to one ``.npz`` file; :func:`camlens.load` reads it back.
    """

    maps: Tensor
    raw: Tensor
    scores: Tensor
    probs: Tensor
    targets: list[list[ResolvedTarget]]
    inputs: Tensor
    layers: list[str]
    method: str
    raws: dict[str, Tensor] = field(default_factory=dict)
    display: Optional[np.ndarray] = None
    heads: dict[Any, Tensor] = field(default_factory=dict)
    pixel: Optional[Tensor] = None
    components: Optional[list[list[ResolvedTarget]]] = None
    options: dict = field(default_factory=dict)
    segments: Optional[np.ndarray] = None
    weights: Optional[np.ndarray] = None
    source: Any = None

    def image(self, b: int) -> "Explanation":
        """Image ``b`` alone: the same explanation with a batch of one (every batched field sliced
        ``[b:b+1]``, views of the same tensors; ``targets`` / ``components`` ``[b]``)."""
        B = int(self.maps.shape[0])
        if not -B <= b < B:
            raise InputError(f"image index {b} out of range for a batch of {B}")
        b = b % B
        sl = slice(b, b + 1)

        def cut(t: Any) -> Any:
            return t[sl] if t is not None and getattr(t, "ndim", 0) >= 1 and t.shape[0] == B else t

        return dataclasses.replace(
            self, maps=self.maps[sl], raw=cut(self.raw), raws={k: cut(v) for k, v in self.raws.items()},
            scores=self.scores[sl], probs=self.probs[sl], targets=[self.targets[b]], inputs=cut(self.inputs),
            display=cut(self.display), heads={k: cut(v) for k, v in self.heads.items()}, pixel=cut(self.pixel),
            segments=cut(self.segments), weights=cut(self.weights), components=None if self.components is None else [self.components[b]], options=dict(self.options))

    @property
    def labels(self) -> list[list[str]]:
        """``B`` lists of ``T`` target labels, e.g. ``"0: tabby"``."""
        return [[t.label for t in row] for row in self.targets]

    def numpy(self) -> dict[str, Any]:
        """NumPy copies: ``maps``, ``raw``, ``scores``, ``probs`` (float32) and ``labels``."""
        return {
            "maps": _host_float32(self.maps),
            "raw": _host_float32(self.raw),
            "scores": _host_float32(self.scores),
            "probs": _host_float32(self.probs),
            "labels": self.labels,
        }

    def save(self, path: Union[str, os.PathLike]) -> Path:
        """Write this explanation to ONE compressed ``.npz`` file (see the module docs for the format).

        Args:
            path: the file; ``".npz"`` is appended when the name does not end with it (as
                ``numpy.savez`` does), parent directories are created.

        Returns:
            The ``Path`` written (with the ``.npz`` suffix). :func:`camlens.load` reads it back,
            tensors bit for bit; score functions (``target.fn``) are not saved.
        """
        out = _npz_path(path)
        arrays, meta = _encode(self)
        out.parent.mkdir(parents=True, exist_ok=True)
        blob = json.dumps(meta, ensure_ascii=False, allow_nan=True).encode("utf-8")
        arrays[META_KEY] = np.frombuffer(blob, dtype=np.uint8)
        tmp = out.with_name(out.name + ".part")
        try:
            with open(tmp, "wb") as f:  # a file object: numpy appends no second suffix
                np.savez_compressed(f, **arrays)  # type: ignore[arg-type]
            os.replace(tmp, out)
        finally:
            if tmp.exists():
                tmp.unlink()
        return out

    def __repr__(self) -> str:
        B, T, *rest = self.maps.shape
        dims = ", ".join(f"{k}={v}" for k, v in zip("DHW"[3 - len(rest):], rest))  # (D,) H, W
        return (f"Explanation(method={self.method!r}, layers={self.layers}, maps=(B={B}, T={T}, {dims}), "
                f"targets={self.labels[0] if B else []}{' ...' if B > 1 else ''})")


class Deferred:
    """A field value computed on its first read and kept: ``Explanation(probs=Deferred(fn))``
    (the softmax probabilities, which many calls never read, cost nothing until read)."""

    __slots__ = ("fn",)

    def __init__(self, fn: Any) -> None:
        self.fn = fn


def _deferred_field(name: str, doc: str) -> property:
    """A property over ``__dict__[name]`` that resolves a :class:`Deferred` once; the dataclass's
    ``__init__``, ``replace``, ``__eq__`` and ``repr`` go through it like a plain field."""
    key = "_" + name

    def get(self: Any) -> Any:
        v = self.__dict__[key]
        if isinstance(v, Deferred):
            v = self.__dict__[key] = v.fn()
        return v

    def put(self: Any, value: Any) -> None:
        self.__dict__[key] = value

    return property(get, put, doc=doc)


Explanation.probs = _deferred_field(  # type: ignore[assignment]
    "probs", "``(B, T)`` probability of each target's class on its head under the head's activation "
             "(softmax by default; NaN where undefined).")


@dataclass(frozen=True)
class LoadedTarget(ResolvedTarget):
    """A loaded target whose score function was not saved (functions cannot be): ``fn`` is
    ``None`` and ``has_fn`` is ``True``. ``head``, ``cls``, ``label`` and ``head_only`` are as saved;
    :meth:`score` raises, because the score cannot be recomputed without the function."""

    has_fn: bool = True

    def score(self, heads: Any, output: Any) -> Tensor:
        raise TargetError(f"target {self.label!r} was loaded from a file and its score function was not saved "
                           "(functions cannot be); explain the model again with the function to recompute it")


def _host_float32(x: Any) -> np.ndarray:
    """``x`` as a float32 NumPy array, detached (cast on its device first, then one copy to the host;
    a CPU float32 array is not copied)."""
    ops = ops_for(x)
    return ops.to_numpy(to_float32(ops.detach(x)))


# ----------------------------------------------------------------------------------------------
# saving


def _npz_path(path: Union[str, os.PathLike]) -> Path:
    p = Path(os.fspath(path))
    return p if p.name.endswith(".npz") else p.with_name(p.name + ".npz")


def _tensor_array(name: str, t: Any, specs: dict[str, dict]) -> np.ndarray:
    """``t`` as a NumPy array for the file; its original dtype / device / shape go to ``specs[name]``."""
    if isinstance(t, np.ndarray):
        specs[name] = {"dtype": f"numpy.{t.dtype}", "device": "numpy", "shape": list(t.shape),
                       "stored_as": str(t.dtype)}
        if t.dtype.hasobject:
            raise InputTypeError(f"cannot save {name!r}: it is an object array (dtype {t.dtype}); only numeric arrays "
                            "can be saved")
        return t
    if not is_array(t):
        raise InputTypeError(f"cannot save {name!r}: expected a tensor, got {type(t).__name__}")
    try:
        a, dtype, device = ops_for(t).to_file(t)  # host values (bf16 / float8 widened), dtype / device names
    except TypeError as e:
        raise InputTypeError(f"cannot save {name!r}: {e}") from e
    specs[name] = {"dtype": dtype, "device": device, "shape": list(t.shape), "stored_as": str(a.dtype)}
    return a


def _key(k: Any, what: str) -> Union[int, str]:
    """A head key for JSON: ints and strs are kept as they are (bool too); other integers become int."""
    if isinstance(k, (str, int)):
        return k
    if isinstance(k, numbers.Integral):
        return int(k)
    raise InputTypeError(f"cannot save {what} {k!r} of type {type(k).__name__}: only int and str head keys can be saved")


def _encode_target(t: ResolvedTarget) -> dict[str, Any]:
    cls = t.cls
    if cls is not None and not isinstance(cls, bool) and isinstance(cls, numbers.Integral):
        cls = int(cls)
    d = {"head": _key(t.head, "target head"), "cls": cls, "label": None if t.label is None else str(t.label),
         "has_fn": t.fn is not None or bool(getattr(t, "has_fn", False)),
         "head_only": bool(getattr(t, "head_only", True))}
    if t.sign != 1:
        d["sign"] = int(t.sign)
    if t.activation is not None:
        d["activation"] = str(t.activation)
    det = getattr(t, "detection", None)
    if det is not None:
        d["detection"] = {"box": [float(v) for v in det.box], "label": int(det.label), "score": float(det.score),
                          "index": int(det.index)}
    return d


def _encode_rows(rows: Optional[list[list[ResolvedTarget]]]) -> Optional[list[list[dict[str, Any]]]]:
    return None if rows is None else [[_encode_target(t) for t in row] for row in rows]


def _json_value(v: Any) -> tuple[Any, bool]:
    """``(value, ok)``: ``v`` as JSON holds it (tuples become lists), or ``(repr(v), False)``."""
    try:
        back = json.loads(json.dumps(v, allow_nan=True))
    except (TypeError, ValueError, RecursionError):
        return repr(v), False

    def same(a: Any, b: Any) -> bool:
        if isinstance(a, (list, tuple)):
            return isinstance(b, list) and len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
        if isinstance(a, dict):
            return isinstance(b, dict) and list(map(str, a)) == list(b) and all(same(a[k], b[str(k)]) for k in a)
        if isinstance(a, float) and math.isnan(a):
            return isinstance(b, float) and math.isnan(b)
        return type(a) is type(b) and a == b

    return (back, True) if same(v, back) else (repr(v), False)


def _encode(exp: "Explanation") -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """The arrays and the JSON metadata of one explanation (see the module docs)."""
    specs: dict[str, dict] = {}
    arrays: dict[str, np.ndarray] = {}
    for name in ("maps", "scores", "probs", "inputs", "pixel", "display", "segments", "weights"):
        v = getattr(exp, name)
        if v is not None:
            arrays[name] = _tensor_array(name, v, specs)
    raws = dict(exp.raws or {})
    layer_names = [str(k) for k in raws]
    for i, v in enumerate(raws.values()):
        arrays[f"raws/{i}"] = _tensor_array(f"raws/{i}", v, specs)
    raw_ref = None
    if exp.raw is not None:
        if raws and exp.raw is next(iter(raws.values())):
            raw_ref = "raws/0"  # the usual case: the first layer's raw maps, stored once
        else:
            arrays["raw"] = _tensor_array("raw", exp.raw, specs)
            raw_ref = "raw"
    head_keys = [_key(k, "head key") for k in exp.heads]
    for i, v in enumerate(exp.heads.values()):
        arrays[f"heads/{i}"] = _tensor_array(f"heads/{i}", v, specs)
    options, unsaved = {}, []
    for k, v in (exp.options or {}).items():
        options[str(k)], ok = _json_value(v)
        if not ok:
            unsaved.append(str(k))
    from .. import __version__

    meta = {"format": FORMAT, "format_version": FORMAT_VERSION, "camlens_version": __version__,
            "method": exp.method, "layers": [str(n) for n in exp.layers], "options": options,
            "options_repr": unsaved, "raws": layer_names, "raw": raw_ref, "heads": head_keys,
            "targets": _encode_rows(exp.targets), "components": _encode_rows(exp.components), "arrays": specs}
    return arrays, meta


# ----------------------------------------------------------------------------------------------
# loading

class _FileError(InputError):
    """A file :func:`load` refuses, with a message naming it."""


def _restore(name: str, a: np.ndarray, spec: dict, device: Any, where: str) -> Any:
    """An array of the file back as saved: an array of its framework and original dtype on ``device``
    (:meth:`Ops.from_file` of the framework its dtype name starts with, see
    :func:`camlens.backends.base.ops_named`), or the NumPy array."""
    if list(a.shape) != list(spec.get("shape", a.shape)):
        raise _FileError(f"{where}: entry {name!r} has shape {list(a.shape)}, but the metadata says {spec['shape']}; "
                         "the file is damaged")
    dtype = str(spec.get("dtype", ""))
    if dtype.startswith("numpy."):
        return a
    framework = dtype.split(".")[0]  # "torch.float32" -> "torch"; any other name: the default backend's (torch) to judge
    ops = ops_named(framework if framework in available_backends() else None)
    try:
        return ops.from_file(a, dtype, device)
    except LookupError as e:  # a dtype name that framework does not know
        raise _FileError(f"{where}: entry {name!r} has dtype {dtype!r}, {e.args[0] if e.args else e}") from None


def _decode_rows(rows: Optional[list], where: str) -> Optional[list[list[ResolvedTarget]]]:
    if rows is None:
        return None
    try:
        out = []
        for row in rows:
            r = []
            for d in row:
                kw = dict(head=d["head"], cls=d["cls"], label=d["label"], head_only=bool(d.get("head_only", True)),
                          sign=int(d.get("sign", 1)), activation=d.get("activation"))
                det = d.get("detection")
                if det is not None:
                    kw["detection"] = Detection(tuple(float(v) for v in det["box"]), int(det["label"]),  # type: ignore[arg-type]
                                                float(det["score"]), int(det["index"]))
                r.append(LoadedTarget(fn=None, has_fn=True, **kw) if d.get("has_fn") else ResolvedTarget(**kw))
            out.append(r)
        return out
    except (KeyError, TypeError) as e:
        raise _FileError(f"{where}: its targets metadata is malformed ({e!r}); the file is damaged") from e


def load(path: Union[str, os.PathLike], device: Any = None) -> "Explanation":
    """Read an explanation written by :meth:`Explanation.save` (NOT :func:`camlens.models.load`,
    which loads a model).

    Args:
        path: the ``.npz`` file. As in :meth:`Explanation.save`, ``".npz"`` is appended to a name
            that does not end with it, unless a file of exactly that name exists.
        device: where the tensors go (a device name or the framework's device object); default
            CPU (the devices they were saved from are in the file's metadata).

    Returns:
        An :class:`Explanation` whose tensors equal the saved ones bit for bit, in their saved
        dtypes: ``maps`` ``(B, T, H, W)``, ``raw`` / ``raws`` ``(B, T, h, w)``, ``scores`` /
        ``probs`` ``(B, T)``, ``inputs`` ``(B, C, H, W)``, ``pixel`` ``(B, T, C, H, W)``, ``display``
        a uint8 NumPy ``(B, H, W, 3)``; ``heads`` keyed as saved. A target that had a score
        function is a :class:`LoadedTarget` with ``fn=None``, ``has_fn=True``. ``options`` values
        JSON could not hold are their ``repr`` strings.

        Tensors are arrays of the framework they were saved from (torch tensors for
        :func:`camlens.explain`'s explanations), NumPy arrays for NumPy ones. Without that framework
        installed, its entries load as NumPy arrays of the same values (a dtype NumPy lacks as the one
        it was stored as, e.g. bfloat16 as float32), and ``device`` must be left unset.

    Raises:
        FileNotFoundError: no such file.
        ValueError: the file is not a camlens explanation, is damaged, holds pickled / object
            data (never unpickled), or has a newer ``format_version`` than this camlens reads.
    """
    given = Path(os.fspath(path))
    p = given if given.is_file() else _npz_path(given)
    if not p.is_file():
        tried = f"{given}" + (f" or {p}" if p != given else "")
        raise InputFileNotFoundError(f"no saved explanation at {tried}")
    where = f"{p}"
    with open(p, "rb") as f:
        head = f.read(4)
    if not zipfile.is_zipfile(p):
        raise _FileError(f"{where} is not a camlens explanation: not an .npz (zip) file (it starts with {head!r}); "
                         "save one with exp.save(path)")
    try:
        with np.load(p, allow_pickle=False) as z:
            names = list(z.files)
            if META_KEY not in names:
                shown = ", ".join(names[:8]) + (" ..." if len(names) > 8 else "")
                raise _FileError(f"{where} is not a camlens explanation: it has no {META_KEY!r} entry (its arrays: "
                                 f"{shown or 'none'}); save one with exp.save(path)")
            raw_meta = z[META_KEY]
            try:
                meta = json.loads(raw_meta.tobytes().decode("utf-8"))
            except (UnicodeDecodeError, ValueError) as e:
                raise _FileError(f"{where} is not a camlens explanation: its {META_KEY!r} entry is not UTF-8 JSON "
                                 f"({e})") from e
            if not isinstance(meta, dict) or meta.get("format") != FORMAT:
                found = meta.get("format") if isinstance(meta, dict) else type(meta).__name__
                raise _FileError(f"{where} is not a camlens explanation: its format is {found!r}, "
                                 f"expected {FORMAT!r}")
            version = meta.get("format_version")
            if not isinstance(version, int) or isinstance(version, bool) or version < 1:
                raise _FileError(f"{where}: format_version {version!r} is not a valid version (expected an integer "
                                 f"from 1 to {FORMAT_VERSION})")
            if version > FORMAT_VERSION:
                raise _FileError(f"{where} has format_version {version} (written by camlens "
                                 f"{meta.get('camlens_version', '?')}), but this camlens {_version()} reads versions "
                                 f"up to {FORMAT_VERSION}; upgrade camlens to load it")
            specs = meta.get("arrays", {})
            missing = [k for k in specs if k not in names]
            if missing:
                raise _FileError(f"{where}: entries {missing} named in its metadata are missing; the file is damaged")
            data = {k: _restore(k, z[k], specs[k], device, where) for k in specs}
    except zipfile.BadZipFile as e:
        raise _FileError(f"{where} is not a readable .npz file ({e}); the file is damaged") from e
    except (_FileError, ConfigError):  # (ConfigError: a device NumPy arrays cannot be placed on)
        raise
    except (KeyError, TypeError, AttributeError) as e:  # metadata of the wrong shape
        raise _FileError(f"{where}: its metadata is malformed ({e!r}); the file is damaged") from e
    except ValueError as e:
        # e.g. numpy's "Object arrays cannot be loaded when allow_pickle=False": never unpickled
        raise _FileError(f"{where}: cannot be read without unpickling or is damaged ({e}); camlens never unpickles "
                         "(allow_pickle=False)") from e

    try:
        raws = {name: data[f"raws/{i}"] for i, name in enumerate(meta["raws"])}
        heads = {k: data[f"heads/{i}"] for i, k in enumerate(meta["heads"])}
        raw_ref = meta.get("raw")
        raw = data[raw_ref] if raw_ref is not None else None
        return Explanation(maps=data["maps"], raw=raw, raws=raws, scores=data["scores"], probs=data.get("probs"),
                           targets=_decode_rows(meta["targets"], where) or [], inputs=data["inputs"],
                           layers=list(meta["layers"]), method=meta["method"], display=data.get("display"),
                           heads=heads, pixel=data.get("pixel"), segments=data.get("segments"),
                           weights=data.get("weights"),
                           components=_decode_rows(meta.get("components"), where),
                           options=dict(meta.get("options") or {}))
    except (KeyError, TypeError, AttributeError) as e:
        raise _FileError(f"{where}: the metadata or arrays lack {e}; the file is damaged") from e


def _version() -> str:
    from .. import __version__

    return __version__

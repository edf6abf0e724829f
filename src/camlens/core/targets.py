"""What to explain: an output head of the model and a class (or a score function) on it.

A model may return a tensor, a tuple/list, a dict, a namedtuple or a dataclass / HF-style
``ModelOutput``. :func:`split_outputs` flattens any of these into an ordered mapping
``head key -> tensor``; a :class:`Target` names one head (by key or position) and a class
index on it, or carries a callable score function.

Accepted target specs (see :func:`parse_target`):

* ``281``                 class 281 of the only / first head
* ``"281"`` / ``"tabby"`` the same, by index or by class name
* ``"species:281"``       class 281 of head ``species`` (``"1:3"``: class 3 of the second head)
* ``("species", 281)``    the same as a tuple
* ``Target(...)``         used as is
* ``callable``            ``fn(output) -> (B,)`` scores from the model's whole output (always
                          the raw output, whatever its structure)
* ``Target.box(box, cls)`` the detection of an object detector matching that box
                          (:mod:`camlens.core.detection`)
* ``Target.region(mask_or_box, cls=c)`` class c summed over a region of a ``(B, K, h, w)`` output
  (:mod:`camlens.core.regions`)

Every target explains an increase of its score S; ``sign=-1`` (``Target(..., sign=-1)`` or
``explain(..., sign=-1)`` for the targets without a sign of their own) explains a DECREASE: the
score becomes ``-S`` for every method, ``exp.scores`` holds ``-S`` (the maps explain exactly the
scores) and the label ends in ``" (decrease)"``.

Outputs :func:`split_outputs` cannot flatten (a detector's list of per-image dicts, nested
containers) give a :class:`RawHeads`: the top-level tensors it could read, plus the raw output
for callables and box targets.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Callable, Optional, Union

import array_api_compat
import numpy as np

from ..backends.base import namespace, ops_for
from .activations import ActivationSpec, activate, default_activation, head_activations
from .detection import BoxScore, Detection, check_box, detection_label, detection_lists, top_detections
from .errors import TargetError, TargetIndexError, TargetKeyError, TargetTypeError
from .predictions import class_name, head_categories
from .regions import Region, contains_region, dense_head, split_per_image

HeadKey = Union[int, str]
Tensor = Any  # an array of the model's framework (a torch.Tensor for PyTorch models)
ScoreFn = Callable[[Any], Tensor]


def is_array(x: Any) -> bool:
    """An array of any array-API library (a torch tensor, a NumPy array, ...). Containers and
    objects whose attribute lookup raises (dict-like outputs) are not."""
    if isinstance(x, (Mapping, list, tuple, str, int, float)) or x is None:
        return False
    try:
        return array_api_compat.is_array_api_obj(x)
    except Exception:  # e.g. a __getattr__ that raises KeyError
        return False


def is_framework_array(x: Any) -> bool:
    """An array of a model framework (a torch tensor, ...), which a model takes as it is; a NumPy
    array is not (for a loaded model it is an image to preprocess)."""
    return is_array(x) and type(x).__module__.split(".")[0] != "numpy"
Categories = Union[Sequence[str], Mapping[HeadKey, Sequence[str]], None]

__all__ = [
    "Target",
    "RawHeads",
    "ResolvedTarget",
    "split_outputs",
    "parse_target",
    "resolve_targets",
    "head_categories",
    "class_heads",
    "FEATURE_NAMES",
    "combine_targets",
    "COMBINE_MODES",
]


@dataclass(frozen=True)
class Target:
    """One thing to explain.

    Attributes:
        head: output key (dict key, field name) or position; ``None`` means the only / first output.
        cls: class index on that head. ``None`` for a head that is already one score per image
            (shape ``(B,)`` or ``(B, 1)``), or when ``fn`` is given.
        fn: optional score function. With ``head`` set it receives that head's tensor, otherwise
            the model's whole output; it must return one score per image, shape ``(B,)``.
        label: optional display label.
        sign: ``-1`` explains a decrease of the score (``-S``), ``+1`` an increase; ``None`` takes
            :func:`camlens.explain`'s ``sign`` (default ``+1``).
    """

    head: Optional[HeadKey] = None
    cls: Optional[int] = None
    fn: Optional[ScoreFn] = None
    label: Optional[str] = None
    sign: Optional[int] = None

    def __post_init__(self) -> None:
        if self.sign is not None:
            check_sign(self.sign)

    @staticmethod
    def box(box: Sequence[float], cls: Optional[int] = None, iou: float = 0.5, label: Optional[str] = None) -> "Target":
        """A detection of an object detector: per image, the detection of class ``cls`` (``None``:
        any class) whose box overlaps ``box`` = ``(x0, y0, x1, y1)`` (input pixels, as the model's
        boxes) best, with IoU >= ``iou`` (ties: the higher score). Its score is that detection's
        score; no match on an image is a :class:`TargetError` listing the detections there. Per-image
        boxes: ``targets=[[Target.box(a)], [Target.box(b)]]``. See :mod:`camlens.core.detection`."""
        b, c, thr = check_box(box, cls, iou)
        return Target(cls=c, fn=BoxScore(b, c, thr), label=label)

    @staticmethod
    def region(where: Any = None, *, cls: Union[int, str], head: Optional[HeadKey] = None,
               label: Optional[str] = None, sign: Optional[int] = None) -> "Target":
        """Class ``cls`` of a segmentation output ``(B, K, h, w)`` summed over a region:
        ``S_b = sum_ij M_b[i, j] * Y_b[cls, i, j]`` (see :mod:`camlens.core.regions`).

        Args:
            where: a mask ``(H, W)`` / ``(B, H, W)`` (bool or 0-1; NumPy or tensor) at the input's
                or the output's resolution (resized to the output by nearest at pixel centres),
                a box ``(x0, y0, x1, y1)`` in input pixels (or a list of B boxes), or ``None``:
                the pixels predicted as ``cls`` (``argmax_k Y[k] == cls``, as pytorch-grad-cam's
                ``SemanticSegmentationTarget`` with the argmax mask).
            cls: the class index (or name, with ``categories=``).
            head: the output; ``None``: the first ``(B, K, h, w)`` output (torchvision's ``"out"``).
            label, sign: as for :class:`Target`.
        """
        return Target(head=head, cls=cls, fn=Region(where), label=label, sign=sign)


@dataclass(frozen=True)
class ResolvedTarget:
    """A target after resolution against a real output: the head key is concrete.

    ``head`` is the key in :func:`split_outputs` (an int position or a str key), ``cls`` the class
    index (or ``None``), ``label`` a human-readable ``"head: class name"`` string.
    """

    head: HeadKey
    cls: Optional[int]
    label: str
    fn: Optional[ScoreFn] = None
    head_only: bool = True  # fn receives the head tensor (True) or the whole output (False)
    sign: int = 1  # -1: the explained score is -S (a decrease)
    activation: Optional[str] = None  # how probs reads the head (camlens.core.activations); None: its default
    detection: Optional[Detection] = None  # a box target: the detection it explains (box, label, score)

    def score(self, heads: Mapping[HeadKey, Tensor], output: Any) -> Tensor:
        """The explained score of each image, shape ``(B,)``, differentiable (``-S`` for ``sign=-1``)."""
        if self.fn is not None:
            s = self.fn(heads[self.head] if self.head_only else output)
        else:
            s = head_score(heads[self.head], self.cls)
        if not is_array(s) or s.ndim != 1:
            shape = tuple(s.shape) if is_array(s) else type(s).__name__
            raise TargetError(f"target {self.label!r}: a score function must return shape (B,), got {shape}")
        return -s if self.sign == -1 else s


def check_sign(sign: Any) -> int:
    """``sign`` as ``+1`` / ``-1``, or an error saying what a sign is."""
    if isinstance(sign, bool) or sign not in (1, -1):
        raise TargetError(f"sign must be +1 (explain an increase of the score) or -1 (a decrease), got {sign!r}")
    return int(sign)


def _signed_label(label: str, sign: int) -> str:
    return f"{label} (decrease)" if sign == -1 else label


def head_score(head: Tensor, cls: Optional[int]) -> Tensor:
    """Score of class ``cls`` per image from one head tensor.

    ``(B, K)`` logits give ``head[:, cls]``; ``(B,)`` or ``(B, 1)`` heads (regression, single
    logit) give the value itself; heads with more dims (``(B, K, H, W)`` segmentation) give the
    sum over the extra dims of channel ``cls``.
    """
    if head.ndim == 1:
        return head
    if cls is None:
        if head.shape[1] == 1:
            xp = namespace(head)
            return xp.sum(xp.reshape(head, (head.shape[0], -1)), axis=1)
        raise TargetError(f"a class is needed for a head of shape {tuple(head.shape)}")
    if not 0 <= cls < head.shape[1]:
        raise TargetIndexError(f"class {cls} out of range for a head with {head.shape[1]} classes")
    col = head[:, cls]
    if col.ndim == 1:
        return col
    xp = namespace(head)
    return xp.sum(xp.reshape(col, (head.shape[0], -1)), axis=1)


# ----------------------------------------------------------------------------------------------
# outputs


class RawHeads(dict):
    """The heads of an output :func:`split_outputs` cannot flatten: its top-level tensors (often
    none), with the raw output kept for callables and box targets.

    Attributes:
        output: the model's output as it came.
        batch: its batch size (a detector's list length, else the first tensor's leading dim), or ``None``.
        like: a tensor of the output (for the namespace and device), or ``None``.
        why: why it is not flattened, for error messages.
    """

    def __init__(self, items: Any, output: Any, why: str) -> None:
        super().__init__(items)
        self.output, self.why = output, why
        dets = detection_lists(output)
        leaves = _leaves(output)
        self.like = leaves[0] if leaves else None
        self.batch = len(dets) if dets is not None else (int(self.like.shape[0]) if leaves and self.like.ndim else None)

    def describe(self) -> str:
        """The output in words, e.g. ``a list of 2 dicts with keys ['boxes', 'labels', 'scores']``."""
        o = self.output
        if isinstance(o, (list, tuple)) and o and all(isinstance(d, Mapping) for d in o):
            return f"a {type(o).__name__} of {len(o)} dicts with keys {list(o[0])}"
        return f"a {type(o).__name__}"


def _leaves(x: Any, depth: int = 0) -> list:
    """The arrays in a nested output, depth first (at most 4 levels deep)."""
    if is_array(x):
        return [x]
    if depth > 4:
        return []
    vals = x.values() if isinstance(x, Mapping) else x if isinstance(x, (list, tuple)) else []
    return [a for v in vals for a in _leaves(v, depth + 1)]


def batch_size(heads: Mapping[HeadKey, Tensor]) -> int:
    """The batch size of an output's heads (a :class:`RawHeads` knows its own)."""
    if isinstance(heads, RawHeads):
        if heads.batch is None:
            raise TargetError(f"cannot tell the batch size of the model's output ({heads.describe()}): {heads.why}")
        return heads.batch
    return next(iter(heads.values())).shape[0]


def split_outputs(output: Any) -> dict[HeadKey, Tensor]:
    """Flatten a model output into an ordered ``{head key: tensor}`` mapping.

    A tensor gives ``{0: t}``; a tuple or list ``{0: t0, 1: t1, ...}``; a dict, namedtuple,
    dataclass or ``ModelOutput`` ``{name: t}`` in field order (``None`` fields skipped). Nested
    containers are not flattened: an output with a non-tensor item (a detector's list of per-image
    dicts, a nested tuple) or of another type gives a :class:`RawHeads` of its top-level tensors
    that keeps the raw output, for callables and box targets; class targets on what it lacks say
    what to use instead.
    """
    if is_array(output):
        return {0: output}
    if isinstance(output, tuple) and hasattr(output, "_fields"):  # namedtuple
        items = list(zip(output._fields, output))
    elif isinstance(output, Mapping):  # dict, OrderedDict, HF ModelOutput
        items = list(output.items())
    elif dataclasses.is_dataclass(output) and not isinstance(output, type):
        items = [(f.name, getattr(output, f.name)) for f in dataclasses.fields(output)]
    elif isinstance(output, (tuple, list)):
        items = list(enumerate(output))
    else:
        return RawHeads({}, output, f"its type {type(output).__name__} is not a tensor, tuple, list, dict, "
                                    "namedtuple or dataclass of tensors")
    heads = {k: v for k, v in items if v is not None}
    other = [(k, v) for k, v in heads.items() if not is_array(v)]
    if other:
        k, v = other[0]
        return RawHeads({k: v for k, v in heads.items() if is_array(v)}, output,
                        f"its item {k!r} is a {type(v).__name__}, not a tensor")
    if not heads:
        return RawHeads({}, output, "it holds no tensor")
    return heads


def _raw_error(heads: "RawHeads", what: str) -> TargetError:
    """A class target on an output that is not class scores: what was seen and what to use."""
    dets = detection_lists(heads.output) is not None
    use = ("for a detector, camlens.Target.box((x0, y0, x1, y1), cls=c) explains the detection matching a box, "
           "and targets=None its top detections (top_k=); or a callable" if dets else "use a callable")
    return TargetError(f"{what}: the model's output is {heads.describe()}, which camlens cannot read as class "
                       f"scores ({heads.why}); {use} target fn(output) -> (B,) scores, which receives the raw output")


def _find_head(key: Optional[HeadKey], heads: Mapping[HeadKey, Tensor]) -> HeadKey:
    keys = list(heads)
    if isinstance(heads, RawHeads) and not keys:
        raise _raw_error(heads, "no output head" if key is None else f"no output head {key!r}")
    if key is None:
        return keys[0]
    if key in heads:
        return key
    if isinstance(key, str) and key.lstrip("-").isdigit():
        key = int(key)
        if key in heads:
            return key
    if isinstance(key, int) and -len(keys) <= key < len(keys):
        return keys[key]
    if isinstance(heads, RawHeads):
        raise _raw_error(heads, f"no output head {key!r} (the tensors it holds: {keys})")
    raise TargetKeyError(f"no model output {key!r}; the outputs are {keys} "
                   f"(shapes {[tuple(v.shape) for v in heads.values()]})")


def _class_index(cls: Union[int, str], names: Optional[Sequence[str]], head: HeadKey) -> int:
    if isinstance(cls, int):
        return cls
    if _is_arraylike(cls):  # a 0-d tensor / NumPy integer
        a = _int_array(cls)
        if a.ndim != 0:
            raise TargetError(f"a class on head {head!r} must be one index, got an array of shape {a.shape}")
        return int(a)
    s = cls.strip()
    if s.lstrip("-").isdigit():
        return int(s)
    if names is None:
        raise TargetError(f"class {cls!r} is not an index and head {head!r} has no class names")
    low = [n.lower() for n in names]
    if s.lower() in low:
        return low.index(s.lower())
    close = [n for n in names if s.lower() in n.lower()]
    hint = f"; did you mean one of {close[:8]}" if close else ""
    raise TargetError(f"no class named {cls!r} on head {head!r}{hint}")


def parse_target(spec: Any, heads: Mapping[HeadKey, Tensor], categories: Categories = None, *, sign: int = 1,
                 activations: Optional[Mapping[HeadKey, str]] = None,
                 input_size: Optional[tuple[int, int]] = None) -> ResolvedTarget:
    """Resolve one target spec (int, ``"head:class"``, tuple, :class:`Target`, callable).

    ``sign``: for specs without a sign of their own; ``activations``: ``{head key: activation}``
    (:func:`camlens.core.activations.head_activations`) stamped on the target; ``input_size``: the
    model input's ``(H, W)`` (region boxes are in input pixels). A :class:`ResolvedTarget` is kept.
    """
    if isinstance(spec, ResolvedTarget):
        return spec
    if isinstance(spec, Target):
        sg = sign if spec.sign is None else spec.sign
        if isinstance(spec.fn, Region):
            key = _find_head(spec.head, heads) if spec.head is not None else dense_head(heads)
            rt = _resolve(key, spec.cls, heads, categories, activations=activations)
            label = spec.label or _signed_label(f"{rt.label} ({spec.fn.kind})", sg)
            return dataclasses.replace(rt, label=label, sign=sg, fn=spec.fn.bind(heads[key], rt.cls, input_size))
        if spec.fn is not None:
            head = _find_head(spec.head, heads) if spec.head is not None else next(iter(heads), 0)
            label = spec.label or _signed_label(getattr(spec.fn, "__name__", "score"), sg)
            return ResolvedTarget(head, spec.cls, label, spec.fn, head_only=spec.head is not None, sign=sg,
                                  activation=(activations or {}).get(head))
        return _resolve(spec.head, spec.cls, heads, categories, spec.label, sign=sg, activations=activations)
    if callable(spec) and not isinstance(spec, (str, int)):
        name = _signed_label(getattr(spec, "__name__", type(spec).__name__), sign)
        return ResolvedTarget(next(iter(heads), 0), None, name, spec, head_only=False, sign=sign)
    if isinstance(spec, bool):
        raise TargetTypeError("a target cannot be a bool")
    if _is_arraylike(spec):  # a 0-d tensor / NumPy integer: one class index
        spec = _plain_item(spec)
        if isinstance(spec, list):
            raise TargetError(f"one target must be one class index, got an array of {len(spec)}; "
                             "pass the array itself as targets= (1-D: one class per image)")
    kw = {"sign": sign, "activations": activations}
    if isinstance(spec, int) or (hasattr(spec, "__index__") and not isinstance(spec, (str, tuple))):
        return _resolve(None, int(spec), heads, categories, **kw)
    if isinstance(spec, tuple):
        if len(spec) != 2:
            raise TargetError(f"a tuple target is (head, class), got {spec!r}")
        return _resolve(spec[0], spec[1], heads, categories, **kw)
    if isinstance(spec, str):
        if ":" in spec:
            h, c = spec.split(":", 1)
            try:
                head = _find_head(h.strip(), heads)
            except KeyError:
                names = head_categories(categories, next(iter(heads)), heads)
                if names is not None and spec.strip().lower() in (n.lower() for n in names):
                    return _resolve(None, spec, heads, categories, **kw)  # a class name containing ':'
                raise
            return _resolve(head, c.strip() or None, heads, categories, **kw)
        return _resolve(None, spec, heads, categories, **kw)
    raise TargetTypeError(f"cannot use {spec!r} ({type(spec).__name__}) as a target; use an int, "
                    "'head:class', (head, class), camlens.Target or a callable")


def _resolve(head: Optional[HeadKey], cls: Union[int, str, None], heads: Mapping[HeadKey, Tensor],
             categories: Categories, label: Optional[str] = None, *, sign: int = 1,
             activations: Optional[Mapping[HeadKey, str]] = None) -> ResolvedTarget:
    key = _find_head(head, heads)
    t = heads[key]
    names = head_categories(categories, key, heads)
    idx = None if cls is None else _class_index(cls, names, key)
    if idx is not None:
        n = t.shape[1] if t.ndim >= 2 else 1
        if t.ndim < 2 or not 0 <= idx < n:
            raise TargetIndexError(f"class {idx} out of range for output {key!r} of shape {tuple(t.shape)}")
    elif not (t.ndim == 1 or (t.ndim >= 2 and t.shape[1] == 1)):
        raise TargetError(f"output {key!r} has shape {tuple(t.shape)}: name a class, e.g. '{key}:0'")
    if label is None:
        cname = None if idx is None else class_name(names, idx)
        cname = idx if cname is None else cname
        if len(heads) == 1 and cname is not None:
            label = str(cname)  # a single-output model: the class alone
        else:
            label = f"{key}: {cname}" if cname is not None else str(key)
        label = _signed_label(label, sign)
    return ResolvedTarget(key, idx, label, sign=sign, activation=activations.get(key) if activations else None)


def _is_box(spec: Any) -> bool:
    return isinstance(spec, Target) and isinstance(spec.fn, BoxScore)


def _box_target(fn: BoxScore, det: Detection, heads: Mapping[HeadKey, Tensor], categories: Categories,
                label: Optional[str] = None, sign: int = 1) -> ResolvedTarget:
    """A box target resolved on one image: the detection ``det`` it explains, labelled "name score"."""
    label = label or _signed_label(detection_label(det.label, det.score, categories), sign)
    return ResolvedTarget(next(iter(heads), 0), det.label, label, fn, head_only=False, detection=det, sign=sign)


def _parse_on_image(spec: Any, heads: Mapping[HeadKey, Tensor], categories: Categories, output: Any,
                    b: int, input_size: Optional[tuple[int, int]], kw: dict) -> ResolvedTarget:
    """:func:`parse_target`, with box targets matched on image ``b`` of ``output``."""
    if _is_box(spec):
        sign = kw["sign"] if spec.sign is None else check_sign(spec.sign)
        return _box_target(spec.fn, spec.fn.resolve(output, b, categories), heads, categories, spec.label, sign)
    return parse_target(spec, heads, categories, input_size=input_size, **kw)


def _top_detections(output: Any, heads: Mapping[HeadKey, Tensor], k: int,
                    categories: Categories, sign: int = 1) -> list[list[ResolvedTarget]]:
    """``targets=None`` on a detector: each image's k best detections as box targets (IoU 0.5 when
    re-matched on perturbed inputs)."""
    return [[_box_target(BoxScore(d.box, d.label, 0.5), d, heads, categories, sign=sign) for d in row]
            for row in top_detections(output, k, categories)]


def _is_per_image(targets: Sequence[Any]) -> bool:
    return len(targets) > 0 and all(isinstance(t, (list,)) for t in targets)


# ----------------------------------------------------------------------------------------------
# which outputs are classification heads (for targets=None / top_k / "all")

#: Name tokens of outputs that are features, not classification heads (``"features"``,
#: ``"image_embeds"``, ``"pooler_output"``, ``"last_hidden_state"``, ...).
FEATURE_NAMES = frozenset({"feat", "feats", "feature", "features", "emb", "embed", "embeds", "embedding",
                           "embeddings", "hidden", "pooled", "pooler", "latent", "latents", "penultimate",
                           "repr", "representation", "representations"})


def is_class_shaped(t: Tensor, batch: int) -> bool:
    """A ``(B, K)`` floating-point tensor with ``K >= 2``: the shape of class logits."""
    return t.ndim == 2 and t.shape[0] == batch and t.shape[1] >= 2 and namespace(t).isdtype(t.dtype, "real floating")


def _feature_name(key: HeadKey) -> bool:
    if not isinstance(key, str):
        return False
    parts = re.sub(r"([a-z0-9])([A-Z])", r"\1_\2", key).lower()  # camelCase -> camel_case
    return any(p in FEATURE_NAMES for p in re.split(r"[^a-z0-9]+", parts))


def class_heads(heads: Mapping[HeadKey, Tensor], names: Any = None) -> list[HeadKey]:
    """The outputs that count as classification heads when camlens picks the classes.

    With ``names`` (``explain(heads=...)``: a key / position or a list of them): exactly those
    outputs, in that order; each must be ``(B, K)``. Otherwise the default rule:

    * only ``(B, K)`` floating-point outputs with ``K >= 2`` qualify (maps, ``(B,)`` / ``(B, 1)``
      scores and integer outputs never do);
    * positional outputs (a tensor, tuple or list): only the FIRST qualifying one, so
      ``(logits, features)`` or ``(logits, aux_logits)`` explain the logits alone;
    * named outputs (dict, namedtuple, dataclass, ``ModelOutput``): every qualifying one except
      names with a feature token (:data:`FEATURE_NAMES`: ``"features"``, ``"embedding"``,
      ``"hidden"``, ``"pooled"``, ...; tokens split at ``_``, ``.``, ``-`` and camelCase).
    """
    if not heads and names is None:
        return []
    batch = next(iter(heads.values())).shape[0] if heads else None
    if names is not None:
        keys = list(names) if isinstance(names, (list, tuple)) else [names]
        if not keys:
            raise TargetError("heads= is an empty list; give at least one output key or position")
        out: list[HeadKey] = []
        for k in keys:
            if isinstance(k, bool) or not isinstance(k, (int, str)):
                raise TargetTypeError(f"heads= takes output keys (str) or positions (int), got {k!r}")
            key = _find_head(k, heads)
            t = heads[key]
            if t.ndim != 2 or t.shape[0] != batch:
                raise TargetError(f"heads=: output {key!r} has shape {tuple(t.shape)}, not (B, K) = ({batch}, K); "
                                 "only class-logit outputs can be classification heads")
            if key not in out:
                out.append(key)
        return out
    cand = [k for k, v in heads.items() if is_class_shaped(v, batch)]
    if all(isinstance(k, int) for k in heads):
        return cand[:1]
    return [k for k in cand if not _feature_name(k)]


def _is_value(t: Tensor, batch: int) -> bool:
    """A ``(B,)`` or ``(B, 1)`` floating-point output: one value per image (regression, one logit)."""
    return (t.ndim == 1 or (t.ndim == 2 and t.shape[1] == 1)) and t.shape[0] == batch \
        and namespace(t).isdtype(t.dtype, "real floating")


def _no_class_heads(heads: Mapping[HeadKey, Tensor]) -> TargetError:
    shapes = {k: tuple(v.shape) for k, v in heads.items()}
    return TargetError(f"no classification output (B, K) to take top classes from; outputs: {shapes} (outputs "
                      "named like features/embeddings are not heads by default). Pass targets explicitly, "
                      "name the classification heads with heads=[...], or, for a segmentation output "
                      "(B, K, h, w), use camlens.Target.region(cls=c)")


def _is_arraylike(t: Any) -> bool:
    return is_array(t) or isinstance(t, np.generic)


def _int_array(t: Any) -> np.ndarray:
    """A tensor / NumPy array / NumPy scalar of class indices as an int64 array (integer dtypes only)."""
    a = ops_for(t).to_numpy(t) if is_array(t) else np.asarray(t)
    if a.dtype == np.bool_ or not np.issubdtype(a.dtype, np.integer):
        raise TargetTypeError(f"a targets tensor/array must hold integer class indices, got dtype {a.dtype}")
    return a.astype(np.int64)


def _array_targets(targets: Any, batch: int) -> Any:
    """Tensor / NumPy targets -> the list forms: 0-d = one class (for every image); 1-D of
    length B = one class PER IMAGE; 2-D ``(B, T)`` = T classes per image."""
    a = _int_array(targets)
    if a.ndim == 0:
        return int(a)
    if a.ndim == 1:
        if a.shape[0] != batch:
            raise TargetError(f"a 1-D targets tensor/array gives one class per image: got {a.shape[0]} classes for "
                             f"a batch of {batch}; for the same classes on every image pass a list "
                             "(targets=t.tolist()) or a 2-D (B, T) array")
        return [[int(c)] for c in a]
    if a.ndim == 2:
        if a.shape[0] != batch or a.shape[1] == 0:
            raise TargetError(f"a 2-D targets tensor/array is (B, T) = ({batch}, T >= 1) classes per image, got shape "
                             f"{tuple(a.shape)}")
        return [[int(c) for c in row] for row in a]
    raise TargetError(f"a targets tensor/array must be 0-D (one class), 1-D (B,) (one class per image) or 2-D (B, T), "
                     f"got shape {tuple(a.shape)}")


def _plain_item(t: Any) -> Any:
    """A list item that is a tensor / array: 0-d -> int; 1-D -> a list of ints (one image's targets)."""
    if not _is_arraylike(t):
        return t
    a = _int_array(t)
    if a.ndim == 0:
        return int(a)
    if a.ndim == 1:
        return [int(c) for c in a]
    raise TargetError(f"a tensor/array inside a targets list must be 0-D or 1-D, got shape {tuple(a.shape)}")


def resolve_targets(targets: Any, heads: Mapping[HeadKey, Tensor], output: Any = None, *,
                    top_k: Optional[int] = None, categories: Categories = None,
                    head_keys: Any = None, sign: int = 1, activation: ActivationSpec = None,
                    input_size: Optional[tuple[int, int]] = None) -> list[list[ResolvedTarget]]:
    """Resolve user targets into ``B`` lists of ``T`` resolved targets (one list per image).

    * ``targets=None, top_k=None``: the top class of every classification head
      (:func:`class_heads`; ``head_keys`` names them explicitly, as ``explain(heads=...)``); with
      none, a first output of one value per image (``(B,)`` / ``(B, 1)``: regression) is explained.
    * ``top_k=K``: each classification head's K highest-scoring classes, per image.
    * ``"all"``: every class of the first classification head; ``"head:all"``: of that head.
    * a single spec or a flat list: the same targets for every image.
    * a list of lists: per-image targets; its length must equal the batch size and every inner
      list must have the same length T (never silently truncated or padded).
    * a tensor / NumPy array of class indices: 0-D (or a NumPy integer) one class for every
      image; 1-D ``(B,)`` ONE CLASS PER IMAGE (unlike a flat list); 2-D ``(B, T)`` per image.

    ``sign``: ``-1`` explains a decrease of every target without a sign of its own;
    ``activation``: a name or ``{head: name}`` (:mod:`camlens.core.activations`) stamped on the
    targets for ``probs`` / ``combine="confidence"``; ``input_size``: the input's ``(H, W)``, for
    region targets (:meth:`Target.region`), whose weights are bound here, one image's per target.
    A detector's output (a list of B dicts with boxes / labels / scores): ``targets=None`` is the
    top ``top_k`` (default 1) detections of each image by score, as box targets labelled
    ``"class name score"``; an image with fewer detections is an error (T is the same for every
    image). :meth:`Target.box` targets are matched on each image they are used for.
    """
    kw = {"sign": check_sign(sign), "activations": head_activations(activation, heads, _find_head)}
    rows = _rows(targets, heads, output, top_k, categories, head_keys, kw, input_size)
    return split_per_image(rows) if contains_region(targets) else rows


def _rows(targets: Any, heads: Mapping[HeadKey, Tensor], output: Any, top_k: Optional[int], categories: Categories,
          head_keys: Any, kw: dict, input_size: Optional[tuple[int, int]]) -> list[list[ResolvedTarget]]:
    batch = batch_size(heads)
    if targets is not None and top_k is not None:
        raise TargetError("give either targets or top_k, not both")
    if targets is None:
        k = 1 if top_k is None else int(top_k)
        if k < 1:
            raise TargetError(f"top_k must be >= 1, got {top_k}")
        if isinstance(heads, RawHeads) and detection_lists(output) is not None:
            return _top_detections(output, heads, k, categories, kw["sign"])
        keys = class_heads(heads, head_keys)
        if isinstance(heads, RawHeads) and not keys:
            raise _raw_error(heads, "targets=None explains the top classes of a classification output")
        first = next(iter(heads))
        if not keys and top_k is None and _is_value(heads[first], batch):  # a regression model: its value
            return [[_resolve(first, None, heads, categories, **kw)] for _ in range(batch)]
        return _top_k(heads, k, categories, keys, kw)
    if _is_arraylike(targets):
        targets = _array_targets(targets, batch)
    elif isinstance(targets, list) and any(map(_is_arraylike, targets)):
        targets = [_plain_item(t) for t in targets]
    if isinstance(targets, str) and targets.endswith("all"):
        h = targets[:-3].rstrip(":") or None
        if h is None:
            keys = class_heads(heads, head_keys)
            key = keys[0] if keys else _find_head(None, heads)
        else:
            key = _find_head(h, heads)
        n = heads[key].shape[1]
        per = [_resolve(key, c, heads, categories, **kw) for c in range(n)]
        return [list(per) for _ in range(batch)]
    if not isinstance(targets, list):
        targets = [targets]
    if _is_per_image(targets):
        if len(targets) != batch:
            raise TargetError(f"per-image targets: got {len(targets)} lists for a batch of {batch} images; "
                             "give one list per image, or a flat list to use the same targets for all")
        out = [[_parse_on_image(t, heads, categories, output, b, input_size, kw) for t in row]
               for b, row in enumerate(targets)]
        lens = {len(r) for r in out}
        if len(lens) != 1 or 0 in lens:
            raise TargetError(f"per-image target lists must all have the same non-zero length, got {[len(r) for r in out]}")
        return out
    if len(targets) == 0:
        raise TargetError("empty target list")
    if any(map(_is_box, targets)):  # matched on each image
        return [[_parse_on_image(t, heads, categories, output, b, input_size, kw) for t in targets]
                for b in range(batch)]
    per = [parse_target(t, heads, categories, input_size=input_size, **kw) for t in targets]
    return [list(per) for _ in range(batch)]


def _top_k(heads: Mapping[HeadKey, Tensor], k: int, categories: Categories,
           keys: Optional[Sequence[HeadKey]] = None, kw: Optional[dict] = None) -> list[list[ResolvedTarget]]:
    batch = batch_size(heads)
    keys = class_heads(heads) if keys is None else keys
    if not keys:
        raise _no_class_heads(heads)
    rows: list[list[ResolvedTarget]] = [[] for _ in range(batch)]
    for key in keys:
        t = heads[key]
        kk = min(k, t.shape[1])
        ops = ops_for(t)
        idx = ops.to_numpy(ops.topk(ops.detach(t), kk, axis=1)[1]).tolist()
        for b in range(batch):
            rows[b].extend(_resolve(key, c, heads, categories, **(kw or {})) for c in idx[b])
    return rows


def target_probabilities(targets: list[list[ResolvedTarget]], heads: Mapping[HeadKey, Tensor],
                         like: Optional[Tensor] = None) -> Optional[Tensor]:
    """Probability of each target's class on its head under the head's activation, shape ``(B, T)``.

    ``softmax`` (the default of ``(B, K)`` heads) or ``sigmoid`` (:mod:`camlens.core.activations`;
    ``tg.activation``); NaN where undefined: ``"none"`` heads (regression values), score
    functions, regions and box targets. The probability is of the class itself, also for
    ``sign=-1``. ``like``: an array for the namespace and device when ``heads`` is empty (a
    detector's output).
    """
    batch, T = len(targets), len(targets[0])
    defaults: dict[HeadKey, str] = {}

    def act(tg: ResolvedTarget) -> str:
        if tg.activation is not None:
            return tg.activation
        if tg.head not in defaults:
            defaults[tg.head] = default_activation(heads[tg.head])
        return defaults[tg.head]

    groups: dict[tuple[HeadKey, str], None] = {}  # (head, activation) pairs in use, in order
    for row in targets:
        for tg in row:
            if tg.fn is None and tg.head in heads:
                groups.setdefault((tg.head, act(tg)), None)
    first = next(iter(heads.values()), like)
    xp, ops = namespace(first), ops_for(first)
    probs = None
    for key, name in groups:  # one gather per head and activation (T may be 1000)
        p = activate(name, heads[key])  # (B, K) or None
        if p is None or p.shape[0] != batch:
            continue
        K = p.shape[1]

        def index(tg: ResolvedTarget) -> int:  # the column of tg in p, or -1 if tg is not of this group
            if tg.fn is not None or tg.head != key or act(tg) != name:
                return -1
            c = 0 if tg.cls is None and K == 1 else tg.cls
            return c if c is not None and 0 <= c < K else -1

        cls = [[index(tg) for tg in row] for row in targets]
        idx = ops.asarray(cls, like=p)
        got = xp.take_along_axis(p, xp.clip(idx, min=0), axis=1)
        if probs is None and all(c >= 0 for row in cls for c in row):
            return got  # the common case: every target in this one group
        if probs is None:
            probs = xp.full((batch, T), float("nan"), dtype=got.dtype, device=array_api_compat.device(got))
        probs = xp.where(idx >= 0, got, probs)
    if probs is None:
        probs = xp.full((batch, T), float("nan"), dtype=xp.float32, device=array_api_compat.device(first))
    return probs


# ----------------------------------------------------------------------------------------------
# combining targets across heads

COMBINE_MODES = ("separate", "mean", "confidence", "sum")


@dataclass(frozen=True, eq=False)
class _Combined:
    """Score ``sum_t w_t * S_t`` of several resolved targets on the same images."""

    parts: tuple
    weights: tuple

    def __call__(self, output: Any) -> Tensor:
        heads = split_outputs(output)
        return sum(w * tg.score(heads, output) for w, tg in zip(self.weights, self.parts))  # type: ignore[return-value]


def combine_targets(rows: list[list[ResolvedTarget]], heads: Mapping[HeadKey, Tensor], mode: str) -> list[list[ResolvedTarget]]:
    """Fold each image's T targets into one combined target (T becomes 1), or keep them (``separate``).

    Gradients are linear in the score, so explaining ``S = sum_t w_t S_t`` is the same as combining
    the T targets' gradients with weights ``w``:

    * ``mean``: ``w_t = 1 / T`` — gradients averaged over the outputs;
    * ``sum``: ``w_t = 1``;
    * ``confidence``: ``w_t = p_t / sum_u p_u`` with ``p_t`` the probability of target t's class
      on its head under the head's activation (:func:`target_probabilities`: softmax, or sigmoid
      for multi-label heads): each output's gradients weighted by its confidence, then averaged.
      Needs class targets on classification heads.

    Non-gradient methods explain the same combined score, so every method supports every mode.
    """
    if mode not in COMBINE_MODES:
        raise TargetError(f"combine must be one of {COMBINE_MODES}, got {mode!r}")
    if mode == "separate":
        return rows
    probs = target_probabilities(rows, heads).tolist() if mode == "confidence" else None
    out = []
    for b, row in enumerate(rows):
        T = len(row)
        if mode == "mean":
            w = [1.0 / T] * T
        elif mode == "sum":
            w = [1.0] * T
        else:
            p = probs[b]  # type: ignore[index]
            bad = [tg.label for tg, pt in zip(row, p) if pt != pt]
            if bad:
                raise TargetError(f"combine='confidence' needs class targets on classification heads; "
                                 f"{bad} have no probability (score functions, regions and heads with "
                                 "activation 'none' have none); use combine='mean' or 'sum'")
            total = sum(p)
            w = [pt / total for pt in p]
        label = f"{mode}({', '.join(tg.label for tg in row)})"
        out.append([ResolvedTarget(row[0].head, None, label, _Combined(tuple(row), tuple(w)), head_only=False)])
    return out

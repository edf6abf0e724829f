"""Top-k softmax predictions of a model's outputs, and the rule that names a head's classes.

Shared by the JSON summaries (:func:`camlens.report.predictions`), the HTML report
(:func:`camlens.viz.write_report`) and target resolution (:mod:`camlens.targets`). NumPy only:
torch tensors are duck-typed (``.detach().cpu()``), so :mod:`camlens.viz` can use it without torch.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Optional

import numpy as np

__all__ = ["head_categories", "class_name", "softmax", "head_predictions"]


def head_categories(categories: Any, head: Any, heads: Any) -> Optional[Sequence[str]]:
    """Class names of one head: a plain list applies to the first head; a mapping is looked up by
    the head's key, then by its position among ``heads``, then by ``str(key)`` (e.g. a mapping read
    from JSON, whose keys are strings)."""
    if categories is None:
        return None
    keys = list(heads)
    if isinstance(categories, Mapping):
        if head in categories:
            return categories[head]
        pos = keys.index(head)
        if pos in categories:
            return categories[pos]
        return categories.get(str(head))
    return categories if keys and head == keys[0] else None


def class_name(names: Optional[Sequence[str]], index: int) -> Optional[str]:
    """``names[index]``, or ``None`` when there are no names or ``index`` is past their end."""
    if names is not None and 0 <= index < len(names):
        return names[index]
    return None


def softmax(logits: np.ndarray) -> np.ndarray:
    """Softmax of a 1-D array, in float64."""
    x = np.asarray(logits, dtype=np.float64)
    e = np.exp(x - x.max())
    return e / e.sum()


def to_numpy(t: Any) -> np.ndarray:
    """``t`` as a numpy array; torch tensors go through ``.detach().float().cpu()`` (no torch import here)."""
    if hasattr(t, "detach") and hasattr(t, "cpu"):
        return t.detach().float().cpu().numpy()
    return np.asarray(t)


def head_predictions(heads: Mapping[Any, Any], b: int, categories: Any = None, k: int = 5) -> list[dict[str, Any]]:
    """Per head of ``heads`` (key -> ``(B, C)`` logits or ``(B,)`` / ``(B, 1)`` values), for image ``b``:

    * ``{"head": key, "top": [{"cls": i, "name": name or None, "prob": p}, ...]}``: the ``k`` most
      probable softmax classes (float64; ties in index order) of a head with ``C >= 2`` classes,
      names from ``categories`` (:func:`head_categories`);
    * ``{"head": key, "value": v}`` for a scalar head;
    * ``{"head": key, "shape": [...]}`` for any other output (one image's shape).
    """
    out: list[dict[str, Any]] = []
    for key, t in heads.items():
        shape = tuple(t.shape) if hasattr(t, "shape") else np.shape(t)
        entry: dict[str, Any] = {"head": key}
        if len(shape) == 2 and shape[1] >= 2:
            p = softmax(to_numpy(t[b]))  # only image b's row leaves the device
            names = head_categories(categories, key, heads)
            entry["top"] = [{"cls": int(i), "name": class_name(names, int(i)), "prob": float(p[i])}
                            for i in np.argsort(-p, kind="stable")[:k]]
        elif len(shape) == 1 or (len(shape) == 2 and shape[1] == 1):
            entry["value"] = float(to_numpy(t[b]).reshape(-1)[0])
        else:
            entry["shape"] = list(shape[1:])
        out.append(entry)
    return out

"""The framework-specific part of the Keras backend: tensors in and out, and the gradients of T target
scores w.r.t. the captured layer outputs, all T at once — one implementation per Keras backend,
chosen by ``keras.backend.backend()``. Everything else (:mod:`.graph`, :mod:`.eager`, :mod:`.scores`)
is backend-neutral Keras.

The contract (:class:`Autodiff`): ``forward(cap, fn)`` runs one forward ``fn(run)`` (``run`` a
:class:`~.graph.GraphRun` recording ``cap.names``) so that :meth:`Autodiff.jacobians` can then give
``S = score(output)`` ``(B, T)`` and, per captured layer ``A`` ``(B, ...)``,

    J[t, b] = d (sum_b' S[b', t]) / d A[b]          (T, B, ...)

which is ``dS[b, t] / dA[b]``: in inference mode image b's scores depend on image b's activations only.

* **TensorFlow** — the forward runs under one persistent ``tf.GradientTape`` that watches only the
  captured outputs (``watch_accessed_variables=False``: nothing before them is recorded); the scores
  are recorded on it and ONE vectorised Jacobian (``tape.jacobian(..., experimental_use_pfor=True)``;
  a ``while_loop`` Jacobian if pfor lacks an op) gives all T rows.
* **JAX** — a zero probe ``eps`` is added to each captured output in the forward (``A + eps``) and the
  forward is a function of the probes: ``jax.vjp(eps -> output)`` (one forward, recording the
  activations as auxiliary outputs); the scores' VJP gives the T output cotangents
  ``dS[:, t] / d output`` and ``jax.vmap`` of the model's VJP over them is ONE batched backward:
  ``d S[:, t] / d eps = d S[:, t] / d A``. The probes' shapes come from one abstract trace
  (``jax.eval_shape``: no FLOPs), memoised per model, input shape and layers.
* **PyTorch** — the same probes, as leaves with ``requires_grad``; the forward runs without a graph up to
  the first captured layer, then records; ``torch.autograd.grad(S.sum(0), eps,
  grad_outputs=I_T, is_grads_batched=True)`` is ONE batched backward (a loop over T if a kernel has no
  batching rule). Never ``.backward()``: no parameter's ``.grad`` is written, no ``requires_grad`` set.

Layer calls always get ``training=False`` (:mod:`.graph`), so no variable is assigned on any backend.
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import keras
import numpy as np
from keras.src import tree

from ...core.errors import LayerRuntimeError
from .graph import GraphRun

__all__ = ["Autodiff", "autodiff", "host", "BACKENDS"]

#: The Keras backends camlens explains models on.
BACKENDS = ("tensorflow", "jax", "torch")


class Autodiff:
    """What differs between Keras backends; the defaults are backend-neutral Keras."""

    name = ""

    def to_tensor(self, a: np.ndarray) -> Any:
        """A float32 NumPy array as the backend's tensor (on its default device)."""
        return keras.ops.convert_to_tensor(np.ascontiguousarray(a, dtype=np.float32))

    def to_numpy(self, t: Any) -> np.ndarray:
        """A writable host copy of a tensor (NumPy arrays pass through)."""
        if isinstance(t, np.ndarray):
            return t
        a = keras.ops.convert_to_numpy(t)
        return a if a.flags.writeable else a.copy()

    def is_tensor(self, t: Any) -> bool:
        return keras.ops.is_tensor(t)

    def no_grad(self) -> contextlib.AbstractContextManager:
        """The context of forwards that need no gradient (Score-CAM's, occlusion's batches)."""
        return contextlib.nullcontext()

    def call_context(self) -> contextlib.AbstractContextManager:
        """The framework's modes for one ``explain`` call (torch: inference mode off)."""
        return contextlib.nullcontext()

    @contextlib.contextmanager
    def open(self, cap: Any) -> Iterator[None]:
        """The block of one capture (TF: its tape); what the capture holds is released on exit."""
        try:
            yield
        finally:
            cap.grad_state = None

    def forward(self, cap: Any, fn: Callable[[GraphRun], Any], key: tuple = ()) -> tuple[Any, dict]:
        """``fn(run)``'s output and ``run.outputs`` (path -> [output per call]) for ``cap.names``,
        set up for :meth:`jacobians` when ``cap.grad``; ``key`` (the input's shape) tells forwards
        of one structure apart."""
        with self.no_grad():
            run = GraphRun(frozenset(cap.names))
            return fn(run), run.outputs

    def jacobians(self, cap: Any, score: Callable[[Any], Any], names: Sequence[str],
                  check: Callable[[np.ndarray], None]) -> list[np.ndarray]:
        """Per layer of ``names``, ``J`` ``(T, B, ...)`` (module docstring) for ``S = score(cap.output)``
        ``(B, T)``; ``check(S as NumPy)`` runs before the backward."""
        raise NotImplementedError


class _TF(Autodiff):
    name = "tensorflow"

    def __init__(self) -> None:
        import tensorflow as tf

        self.tf = tf

    def to_tensor(self, a: np.ndarray) -> Any:
        return self.tf.convert_to_tensor(np.ascontiguousarray(a, dtype=np.float32))

    def to_numpy(self, t: Any) -> np.ndarray:
        return t.numpy() if hasattr(t, "numpy") else np.asarray(t)

    @contextlib.contextmanager
    def open(self, cap: Any) -> Iterator[None]:
        tape = self.tf.GradientTape(persistent=True, watch_accessed_variables=False) if cap.grad else None
        if tape is not None:
            tape.__enter__()
        cap.grad_state = tape
        try:
            yield
        finally:
            if tape is not None:
                tape.__exit__(None, None, None)
            cap.grad_state = None

    def forward(self, cap: Any, fn: Callable[[GraphRun], Any], key: tuple = ()) -> tuple[Any, dict]:
        tape = cap.grad_state
        run = GraphRun(frozenset(cap.names), on_output=(lambda path, out: tape.watch(out)) if tape is not None else None)
        return fn(run), run.outputs

    def jacobians(self, cap: Any, score: Callable[[Any], Any], names: Sequence[str],
                  check: Callable[[np.ndarray], None]) -> list[np.ndarray]:
        tf, tape = self.tf, cap.grad_state
        s = score(cap.tf_output)  # (B, T), recorded on the tape
        check(s.numpy())
        sources = [cap.tf_acts[n] for n in names]
        T = int(s.shape[1])
        total = tf.reduce_sum(s) if T == 1 else tf.reduce_sum(s, axis=0)  # () or (T,), recorded
        zero = tf.UnconnectedGradients.ZERO
        with tape.stop_recording():
            if T == 1:
                return [g.numpy()[None] for g in tape.gradient(total, sources, unconnected_gradients=zero)]
            try:
                gs = tape.jacobian(total, sources, unconnected_gradients=zero, experimental_use_pfor=True)
            except (ValueError, NotImplementedError, tf.errors.InvalidArgumentError):  # an op pfor lacks
                gs = tape.jacobian(total, sources, unconnected_gradients=zero, experimental_use_pfor=False)
            return [g.numpy() for g in gs]  # (T, B, ...)


class _JAX(Autodiff):
    name = "jax"

    def __init__(self) -> None:
        import jax

        self.jax = jax
        self._shapes: "weakref.WeakKeyDictionary[Any, dict]" = weakref.WeakKeyDictionary()

    def _probe_shapes(self, cap: Any, fn: Callable[[GraphRun], Any], key: tuple) -> dict:
        """``{path: ShapeDtypeStruct}`` of the captured outputs that are one array (an abstract trace)."""
        try:
            memo = self._shapes.setdefault(cap.model, {})
        except TypeError:
            memo = {}
        key = (key, tuple(cap.names))
        if key not in memo:
            def shapes() -> dict:
                run = GraphRun(frozenset(cap.names))
                fn(run)
                return {p: outs[0] for p, outs in run.outputs.items() if len(outs) == 1 and self.is_tensor(outs[0])}

            if len(memo) >= 8:
                memo.clear()
            memo[key] = self.jax.eval_shape(shapes)
        return memo[key]

    def forward(self, cap: Any, fn: Callable[[GraphRun], Any], key: tuple = ()) -> tuple[Any, dict]:
        if not cap.grad:
            return super().forward(cap, fn)
        jnp = self.jax.numpy
        eps0 = {p: jnp.zeros(s.shape, s.dtype) for p, s in self._probe_shapes(cap, fn, key).items()}

        def f(eps: dict) -> tuple[Any, dict]:
            run = GraphRun(frozenset(cap.names),
                           on_output=lambda path, out: out + eps[path] if path in eps else None)
            return fn(run), run.outputs

        out, vjp, outs = self.jax.vjp(f, eps0, has_aux=True)
        cap.grad_state = (vjp, list(eps0))
        return out, outs

    def jacobians(self, cap: Any, score: Callable[[Any], Any], names: Sequence[str],
                  check: Callable[[np.ndarray], None]) -> list[np.ndarray]:
        jax, jnp = self.jax, self.jax.numpy
        vjp_model, probed = cap.grad_state
        s, vjp_score = jax.vjp(score, cap.tf_output)  # S (B, T) and its VJP w.r.t. the output
        check(np.asarray(s))
        missing = [n for n in names if n not in probed]
        if missing:
            raise LayerRuntimeError(f"layers {missing} have no probe in the JAX forward (probed: {probed})")
        B, T = s.shape
        cot = jnp.broadcast_to(jnp.eye(T, dtype=s.dtype)[:, None, :], (T, B, T))  # row t: dS/dS[:, t]

        def backward(c: Any) -> list:
            (d_out,) = vjp_score(c)
            (d_eps,) = vjp_model(d_out)
            return [d_eps[n] for n in names]

        return [np.array(g) for g in jax.vmap(backward)(cot)]  # (T, B, ...) each


class _Torch(Autodiff):
    name = "torch"

    def __init__(self) -> None:
        import torch

        self.torch = torch

    def to_numpy(self, t: Any) -> np.ndarray:
        if isinstance(t, self.torch.Tensor):
            return t.detach().cpu().numpy()
        return super().to_numpy(t)

    def no_grad(self) -> contextlib.AbstractContextManager:
        return self.torch.no_grad()

    def call_context(self) -> contextlib.AbstractContextManager:
        return self.torch.inference_mode(False)  # explain works inside torch.inference_mode(), as on torch models

    def forward(self, cap: Any, fn: Callable[[GraphRun], Any], key: tuple = ()) -> tuple[Any, dict]:
        if not cap.grad:
            return super().forward(cap, fn)
        torch = self.torch
        eps: dict[str, list] = {}

        def probe(path: str, out: Any) -> Any:
            if not isinstance(out, torch.Tensor) or not out.is_floating_point():
                return None
            torch.set_grad_enabled(True)  # the graph starts at the first captured layer
            e = torch.zeros_like(out, requires_grad=True)
            eps.setdefault(path, []).append(e)
            return out + e

        was = torch.is_grad_enabled()
        torch.set_grad_enabled(False)
        try:
            run = GraphRun(frozenset(cap.names), on_output=probe)
            out = fn(run)
        finally:
            torch.set_grad_enabled(was)
        cap.grad_state = {p: e[0] for p, e in eps.items() if len(e) == 1}
        return out, run.outputs

    def jacobians(self, cap: Any, score: Callable[[Any], Any], names: Sequence[str],
                  check: Callable[[np.ndarray], None]) -> list[np.ndarray]:
        torch = self.torch
        with torch.enable_grad():
            s = score(cap.tf_output)  # (B, T), on the recorded graph
        check(self.to_numpy(s))
        eps = [cap.grad_state[n] for n in names]
        T = int(s.shape[1])
        total = s.sum(0)  # (T,)
        if not total.requires_grad:  # no score depends on the layers
            return [np.zeros((T, *e.shape), np.float32) for e in eps]
        eye = torch.eye(T, dtype=total.dtype, device=total.device)
        try:
            gs = torch.autograd.grad(total, eps, grad_outputs=eye if T > 1 else eye[0], is_grads_batched=T > 1,
                                     allow_unused=True, retain_graph=True)
            gs = [g if T > 1 or g is None else g[None] for g in gs]
        except RuntimeError:  # a kernel without a batching rule: one backward per target
            rows = [torch.autograd.grad(total[t], eps, allow_unused=True, retain_graph=True) for t in range(T)]
            gs = [None if rows[0][i] is None else torch.stack([r[i] for r in rows]) for i in range(len(eps))]
        return [np.zeros((T, *e.shape), np.float32) if g is None else self.to_numpy(g) for g, e in zip(gs, eps)]


_IMPLS = {"tensorflow": _TF, "jax": _JAX, "torch": _Torch}
_CURRENT: dict[str, Autodiff] = {}


def autodiff() -> Autodiff:
    """The :class:`Autodiff` of the Keras backend in use (``keras.backend.backend()``)."""
    name = keras.backend.backend()
    if name not in _CURRENT:
        impl = _IMPLS.get(name)
        if impl is None:
            from ...core.errors import ConfigError

            raise ConfigError(f"Keras runs on its {name!r} backend; camlens explains Keras models on {list(BACKENDS)} "
                              "(set KERAS_BACKEND before importing keras)")
        _CURRENT[name] = impl()
    return _CURRENT[name]


def host(out: Any) -> Any:
    """NumPy copies of an output structure's tensors."""
    ad = autodiff()
    return tree.map_structure(ad.to_numpy, out)

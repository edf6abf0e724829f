"""The framework-specific part of the Keras backend: tensors in and out, and the gradients of T target
scores w.r.t. the captured layer outputs, all T at once — one implementation per Keras backend,
chosen by ``keras.backend.backend()``. Everything else (:mod:`.graph`, :mod:`.eager`, :mod:`.scores`)
is backend-neutral Keras.

The contract (:class:`Autodiff`): ``forward(cap, fn)`` runs one forward ``fn(run)`` (``run`` a
:class:`~.graph.GraphRun` recording ``cap.names``) so that :meth:`Autodiff.jacobians` can then give
``S = score(output)`` ``(B, T)`` and, per captured layer ``A`` ``(B, ...)``,

    J[t, b] = d (sum_b' S[b', t]) / d A[b]          (T, B, ...)

which is ``dS[b, t] / dA[b]``: in inference mode image b's scores depend on image b's activations only.
:meth:`Autodiff.value_and_grad` is the plain gradient of a scalar w.r.t. one tensor (activation
maximisation's image parameter, :mod:`.visualize`): TF's tape, ``jax.value_and_grad``,
``torch.autograd.grad``.

* **TensorFlow** — a graph model (a :class:`~.graph.Cut` below the layers): the forward records no
  gradient; the part of the graph below the layers runs again on T tiled copies of the batch,
  ``A~ = [A; A; ...]`` ``(T*B, ...)`` (the outputs it needs from above the cut, recorded in the
  forward, tiled alike), copy t scored on target t only, under a tape watching ``A~``: ONE backward
  of ``sum_t sum_b S_t(A~[t*B + b])`` gives every row (nothing above the layers recomputed; at most
  ``ROWS`` tiled rows per backward). TF's own batched backward, ``tape.jacobian`` with pfor, traces
  a graph on every eager call (about 0.2 s on ResNet50, more than the backward). Other models
  (subclassed, a shared layer above the cut): the forward runs under one persistent tape watching
  only the captured outputs, and ONE vectorised Jacobian (pfor; a ``while_loop`` one if pfor lacks an
  op) gives all T rows.
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
from typing import Any, Optional

import keras
import numpy as np
from keras.src import tree

from ...core.errors import LayerRuntimeError
from .graph import GraphRun, output_names, run_graph
from .scores import target_scores

__all__ = ["Autodiff", "autodiff", "host", "named", "float32", "model_output", "BACKENDS", "ROWS"]

ROWS = 64  # TF: the most tiled rows (T copies x B images) one backward below a cut takes


def float32(t: Any) -> Any:
    """A float16 / bfloat16 tensor cast to float32 (on a tape / in a trace: the gradient flows back
    through the cast); anything else as it is. Mixed-precision models' outputs are scored in float32."""
    dt = getattr(t, "dtype", None)
    if dt is None or not keras.ops.is_tensor(t):
        return t
    return keras.ops.cast(t, "float32") if keras.backend.standardize_dtype(dt) in ("float16", "bfloat16") else t


def model_output(model: Any, x: Any, run: GraphRun) -> Any:
    """The output of ``model`` on ``x`` through its graph (``run``'s layers recorded / replaced), float16 /
    bfloat16 heads cast to float32, list heads named by their output layers."""
    return named(tree.map_structure(float32, run_graph(model, x, run)), output_names(model))


def named(out: Any, names: Optional[list]) -> Any:
    """A list / tuple output as ``{output layer name: tensor}`` (heads named by their layers; positions
    still work); a tensor or dict as it is."""
    if isinstance(out, (list, tuple)) and names is not None and len(names) == len(out):
        return dict(zip(names, out))
    return out

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

    def forward(self, cap: Any, fn: Callable[[GraphRun], Any], key: tuple = (), record: frozenset = frozenset(),
                inputs_of: frozenset = frozenset()) -> tuple[Any, dict, dict]:
        """``fn(run)``'s output, ``run.outputs`` (path -> [output per call]) and ``run.inputs`` for
        ``cap.names`` (set up for :meth:`jacobians` when ``cap.grad``) and the paths ``record`` /
        ``inputs_of`` (their outputs / inputs recorded, nothing else); ``key`` (the input's shape)
        tells forwards of one structure apart."""
        with self.no_grad():
            run = GraphRun(frozenset(cap.names) | record, inputs_of=inputs_of)
            return fn(run), run.outputs, run.inputs

    def jacobians(self, cap: Any, targets: list, names: Sequence[str],
                  check: Callable[[np.ndarray], None]) -> list[np.ndarray]:
        """Per layer of ``names``, ``J`` ``(T, B, ...)`` (module docstring) for the scores of the resolved
        ``targets`` (B lists of T) on the capture's output, ``S`` ``(B, T)``; ``check(S as NumPy)``
        runs before the result is returned."""
        raise NotImplementedError

    def input_jacobian(self, forward: Callable[[Any], Any], xt: Any, targets: list,
                       check: Callable[[np.ndarray], None]) -> tuple[np.ndarray, Any]:
        """``(J (T, B, ...), output)``: the targets' scores' gradients w.r.t. the model input ``xt`` for
        ``output = forward(xt)`` (``check(S, output)``, both concrete, before the backward)."""
        raise NotImplementedError

    def value_and_grad(self, fn: Callable[..., tuple[Any, Any]]) -> Callable[..., tuple]:
        """``step(p, *args) -> (loss, aux, d loss / d p)`` for ``loss, aux = fn(p, *args)`` (``loss`` a scalar
        tensor, ``p`` a tensor, ``args`` tensors not differentiated): the gradient w.r.t. ``p`` only (no
        variable of any model watched, no ``.grad`` written). Activation maximisation's step
        (:mod:`.visualize`)."""
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
        """The capture's tape, for models without a cut (a graph model's forward records nothing)."""
        need = cap.grad and getattr(cap, "cut", None) is None
        tape = self.tf.GradientTape(persistent=True, watch_accessed_variables=False) if need else None
        if tape is not None:
            tape.__enter__()
        cap.grad_state = tape
        try:
            yield
        finally:
            if tape is not None:
                tape.__exit__(None, None, None)
            cap.grad_state = None

    def forward(self, cap: Any, fn: Callable[[GraphRun], Any], key: tuple = (), record: frozenset = frozenset(),
                inputs_of: frozenset = frozenset()) -> tuple[Any, dict, dict]:
        tape, names = cap.grad_state, frozenset(cap.names)
        watch = (lambda path, out: tape.watch(out) if path in names else None) if tape is not None else None
        run = GraphRun(names | record, inputs_of=inputs_of, on_output=watch)
        return fn(run), run.outputs, run.inputs

    def jacobians(self, cap: Any, targets: list, names: Sequence[str],
                  check: Callable[[np.ndarray], None]) -> list[np.ndarray]:
        if getattr(cap, "cut", None) is not None and all(len(v) == 1 for v in cap.kept.values()):
            return self._below_cut(cap, targets, list(names), check)
        tf = self.tf
        if cap.grad_state is not None:  # the forward's tape, still recording
            s = target_scores(targets, cap.tf_output)  # (B, T), recorded on it
            check(s.numpy())
            return self._jacobian(cap.grad_state, s, [cap.tf_acts[n] for n in names])
        # a cut whose recorded outputs do not fit (a shared layer above it): the forward again, taped
        with tf.GradientTape(persistent=True, watch_accessed_variables=False) as tape:
            run = GraphRun(frozenset(names), on_output=lambda path, out: tape.watch(out))
            s = target_scores(targets, model_output(cap.model, cap.model_input, run))
            check(s.numpy())
            return self._jacobian(tape, s, [run.outputs[n][0] for n in names])

    def _jacobian(self, tape: Any, s: Any, sources: list) -> list[np.ndarray]:
        """Per source ``(B, ...)``, ``d (sum_b S[b, t]) / d source`` ``(T, B, ...)`` as NumPy for the recorded
        scores ``s`` ``(B, T)`` (``tape`` recording): one gradient for T = 1, else one vectorised Jacobian
        (pfor; a ``while_loop`` one if pfor lacks an op). Sources the scores do not depend on get zeros."""
        tf = self.tf
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

    def _below_cut(self, cap: Any, targets: list, names: list[str],
                   check: Callable[[np.ndarray], None]) -> list[np.ndarray]:
        """:meth:`jacobians` of a graph model: the part below the layers on tiled copies (module docstring)."""
        tf, cut = self.tf, cap.cut
        B, T = len(targets), len(targets[0])
        per = max(1, min(T, ROWS // max(B, 1)))  # targets per backward
        chunks: list[list[np.ndarray]] = []
        cols: list[np.ndarray] = []
        for t0 in range(0, T, per):
            n = min(per, T - t0)

            def tile(a: Any, n: int = n) -> Any:
                return tf.tile(a, [n] + [1] * (len(a.shape) - 1)) if n > 1 else a

            with tf.GradientTape(watch_accessed_variables=False) as tape:
                replace = {p: tree.map_structure(tile, outs[0]) for p, outs in cap.kept.items()}
                for p in cut.roots:
                    replace[p] = tile(cap.tf_acts[p])
                    tape.watch(replace[p])
                run = GraphRun(frozenset(p for p in names if p not in cut.roots), replace=replace, only=cut)
                x = tile(cap.model_input) if cut.input else cap.model_input
                try:
                    out = model_output(cap.model, x, run)
                except ValueError as err:  # an output the cut did not reach: a graph camlens did not expect
                    raise LayerRuntimeError(f"the Keras graph below layers {names} could not be run on its own "
                                            f"({err})") from err
                sources = [replace[p] if p in cut.roots else run.outputs[p][0] for p in names]
                total = 0.0
                for j in range(n):
                    block = tree.map_structure(lambda o, j=j: o[j * B:(j + 1) * B], out)
                    s = target_scores([[targets[b][t0 + j]] for b in range(B)], block)  # (B, 1)
                    cols.append(s.numpy())
                    total = total + tf.reduce_sum(s)
            gs = tape.gradient(total, sources, unconnected_gradients=tf.UnconnectedGradients.ZERO)
            chunks.append([g.numpy().reshape((n, B) + tuple(g.shape[1:])) for g in gs])
        check(np.concatenate(cols, axis=1))
        return [np.concatenate([c[i] for c in chunks]) if len(chunks) > 1 else chunks[0][i] for i in range(len(names))]

    def input_jacobian(self, forward: Callable[[Any], Any], xt: Any, targets: list,
                       check: Callable[[np.ndarray], None]) -> tuple[np.ndarray, Any]:
        with self.tf.GradientTape(persistent=True, watch_accessed_variables=False) as tape:
            tape.watch(xt)
            out = forward(xt)
            s = target_scores(targets, out)  # (B, T), recorded
            check(s.numpy(), out)
            (g,) = self._jacobian(tape, s, [xt])
        return g, out

    def compiled(self, forward: Callable[[Any], Any]) -> Callable[[Any], Any]:
        """``forward`` (a tensor -> the model's output) as a ``tf.function`` (traced once per input signature)."""
        return self.tf.function(forward, reduce_retracing=True)

    def value_and_grad(self, fn: Callable[..., tuple[Any, Any]]) -> Callable[..., tuple]:
        """A tape watching ``p`` only (``fn`` may call ``tf.function`` s: their graphs are differentiated)."""
        tf = self.tf

        def step(p: Any, *args: Any) -> tuple:
            with tf.GradientTape(watch_accessed_variables=False) as tape:
                tape.watch(p)
                loss, aux = fn(p, *args)
            return loss, aux, tape.gradient(loss, p, unconnected_gradients=tf.UnconnectedGradients.ZERO)

        return step


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

    def forward(self, cap: Any, fn: Callable[[GraphRun], Any], key: tuple = (), record: frozenset = frozenset(),
                inputs_of: frozenset = frozenset()) -> tuple[Any, dict, dict]:
        if not cap.grad:
            return super().forward(cap, fn, key, record, inputs_of)
        jnp = self.jax.numpy
        eps0 = {p: jnp.zeros(s.shape, s.dtype) for p, s in self._probe_shapes(cap, fn, key).items()}

        def f(eps: dict) -> tuple[Any, tuple]:
            run = GraphRun(frozenset(cap.names) | record, inputs_of=inputs_of,
                           on_output=lambda path, out: out + eps[path] if path in eps else None)
            return fn(run), (run.outputs, run.inputs)

        out, vjp, (outs, ins) = self.jax.vjp(f, eps0, has_aux=True)
        cap.grad_state = (vjp, list(eps0))
        return out, outs, ins

    def jacobians(self, cap: Any, targets: list, names: Sequence[str],
                  check: Callable[[np.ndarray], None]) -> list[np.ndarray]:
        jax, jnp = self.jax, self.jax.numpy
        vjp_model, probed = cap.grad_state
        s, vjp_score = jax.vjp(lambda out: target_scores(targets, out), cap.tf_output)  # S (B, T) and its VJP
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

    def input_jacobian(self, forward: Callable[[Any], Any], xt: Any, targets: list,
                       check: Callable[[np.ndarray], None]) -> tuple[np.ndarray, Any]:
        """One ``jax.vjp`` of the forward w.r.t. the input, ``jax.vmap`` of its VJP over the T cotangents."""
        jax, jnp = self.jax, self.jax.numpy
        out, vjp_model = jax.vjp(forward, xt)
        s, vjp_score = jax.vjp(lambda o: target_scores(targets, o), out)
        check(np.asarray(s), out)
        B, T = s.shape
        cot = jnp.broadcast_to(jnp.eye(T, dtype=s.dtype)[:, None, :], (T, B, T))
        g = jax.vmap(lambda c: vjp_model(vjp_score(c)[0])[0])(cot)  # (T, B, ...)
        return np.array(g), out

    def value_and_grad(self, fn: Callable[..., tuple[Any, Any]]) -> Callable[..., tuple]:
        """``jax.value_and_grad`` w.r.t. the first argument (the model's weights are constants of ``fn``)."""
        vg = self.jax.value_and_grad(fn, argnums=0, has_aux=True)

        def step(p: Any, *args: Any) -> tuple:
            (loss, aux), g = vg(p, *args)
            return loss, aux, g

        return step


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

    def forward(self, cap: Any, fn: Callable[[GraphRun], Any], key: tuple = (), record: frozenset = frozenset(),
                inputs_of: frozenset = frozenset()) -> tuple[Any, dict, dict]:
        if not cap.grad:
            return super().forward(cap, fn, key, record, inputs_of)
        torch = self.torch
        eps: dict[str, list] = {}
        names = frozenset(cap.names)

        def probe(path: str, out: Any) -> Any:
            if path not in names or not isinstance(out, torch.Tensor) or not out.is_floating_point():
                return None
            torch.set_grad_enabled(True)  # the graph starts at the first captured layer
            e = torch.zeros_like(out, requires_grad=True)
            eps.setdefault(path, []).append(e)
            return out + e

        was = torch.is_grad_enabled()
        torch.set_grad_enabled(False)
        try:
            run = GraphRun(names | record, inputs_of=inputs_of, on_output=probe)
            out = fn(run)
        finally:
            torch.set_grad_enabled(was)
        cap.grad_state = {p: e[0] for p, e in eps.items() if len(e) == 1}
        return out, run.outputs, run.inputs

    def jacobians(self, cap: Any, targets: list, names: Sequence[str],
                  check: Callable[[np.ndarray], None]) -> list[np.ndarray]:
        torch = self.torch
        with torch.enable_grad():
            s = target_scores(targets, cap.tf_output)  # (B, T), on the recorded graph
        check(self.to_numpy(s))
        return self._grads(s, [cap.grad_state[n] for n in names])

    def _grads(self, s: Any, eps: list) -> list[np.ndarray]:
        """``d (sum_b S[b, t]) / d e`` ``(T, ...)`` per leaf ``e`` for the recorded scores ``s`` ``(B, T)``:
        one batched backward (``is_grads_batched``; a loop over T if a kernel lacks a batching rule)."""
        torch = self.torch
        T = int(s.shape[1])
        total = s.sum(0)  # (T,)
        if not total.requires_grad:  # no score depends on the leaves
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

    def input_jacobian(self, forward: Callable[[Any], Any], xt: Any, targets: list,
                       check: Callable[[np.ndarray], None]) -> tuple[np.ndarray, Any]:
        torch = self.torch
        x = xt.detach().requires_grad_(True)
        with torch.enable_grad():
            out = forward(x)
            s = target_scores(targets, out)
        check(self.to_numpy(s), out)
        (g,) = self._grads(s, [x])
        return g, out

    def value_and_grad(self, fn: Callable[..., tuple[Any, Any]]) -> Callable[..., tuple]:
        """``torch.autograd.grad`` w.r.t. a leaf copy of ``p`` (never ``.backward()``: no ``.grad`` written)."""
        torch = self.torch

        def step(p: Any, *args: Any) -> tuple:
            leaf = p.detach().requires_grad_(True)
            with torch.enable_grad():
                loss, aux = fn(leaf, *args)
                (g,) = torch.autograd.grad(loss, [leaf], allow_unused=True)
            g = torch.zeros_like(leaf) if g is None else g
            return loss.detach(), tree.map_structure(lambda t: t.detach() if isinstance(t, torch.Tensor) else t,
                                                     aux), g

        return step


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
    """NumPy copies of an output structure's tensors (float16 / bfloat16 ones as float32)."""
    ad = autodiff()
    return tree.map_structure(lambda t: ad.to_numpy(float32(t)), out)

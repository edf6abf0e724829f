"""Keras 3 backend (on TensorFlow, JAX or PyTorch: :mod:`.autodiff`): every map method of the registry
(the Grad-CAM family, Eigen-CAM, Score-CAM, Ablation-CAM, occlusion, CAM, guided backprop (TensorFlow),
Guided Grad-CAM, D-RISE / RISE, the baselines; not the attention methods) on Functional and
Sequential models (nested ones included) and subclassed models, without torch.

* layers by path: a layer's name, prefixed by the nested models it sits in, joined by ``/``
  (``"resnet50/conv5_block3_out"``; a bare name unique across the nesting works too);
* inputs: NHWC images ``(B, H, W, C)`` as Keras takes them (NumPy or TF); maps ``(B, T, H, W)``;
* one forward through the model's own graph (no side model, no clone, no edit; a subclassed
  model's layers read by wrapping their ``call`` for the block, :mod:`.eager`); every layer call
  ``training=False``; a final softmax / sigmoid is left out of the computation (not the model),
  so the scores are logits;
* all T targets' gradients at once (TF graph models: the part below the layers on T tiled copies,
  one backward; subclassed: one vectorised Jacobian under one ``tf.GradientTape``; JAX: ``jax.vmap``
  of the forward's VJP; torch: ``autograd.grad(..., is_grads_batched=True)``); input gradients
  likewise, with Keras' ReLUs guided for guided backprop on TensorFlow (:mod:`.guided`);
* CAM's linear head: the kernel of the ``Dense`` fed by ``GAP(layer)``, found on the forward;
* the engine gets NumPy arrays (``NumpyOps``), converted once per pass.

See :mod:`camlens.backends.keras.backend` and :mod:`camlens.backends.keras.graph`.
"""

from __future__ import annotations

from .backend import BACKEND, KerasBackend, channels_last
from .graph import SEP, layer_index

__all__ = ["BACKEND", "KerasBackend", "SEP", "layer_index", "channels_last"]

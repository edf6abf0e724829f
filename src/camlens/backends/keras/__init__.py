"""Keras 3 backend (on TensorFlow, JAX or PyTorch: :mod:`.autodiff`): the Grad-CAM family, Eigen-CAM, Score-CAM, Ablation-CAM and occlusion
on Functional and Sequential models (nested ones included) and subclassed models, without torch.

* layers by path: a layer's name, prefixed by the nested models it sits in, joined by ``/``
  (``"resnet50/conv5_block3_out"``; a bare name unique across the nesting works too);
* inputs: NHWC images ``(B, H, W, C)`` as Keras takes them (NumPy or TF); maps ``(B, T, H, W)``;
* one forward through the model's own graph (no side model, no clone, no edit; a subclassed
  model's layers read by wrapping their ``call`` for the block, :mod:`.eager`); every layer call
  ``training=False``; a final softmax / sigmoid is left out of the computation (not the model),
  so the scores are logits;
* all T targets' gradients from one vectorised Jacobian (TF: one ``tf.GradientTape``; JAX: ``jax.vmap``
  of the forward's VJP; torch: ``autograd.grad(..., is_grads_batched=True)``);
* the engine gets NumPy arrays (``NumpyOps``), converted once per pass.

See :mod:`camlens.backends.keras.backend` and :mod:`camlens.backends.keras.graph`.
"""

from __future__ import annotations

from .backend import BACKEND, KerasBackend, channels_last
from .graph import SEP, layer_index

__all__ = ["BACKEND", "KerasBackend", "SEP", "layer_index", "channels_last"]

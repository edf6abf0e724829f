"""What a call does with torch inputs and modes: input checks (type, float, inference tensors),
uint8 image tensors for a loaded model, the model's device and dtype, inference mode off, and the
clear error for a model made under ``torch.inference_mode()``."""

from __future__ import annotations

import contextlib
from typing import Any

import torch
from torch import Tensor, nn

from ...core.errors import InputTypeError, ModelRuntimeError
from .layout import model_device
from .state import first_parameter

__all__ = ["images_from_uint8", "check_input_tensor", "to_model_input", "call_context", "check_model_tensors"]


def images_from_uint8(inputs: Any) -> Any:
    """uint8 ``(B, 3, H, W)`` / ``(3, H, W)`` tensors -> a list of ``(H, W, 3)`` uint8 arrays (a loaded
    model preprocesses those like images); anything else unchanged."""
    if isinstance(inputs, Tensor) and inputs.dtype == torch.uint8 and inputs.ndim in (3, 4) and inputs.shape[-3] == 3:
        return list(inputs.reshape(-1, *inputs.shape[-3:]).permute(0, 2, 3, 1).cpu().numpy())
    return inputs


def check_input_tensor(inputs: Any) -> Tensor:
    """The input of a plain ``nn.Module``: a float tensor; an inference tensor is cloned (a normal
    copy can record gradients)."""
    if not isinstance(inputs, Tensor):
        raise InputTypeError(f"inputs must be a tensor (B, 3, H, W) for a plain nn.Module, got {type(inputs).__name__}; "
                             "preprocess images first, or pass a camlens.models.load(...) object as the model")
    if not inputs.is_floating_point():
        kind = "a uint8 image tensor" if inputs.dtype == torch.uint8 else f"a {inputs.dtype} tensor"
        raise InputTypeError(f"inputs is {kind}, but models take float inputs: convert to float and normalise as the "
                             "model expects (e.g. x.float() / 255, then the model's mean/std), or pass a "
                             "camlens.models.load(...) object as the model, which preprocesses uint8 images")
    if inputs.is_inference():
        inputs = inputs.clone()
    return inputs


def to_model_input(net: nn.Module, x: Tensor, precision: str) -> Tensor:
    """Inputs on the model's device, in the dtype of its floating-point parameters (e.g. float64
    images for a float32 model, float32 for a ``.half()`` one). Under fp16/bf16 autocast the
    input is left to autocast (float64 becomes float32)."""
    first = first_parameter(net)
    dev = first.device if first is not None else model_device(net)
    dtype = first.dtype if first is not None and first.is_floating_point() else \
        next((p.dtype for p in net.parameters() if p.is_floating_point()), None)
    if dtype is None or x.dtype == dtype:
        return x if x.device == dev else x.to(dev)
    if precision == "fp32":
        return x.to(dev, dtype)
    return x.to(dev, torch.float32) if x.dtype == torch.float64 else x.to(dev)


def call_context() -> contextlib.AbstractContextManager:
    """Inference mode off for the call: under ``torch.inference_mode()`` no graph can be recorded,
    so gradient methods would fail (inference tensors among the inputs are cloned)."""
    return torch.inference_mode(False) if torch.is_inference_mode_enabled() else contextlib.nullcontext()


def check_model_tensors(net: nn.Module) -> None:
    """A model whose weights were made under ``torch.inference_mode()`` cannot be differentiated."""
    for name, t in [*net.named_parameters(), *net.named_buffers()]:
        if t.is_inference():
            raise ModelRuntimeError(f"the model's tensor {name!r} is an inference tensor (the model was created or "
                                    "loaded under torch.inference_mode()), so no gradients can flow through it; "
                                    "create / load the model outside inference mode, or clone its state: "
                                    "model.load_state_dict({k: v.clone() for k, v in model.state_dict().items()})")

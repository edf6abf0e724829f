"""The child of tests/test_keras_other_backends.py: run under one Keras backend (``KERAS_BACKEND`` set
by the parent before ``keras`` is imported), it builds the same small models with weights drawn from
a NumPy seed (``set_weights``), explains them, and writes every map and score to
``OUT/<key>.npy`` plus ``OUT/checks.json`` (what the parent asserts: the backend Keras ran on, the
camlens backend chosen, the model left untouched, the frameworks imported).

    KERAS_BACKEND=jax python tests/keras_backends_child.py OUT

:data:`PLAN` (importable without Keras) names every explanation: ``(key, model, kwargs)``.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

#: (key, model, explain kwargs): the explanations every backend writes.
PLAN: list[tuple[str, str, dict]] = [
    *[(f"functional_{m}", "functional", {"method": m, "targets": [0, 3], "layer": "c2"})
      for m in ("gradcam", "gradcampp", "layercam", "xgradcam", "eigengradcam", "scorecam", "ablationcam")],
    ("functional_occlusion", "functional", {"method": "occlusion", "targets": [0, 3], "layer": "c2", "patch": 6,
                                            "stride": 3}),
    ("functional_two_layers", "functional", {"method": "gradcam", "targets": [1, 2], "layer": ["c1", "c2"]}),
    ("functional_one_target", "functional", {"method": "gradcam", "targets": 2, "layer": "c2", "relu": False}),
    ("functional_callable", "functional", {"method": "gradcam", "targets": "callable", "layer": "c2"}),
    ("functional_combine_mean", "functional", {"method": "gradcampp", "targets": [0, 1, 3], "layer": "c2",
                                               "combine": "mean"}),
    ("functional_per_image", "functional", {"method": "layercam", "targets": [[0, 1], [3, 2]], "layer": "c1"}),
    ("functional_default_layer", "functional", {"method": "gradcam", "targets": [0, 3]}),
    ("sequential_gradcam", "sequential", {"method": "gradcam", "targets": [0, 3], "layer": "c2", "relu": False}),
    ("sequential_scorecam", "sequential", {"method": "scorecam", "targets": [1], "layer": "c2"}),
    ("nested_gradcam", "nested", {"method": "gradcam", "targets": [1, 3], "layer": "backbone/c1"}),
    ("nested_layercam", "nested", {"method": "layercam", "targets": [0, 2], "layer": "backbone/c2"}),
    ("heads_gradcam", "heads", {"method": "gradcam", "targets": ["shape:1", "colour:2", "colour:0"], "layer": "c1",
                                "relu": False}),
    ("heads_callable", "heads", {"method": "gradcam", "targets": "callable_heads", "layer": "c1", "relu": False}),
    ("heads_occlusion", "heads", {"method": "occlusion", "targets": ["shape:0", "colour:3"], "layer": "c1",
                                  "patch": 6, "stride": 3}),
    ("subclassed_gradcam", "subclassed", {"method": "gradcam", "targets": [0, 3], "layer": "block/conv"}),
    ("functional_cam", "functional", {"method": "cam", "targets": [0, 3], "layer": "c2"}),
    ("nested_cam", "nested", {"method": "cam", "targets": [1, 2], "layer": "head_conv"}),
    ("functional_input_gradient", "functional", {"method": "child_input_gradient", "targets": [0, 3]}),
    ("heads_input_gradient", "heads", {"method": "child_input_gradient", "targets": ["shape:1", "colour:2"]}),
]

SIZE = 20  # images (2, SIZE, SIZE, 3)


def _models(keras: Any, np: Any) -> dict:
    """The models of :data:`PLAN`, each with weights from ``np.random.default_rng(seed)``."""
    L = keras.layers

    def trunk(inp: Any, prefix: str = "") -> Any:
        x = L.Conv2D(6, 3, name=prefix + "c1")(inp)
        x = L.BatchNormalization(epsilon=1e-3, name=prefix + "bn")(x)
        x = L.Activation("relu", name=prefix + "r1")(x)
        return L.Conv2D(5, 3, strides=2, activation="relu", name=prefix + "c2")(x)

    inp = keras.Input((SIZE, SIZE, 3))
    functional = keras.Model(inp, L.Dense(4, activation="softmax", name="fc")(L.GlobalAveragePooling2D()(trunk(inp))))
    sequential = keras.Sequential([keras.Input((SIZE, SIZE, 3)), L.Conv2D(6, 3, name="c1"),
                                   L.BatchNormalization(epsilon=1e-3, name="bn"), L.Activation("relu"),
                                   L.Conv2D(5, 3, strides=2, activation="relu", name="c2"), L.Flatten(),
                                   L.Dense(4, name="fc")])
    i = keras.Input((SIZE, SIZE, 3))
    backbone = keras.Model(i, trunk(i), name="backbone")
    o = keras.Input((SIZE, SIZE, 3))
    z = L.Conv2D(4, 1, activation="relu", name="head_conv")(backbone(o))
    nested = keras.Model(o, L.Dense(4, name="fc")(L.GlobalAveragePooling2D()(z)), name="outer")
    h_in = keras.Input((SIZE, SIZE, 3))
    p = L.GlobalAveragePooling2D()(trunk(h_in))
    heads = keras.Model(h_in, {"shape": L.Dense(3, name="shape")(p),
                               "colour": L.Dense(4, activation="softmax", name="colour")(p)})

    class Block(keras.layers.Layer):
        def __init__(self, **kw: Any) -> None:
            super().__init__(**kw)
            self.conv = L.Conv2D(6, 3, name="conv")
            self.bn = L.BatchNormalization(epsilon=1e-3, name="bn")

        def call(self, x: Any, training: Any = None) -> Any:
            return keras.ops.relu(self.bn(self.conv(x), training=training))

    class Net(keras.Model):
        def __init__(self) -> None:
            super().__init__(name="net")
            self.block = Block(name="block")
            self.gap = L.GlobalAveragePooling2D(name="gap")
            self.fc = L.Dense(4, activation="softmax", name="fc")

        def call(self, x: Any, training: Any = None) -> Any:
            return self.fc(self.gap(self.block(x, training=training)))

    subclassed = Net()
    subclassed(np.zeros((1, SIZE, SIZE, 3), np.float32))
    models = {"functional": functional, "sequential": sequential, "nested": nested, "heads": heads,
              "subclassed": subclassed}
    for seed, m in enumerate(models.values()):
        rng = np.random.default_rng(10 + seed)
        ws = []
        for v in m.weights:  # BatchNorm: gamma, moving variance > 0; every other weight ~ N(0, 0.3)
            name = v.path.rsplit("/", 1)[-1]
            shape = tuple(v.shape)
            ws.append(rng.uniform(0.5, 1.5, shape) if name in ("gamma", "moving_variance")
                      else rng.normal(0, 0.3, shape))
        m.set_weights([w.astype("float32") for w in ws])
    functional.get_layer("c1").trainable = False  # a mix of trainable flags, which must stay as they are
    return models


def _state(keras: Any, m: Any) -> Any:
    """Everything that must not change: weights (BatchNorm statistics), trainable flags, every layer's
    attributes (no wrapper left), and on torch the variables' ``requires_grad`` and ``.grad``."""
    torch_side = []
    if keras.backend.backend() == "torch":
        torch_side = [(v.path, bool(v.value.requires_grad), v.value.grad is None) for v in m.variables]
    return ([w.tolist() for w in m.get_weights()], [(v.path, bool(v.trainable)) for v in m.variables],
            [(layer.name, bool(layer.trainable), sorted(vars(layer))) for layer in m._flatten_layers()], torch_side)


def _register_input_gradient() -> None:
    """``child_input_gradient``: the runner's plain input gradients ``(B, T, C, H, W)`` summed over C, as
    the map (the registry has no plain-gradient method; guided backprop is TensorFlow-only)."""
    from camlens.methods.base import Method, MethodOutput, register
    from camlens.methods.guided import channel_saliency

    class InputGradient(Method):
        def compute(self, ctx: Any) -> Any:
            g, _ = ctx.runner.input_gradients(ctx.inputs, ctx.score_all, guided=False)
            return MethodOutput(saliency=channel_saliency(g), pixel=g)

    register(InputGradient(name="child_input_gradient", description="d S / d x", cost="1 forward + 1 backward",
                           needs_grads=False, needs_layer=False))


def main(out: Path) -> None:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    import numpy as np
    import keras

    import camlens

    _register_input_gradient()
    from camlens.backends.base import get_backend
    from camlens.core.errors import TargetError

    models = _models(keras, np)
    x = np.random.default_rng(3).random((2, SIZE, SIZE, 3), dtype=np.float32)
    before = {k: _state(keras, m) for k, m in models.items()}
    targets = {"callable": lambda o: o[:, 1] - 0.5 * o[:, 2],
               "callable_heads": lambda o: o["shape"][:, 0] + o["colour"][:, 1]}
    layers = {}
    for key, model, kw in PLAN:
        kw = dict(kw)
        if isinstance(kw["targets"], str) and kw["targets"] in targets:
            kw["targets"] = targets[kw["targets"]]
        if kw["method"] in ("scorecam", "ablationcam", "occlusion"):
            kw["batch_size"] = 16
        e = camlens.explain(models[model], x, **kw)
        np.save(out / f"{key}.npy", np.asarray(e.maps))
        np.save(out / f"{key}.scores.npy", np.asarray(e.scores))
        layers[key] = list(e.layers)
    errors = []
    for bad in (9, lambda o: o[:, :2]):  # fails after the forward, inside the capture
        try:
            camlens.explain(models["functional"], x, targets=bad, layer="c2")
        except TargetError as err:
            errors.append(type(err).__name__)
    inference_mode_same = None
    if keras.backend.backend() == "torch":  # explain inside torch.inference_mode(), as on torch models
        import torch

        with torch.inference_mode():
            e = camlens.explain(models["functional"], x, **dict(PLAN[0][2]))
        inference_mode_same = bool(np.array_equal(np.asarray(e.maps), np.load(out / f"{PLAN[0][0]}.npy")))
    after = {k: _state(keras, m) for k, m in models.items()}
    checks = {"keras_backend": keras.backend.backend(),
              "camlens_backends": sorted({get_backend(m).name for m in models.values()}),
              "untouched": {k: before[k] == after[k] for k in models},
              "errors": errors, "layers": layers, "inference_mode_same": inference_mode_same,
              "imported": sorted(k for k in ("tensorflow", "jax", "torch") if k in sys.modules)}
    (out / "checks.json").write_text(json.dumps(checks))


if __name__ == "__main__":
    main(Path(sys.argv[1]))

"""Convert the shipped PyTorch weights of ``shapes-2head`` (``src/camlens/data/shapes_2head.pt``) into the
Keras twin's ``src/camlens/data/shapes_2head.weights.h5`` (:mod:`camlens.models.keras_shapes`), and check
that both give the same logits on held-out images (max abs difference printed; fails above 1e-4).

    python scripts/convert_shapes_keras.py [--out PATH]

Convolutions ``(out, in, kh, kw)`` -> ``(kh, kw, in, out)``; BatchNorm weight / bias / running mean /
running variance -> gamma / beta / moving mean / moving variance; Linear ``(K, C)`` -> Dense ``(C, K)``.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np  # noqa: E402
import torch  # noqa: E402

import camlens  # noqa: E402
from camlens.datasets.shapes import make_shapes  # noqa: E402
from camlens.models import keras_shapes  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=ROOT / "src" / "camlens" / "data" / keras_shapes.WEIGHTS)
    args = ap.parse_args()
    net = camlens.models.load("shapes-2head").model.eval()
    km = keras_shapes.build_shapes()
    features = km.get_layer("features")
    for i, block in enumerate(net.features):
        conv, bn = block[0], block[1]
        features.get_layer(f"block{i}_conv").set_weights([conv.weight.detach().permute(2, 3, 1, 0).numpy()])
        features.get_layer(f"block{i}_bn").set_weights([t.detach().numpy() for t in
                                                         (bn.weight, bn.bias, bn.running_mean, bn.running_var)])
    for head in ("shape", "colour"):
        lin = getattr(net, f"{head}_head")
        km.get_layer(head).set_weights([lin.weight.detach().T.numpy(), lin.bias.detach().numpy()])
    x = make_shapes(64, seed=4242).images  # (N, 3, 64, 64)
    x = x if isinstance(x, torch.Tensor) else torch.from_numpy(np.asarray(x))
    with torch.no_grad():
        want = net(x)
    got = km(x.permute(0, 2, 3, 1).numpy(), training=False)
    diff = max(float(np.abs(np.asarray(got[h]) - want[h].numpy()).max()) for h in ("shape", "colour"))
    print(f"max abs logit difference PyTorch vs Keras on 64 held-out images: {diff:.2e}")
    if diff > 1e-4:
        raise SystemExit("the Keras twin does not reproduce the PyTorch model")
    km.save_weights(str(args.out))
    print(f"wrote {args.out} ({args.out.stat().st_size / 1024:.0f} KiB)")


if __name__ == "__main__":
    main()

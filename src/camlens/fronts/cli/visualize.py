"""``camlens visualize``: activation maximisation, the image a class, a channel or a neuron wants."""

from __future__ import annotations

import json
from pathlib import Path
from typing import List, Optional

import typer
from rich.markup import escape

from camlens.fronts.cli.base import command, console
from camlens.fronts.cli.common import _device_option, _flag, _load_model, _model_option, _weights_option


@command()
def visualize(
    cls: Optional[List[str]] = typer.Option(None, "--class", "-c",
                                            help="a class to visualise: name (espresso), index or head:class; repeatable"),
    channel: Optional[List[str]] = typer.Option(None, "--channel",
                                                help="a channel to visualise, LAYER:CHANNEL (e.g. blocks.5:12; Keras: a layer path, "
                                                     "features/block4_relu:3); repeatable"),
    model: str = _model_option(),
    weights: Optional[Path] = _weights_option(),
    param: str = typer.Option("fourier", "--param", help="fourier (decorrelated colour, 1/f spectrum) or pixels (DeepVis)"),
    steps: int = typer.Option(128, "--steps", help="optimisation steps"),
    size: Optional[int] = typer.Option(None, "--size", help="image side in pixels (default: the model's input size)"),
    lr: Optional[float] = typer.Option(None, "--lr", help="Adam step size (default 0.05 fourier, 0.01 pixels)"),
    seed: int = typer.Option(0, "--seed", help="seed of the initial images and the transforms"),
    robust: bool = _flag(True, "--transforms/--no-transforms",
                         "transformation robustness: pad 12, jitter 8, scale 0.9-1.1, rotate 10 degrees"),
    out: Path = typer.Option(Path("camlens_visualize"), "--out", "-o", help="output folder"),
    device: Optional[str] = _device_option(),
) -> None:
    """Optimise one image per --class / --channel (all in one batch) and write them to --out
    (PyTorch and Keras models, any --model form).

    Writes NN_LABEL.png per objective, row.png (all side by side) and summary.json (each
    objective's final value and, for classes, the model's probability of that class on the image).
    """
    import numpy as np

    import camlens
    from camlens.fronts.report import safe_name
    from camlens.viz import save_png

    objectives: list = list(cls or []) + [_channel(c) for c in (channel or [])]
    if not objectives:
        objectives = ["espresso"]
    if param not in ("fourier", "pixels"):
        raise typer.BadParameter(f"--param is fourier or pixels, got {param!r}")
    if steps < 0:
        raise typer.BadParameter(f"--steps must be >= 0, got {steps}")
    m = _load_model(model, weights, device)
    with console.status(f"optimising {len(objectives)} image(s), {steps} steps"):
        vis = camlens.visualize(m, objectives, param=param, steps=steps, size=size, lr=lr, seed=seed,
                                transforms="default" if robust else None)
    probs = _class_probs(m, vis, len(cls or []))
    out.mkdir(parents=True, exist_ok=True)
    entries = []
    for i, label in enumerate(vis.labels):
        name = f"{i:02d}_{safe_name(label)}.png"
        save_png(out / name, vis.images[i])
        rec = {"objective": label, "value": round(float(vis.values[i]), 5), "file": name}
        if i < len(probs):
            rec["prob"] = round(probs[i], 5)
        entries.append(rec)
        extra = f", p = {probs[i]:.3f}" if i < len(probs) else ""
        console.print(f"[green]✓[/] {escape(label)}: value {vis.values[i]:.3f}{extra} → {escape(str(out / name))}",
                      highlight=False)
    save_png(out / "row.png", np.concatenate(list(vis.images), axis=1))
    summary = {"model": m.name, "random_weights": getattr(m, "random_weights", False),
               "options": {k: (list(v) if isinstance(v, tuple) else v) for k, v in vis.options.items()
                           if k != "transforms"},
               "transforms": vis.options.get("transforms"), "objectives": entries, "row": "row.png"}
    (out / "summary.json").write_text(json.dumps(summary, indent=2, default=list))


def _channel(spec: str) -> tuple:
    layer, sep, c = spec.rpartition(":")
    if not sep or not layer or not c.strip().isdigit():
        raise typer.BadParameter(f"--channel is LAYER:CHANNEL (e.g. blocks.5:12), got {spec!r}")
    return (layer.strip(), int(c))


def _class_probs(m: object, vis: object, n: int) -> list[float]:
    """The model's probability of each class objective's class on its image (softmax of the first head)."""
    if n == 0:
        return []
    import camlens

    out = []
    for i in range(n):
        spec = vis.objectives[i].terms[0][2]  # type: ignore[attr-defined]
        exp = camlens.explain(m, [vis.images[i]], targets=[spec])  # type: ignore[attr-defined]
        out.append(float(exp.probs[0, 0]))
    return out

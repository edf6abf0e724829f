"""``camlens evaluate``: methods compared with faithfulness / localisation metrics (a table,
results.csv / .json, curves.png)."""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any, Iterator, List, Mapping, Optional

import typer
from rich.console import Console
from rich.table import Table

from camlens.fronts.cli.base import _fatal, command, console
from camlens.fronts.cli.common import (
    _check_common, _check_image_args, _check_method, _cli_targets, _failed_image, _first_line, _load_model,
    _max_pixels_option, _parse_options, _progress, _readable_images, _stream)


@command()
def evaluate(
    images: Optional[List[Path]] = typer.Argument(None, help="image files or folders (or use --shapes N)"),
    shapes: int = typer.Option(0, "--shapes", help="evaluate on N generated shapes images with their masks "
                                                    "(model shapes-2head, both heads' true classes)"),
    model: str = typer.Option("efficientnet-lite0", "--model", "-m", help="model (ignored with --shapes)"),
    weights: Optional[Path] = typer.Option(None, "--weights"),
    method: Optional[List[str]] = typer.Option(None, "--method", help="methods (default: gradcam, random, center)"),
    metric: Optional[List[str]] = typer.Option(None, "--metric", help="metrics (default: deletion, insertion, "
                                                                       "average_drop; + pointing_game, relevance_mass "
                                                                       "with --shapes)"),
    layer: Optional[List[str]] = typer.Option(None, "--layer", "-l"),
    target: Optional[List[str]] = typer.Option(None, "--target", "-t", help="head:class (default: top class)"),
    batch_size: int = typer.Option(64, "--batch-size"),
    out: Path = typer.Option(Path("camlens_eval"), "--out", "-o", help="folder for results.csv/json, curves.png"),
    device: Optional[str] = typer.Option(None, "--device"),
    max_pixels: int = _max_pixels_option(),
    option: Optional[List[str]] = typer.Option(
        None, "--option", "-O", help="NAME.KEY=VALUE for one of the methods or metrics (repeatable), e.g. "
        "deletion.step=2240 (fewer, coarser deletion steps), scorecam.max_channels=64, road.percentages=[0.2,0.5,0.8]"),
) -> None:
    """Compare methods with faithfulness / localisation metrics: a table (mean ± s.e. over n values:
    one per image and target, direction arrows; percent metrics marked %), results.csv,
    results.json and deletion/insertion curves per method. `random` and `center` are the chance
    baselines. Localisation metrics (pointing_game, relevance_mass, ...) need ground-truth masks:
    the CLI has them only with --shapes N."""
    import camlens
    from camlens.core.errors import ConfigError
    from camlens.fronts.report import write_evaluation

    _check_image_args(images)
    methods = list(method) if method else ["gradcam", "random", "center"]
    metrics = list(metric) if metric else ["deletion", "insertion", "average_drop"] + (
        ["pointing_game", "relevance_mass"] if shapes else [])
    for name in methods:
        _check_method(name)
    for name in metrics:
        try:
            met = camlens.metrics.get_metric(name)
        except ConfigError as err:
            raise typer.BadParameter(_first_line(err)) from None
        needs = {n for need in met.requires for n in need.split("|")} & {"masks", "boxes"}
        if needs and not shapes:
            raise typer.BadParameter(f"metric {name!r} needs ground-truth {' or '.join(sorted(needs))}, which the "
                                     "CLI has only for --shapes N; drop it or use --shapes")
    if shapes < 0 or batch_size < 1:
        raise typer.BadParameter("--shapes must be >= 0 and --batch-size >= 1")
    method_opts, metric_opts = _evaluate_options(option or [], methods, metrics)
    _check_common(device=device, max_pixels=max_pixels)
    items = []  # (name, input or image, targets, masks)
    errors: list = []
    if shapes:
        from camlens.datasets.shapes import make_shapes

        m = _load_model("shapes-2head", None, device)
        data = make_shapes(shapes, seed=2024)
        for b in range(shapes):
            items.append((f"shapes#{b}", data.images[b:b + 1], data.targets()[b], torch_stack_masks(data, b)))
    else:
        if not images:
            raise typer.BadParameter("give image files or --shapes N")
        m = _load_model(model, weights, device)
        for path, img in _readable_images(images, "reading", errors, max_pixels):
            items.append((str(path), img, _cli_targets(target), None))
    values, curves, done = _evaluate_items(m, items, methods, metrics, errors, layer=list(layer) if layer else None,
                                           batch_size=batch_size, method_opts=method_opts, metric_opts=metric_opts)
    if not done:
        _fatal("no image could be evaluated", code=1)
    table_rows = write_evaluation(values, curves, {n: camlens.metrics.get_metric(n) for n in metrics}, out)
    n_values = sum(int(v.size) for v in values[methods[0]][metrics[0]])

    def header(n: str) -> str:
        met = camlens.metrics.get_metric(n)
        return f"{n}{' (%)' if '%' in met.description else ''} {met.arrow}"

    title = (f"{m.name}{' (random weights)' if m.random_weights else ''} · {done} image(s), "
             f"n = {n_values} (image, target) value(s) per cell · mean ± standard error")
    table = Table("method", *[header(n) for n in metrics], title=title)
    for meth in methods:
        table.add_row(meth, *[table_rows[meth][n] for n in metrics])
    Console().print(table)
    console.print(f"wrote {out}/results.csv, results.json, curves.png"
                  + (f"; {len(errors)} file(s) failed" if errors else ""))
    if errors:
        raise typer.Exit(code=1)


def _evaluate_items(m: Any, items: List[tuple], methods: List[str], metrics: List[str], errors: list, *,
                    layer: Optional[List[str]], batch_size: int, method_opts: dict, metric_opts: dict) -> tuple:
    """Every method on every item ``(name, input, targets, masks)``: one :func:`_stream` per method
    (per run of items with the same targets: a stream takes one set of targets for all its inputs),
    each explanation scored by :func:`camlens.evaluate` (``batch_size`` inputs per metric forward).
    An item that a method cannot explain or evaluate is a per-file error (the rule of
    :mod:`camlens.fronts.cli.common`) and is left out for every method, so every method is scored on
    the same items.

    Returns ``(values, curves, done)``: ``{method: {metric: [per-item values]}}``, ``{method:
    {metric: [per-item curves]}}`` (items in input order) and how many items were scored."""
    import camlens

    scored: List[dict] = [{} for _ in items]  # per item: {method: (values by metric, curves by metric)}
    failed: set = set()
    runs = [list(run) for _, run in itertools.groupby(range(len(items)), key=lambda i: items[i][2])]
    with _progress() as progress:
        task = progress.add_task("evaluating", total=len(items) * len(methods))

        def inputs(run: List[int], meth: str) -> Iterator[tuple]:
            for i in run:
                if i not in failed:
                    progress.update(task, description=f"{Path(items[i][0]).name} · {meth}")
                    yield i, items[i][1]

        for meth in methods:
            for run in runs:
                for res in _stream(m, inputs(run, meth), targets=items[run[0]][2], layer=layer, method=meth,
                                   **method_opts.get(meth, {})):
                    i = res.source
                    name = Path(items[i][0])
                    if isinstance(res, camlens.Failure):
                        _failed_image(errors, name, res.error, m, crop=None)  # evaluate has no --crop
                        failed.add(i)
                        continue
                    try:
                        sc = camlens.evaluate(m, res.inputs, res, metrics=metrics, masks=items[i][3],
                                              batch_size=batch_size, options=metric_opts)
                    except Exception as err:  # noqa: BLE001 - classified by _failed_image (it re-raises the others)
                        _failed_image(errors, name, err, step=f"{meth}: evaluation")
                        failed.add(i)
                        continue
                    scored[i][meth] = ({met: _host(sc[met]).reshape(-1) for met in metrics},  # (any backend's arrays)
                                       {met: _host(c).reshape(-1, c.shape[-1]) for met, c in sc.curves.items()})
                    progress.advance(task)
    done = [s for i, s in enumerate(scored) if i not in failed]
    values = {meth: {met: [s[meth][0][met] for s in done] for met in metrics} for meth in methods}
    curves: dict = {meth: {} for meth in methods}
    for s in done:
        for meth in methods:
            for met, c in s[meth][1].items():
                curves[meth].setdefault(met, []).append(c)
    return values, curves, len(done)


def _evaluate_options(items: List[str], methods: List[str], metrics: List[str]) -> tuple:
    """``evaluate --option NAME.KEY=VALUE``: ``({method as given: options}, {metric: options})``,
    each option checked against its method's or metric's typed option spec before any work (the
    rule explain and evaluate apply: :func:`camlens.registry.check_options`)."""
    import camlens

    meths = {n: camlens.methods.get_method(n) for n in methods}
    mets = {n: camlens.metrics.get_metric(n) for n in metrics}
    method_opts: dict = {}
    metric_opts: dict = {}
    for full, value in _parse_options(items).items():
        owner, dot, key = full.partition(".")
        if not dot or not key:
            raise typer.BadParameter(f"evaluate --option takes NAME.KEY=VALUE (NAME a method or metric), got {full!r}")
        met = next((x for n, x in mets.items() if owner in (n, x.name)), None)
        given = [n for n, x in meths.items() if owner in (n, x.name)]
        if met is not None:
            _check_option("metric", met.name, met.defaults, key, value)
            metric_opts.setdefault(met.name, {})[key] = value
        elif given:
            meth = meths[given[0]]
            _check_option("method", meth.name, meth.options, key, value)
            for n in given:
                method_opts.setdefault(n, {})[key] = value
        else:
            raise typer.BadParameter(f"--option {full!r}: {owner!r} is not one of the methods ({', '.join(methods)}) "
                                     f"or metrics ({', '.join(metrics)}) being evaluated")
    return method_opts, metric_opts


def _check_option(kind: str, owner: str, spec: Mapping[str, Any], key: str, value: Any) -> None:
    """``owner``'s option ``key`` exists in its ``spec`` and ``value`` passes its check."""
    from camlens.core.errors import ConfigError
    from camlens.core.registry import check_options

    if key not in spec:
        raise typer.BadParameter(f"{kind} {owner!r} has no option {key!r}; it has: {', '.join(sorted(spec)) or 'none'}")
    try:
        check_options(kind, owner, spec, {key: value})
    except ConfigError as err:
        raise typer.BadParameter(_first_line(err)) from None


def _host(a: Any) -> Any:
    """A NumPy copy of a backend's array (torch tensors, NumPy arrays)."""
    from camlens.backends.base import ops_for

    return ops_for(a).to_numpy(a)


def torch_stack_masks(data: Any, b: int) -> Any:
    """(1, 2, H, W) bool masks of image b's two objects, in head order (shape, colour)."""
    from camlens.backends.base import namespace

    pair = [data.masks["shape"][b], data.masks["colour"][b]]
    return namespace(*pair).stack(pair)[None, ...]

"""``camlens demo``: the default model on scikit-image's cat and coffee photos, and the two-head
shapes model."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from camlens.fronts.cli.base import command, console


@command()
def demo(
    out: Path = typer.Option(Path("demo_out"), "--out", "-o", help="output folder"),
    device: Optional[str] = typer.Option(None, "--device"),
    top_k: int = typer.Option(3, "--top-k", "-k"),
) -> None:
    """Explain scikit-image's cat and coffee photos with the default model (top-3 classes each)."""
    from camlens.fronts.demo import run_demo

    with console.status("running the demo (EfficientNet-Lite0, Grad-CAM)..."):
        summary = run_demo(out, top_k=top_k, device=device)
    for img in summary["images"]:
        t = img["targets"][0]
        console.print(f"{img['image']}: top class {t['label']} p={t['prob']:.2f}, map peak at (y, x) = {t['peak_yx']}")
    sh = summary["shapes"]
    hits = sum(r["shape_peak_on_object"] and r["colour_peak_on_object"] for r in sh["images"])
    console.print(f"two-head shapes model: both heads' peaks on their own object in {hits}/{len(sh['images'])} images")
    console.print(f"[bold]demo outputs in {out.resolve()}/[/]: {summary['grid']} (the grid), per-target overlays, "
                  f".npy maps, summary.json; {sh['composite']} (per-head composite), {sh['report']} (open in a browser)")

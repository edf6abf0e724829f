"""Fronts: what users run — the command line (:mod:`camlens.fronts.cli`) and the HTML report.
They call the public API only (``camlens.explain``, ``camlens.stream``, ``camlens.evaluate``,
``Explanation.save`` / ``camlens.load``)."""

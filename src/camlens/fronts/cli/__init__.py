"""The ``camlens`` command line: ``explain``, ``localize``, ``report``, ``evaluate``, ``filters``, ``visualize``,
``video``, ``demo``, ``serve``, ``methods``, ``metrics``, ``models``.

The app, its console and the one error handler live in :mod:`~camlens.fronts.cli.base`; what the
commands share (options, inputs, checks, the loop on :func:`camlens.stream`, the error rule) in
:mod:`~camlens.fronts.cli.common`; each command in its own module, imported here so it registers.
"""

# each command module registers its command(s) on import; this order is the order of `camlens --help`
from camlens.fronts.cli import explain, localize, report, evaluate, filters, visualize, video, demo, serve, listing  # noqa: F401, I001
from camlens.fronts.cli.base import app, command, main
from camlens.fronts.cli.common import _failed_image, _is_oom  # noqa: F401 - named by docs and tests
from camlens.fronts.cli.evaluate import torch_stack_masks

__all__ = ["app", "command", "main", "torch_stack_masks"]

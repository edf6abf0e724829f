"""The bottom layer: what every other part shares, without an engine or a framework — errors,
the registry (typed options, plug-ins), targets (heads, target specs, scores), the result type
(:class:`~camlens.core.explanation.Explanation` and its file format), map post-processing
(ReLU, upsample, normalise, fuse) and top-k predictions. Array maths goes through
:mod:`camlens.backends.base` (the array-API namespace and ``Ops`` of each array's library)."""

"""Bring your own model: any torch module, tensor-parallel, called from one process (NxD Core's
trace / save / load / weight-separation / autobucketing flow on shardwise's terms).

``builder`` (the user's get_model, by import path), ``plans`` (a plan applied to an unmodified module,
or the layout of hand-built parallel layers), ``weights`` (unsharded checkpoints sliced on load; per-
rank files with a manifest), ``buckets`` (static shapes and the kernel that pads into them),
``worker`` (the per-rank loop) and ``proxy`` (``ParallelModel``, ``launch``, ``load``).
"""

from .buckets import Buckets, default_kernel
from .plans import apply_plan, layout_of
from .proxy import ParallelModel, launch, load

__all__ = ["Buckets", "ParallelModel", "apply_plan", "default_kernel", "launch", "layout_of", "load"]

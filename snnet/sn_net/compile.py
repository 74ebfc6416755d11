"""``torch.compile`` for a stitchable network: one graph per configuration, compiled once, reused.

Dynamo specialises on ``net.stitch_id`` (a Python int read in ``forward``), so each configuration
is its own graph, guarded by the id. Switching back to a configuration already seen reuses its
graph with no recompilation; the only cost is the first visit. Dynamo's default cache holds 8
graphs per frame and then falls back to eager, so the limit is raised to the number of
configurations here: the number of graphs is bounded by ``net.num_configs``, and documented.
"""
from __future__ import annotations

from typing import Any, Callable

import torch
import torch._dynamo

from snnet.sn_net.network import StitchableNetwork


def allow_graphs(count: int) -> None:
    """Let dynamo keep ``count`` graphs of one function (never lowers an existing higher limit)."""
    config = torch._dynamo.config
    config.recompile_limit = max(config.recompile_limit, count)
    config.accumulated_recompile_limit = max(config.accumulated_recompile_limit, count)


def compile_stitchable(net: StitchableNetwork, **compile_kwargs: Any) -> Callable:
    """``torch.compile(net, **compile_kwargs)`` with room for one graph per configuration.

    Call the result after ``net.set_stitch(id)``; ``compile_kwargs`` go to ``torch.compile``
    (``mode``, ``backend``, ``fullgraph``, ...).
    """
    allow_graphs(net.num_configs)
    return torch.compile(net, **compile_kwargs)

"""snnet: stitchable neural networks (SN-Net, SN-Netv2, StitchNet, general model stitching) on Lightning.

The public API, imported lazily so that ``snnet --help`` does not load torch::

    import snnet
    net = snnet.build_network(snnet.NetworkConfig(anchors=["deit_tiny_patch16_224", "deit_small_patch16_224"]))
    net, cfg = snnet.load_network("outputs/quickstart/checkpoints/last.ckpt")
    stitch = snnet.StitchChoice(max_gflops=0.01, results="outputs/quickstart/fit_results.json").resolve(net)
    snnet.export_stitch(net, stitch, "outputs/stitch")

Layout: a flat core (anchors, stitching layers, least squares, CKA, profiling, data, results, front
figures, checkpoint I/O, determinism, optim, errors) and one sub-package per method and role:
``sn_net`` (SN-Net / SN-Netv2), ``stitchnet``, ``general_stitching``, ``deploy``, ``serve``,
``families``, ``models``.
"""
from __future__ import annotations

import importlib
from typing import Any

from snnet import moved

moved.install()

PUBLIC: dict[str, str] = {
    # creating anchors and the stitchable network
    "create_anchor": "snnet.anchors",
    "AnchorSpec": "snnet.anchors",
    "NetworkConfig": "snnet.sn_net.build",
    "build_network": "snnet.sn_net.build",
    "StitchableNetwork": "snnet.sn_net.network",
    # training (LightningModules)
    "SNNetModule": "snnet.sn_net.module",
    "StitchNetModule": "snnet.stitchnet.module",
    "GeneralStitchModule": "snnet.general_stitching.module",
    # results, choosing and deploying a stitch
    "StitchResult": "snnet.results",
    "load_results": "snnet.results",
    "select_stitch": "snnet.results",
    "StitchChoice": "snnet.sn_net.choice",
    "load_network": "snnet.deploy.load",
    "evaluate_stitches": "snnet.deploy.evaluate",
    "export_stitch": "snnet.deploy.export",
    "load_stitch": "snnet.deploy.export",
    # a language model's text, along one stitch
    "generate": "snnet.sn_net.generate",
}
"""Public name -> the module that defines it."""

__all__ = sorted(PUBLIC)


def __getattr__(name: str) -> Any:
    if name in PUBLIC:
        value = getattr(importlib.import_module(PUBLIC[name]), name)
        globals()[name] = value  # import once
        return value
    raise AttributeError(f"module 'snnet' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(PUBLIC))

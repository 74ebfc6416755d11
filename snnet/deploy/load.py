"""The stitchable network back from an ``snnet fit`` (Lightning) checkpoint, without the training state.

Deployment needs the network only: the anchors are rebuilt from the network config saved in the
checkpoint's hyper-parameters with no hub download and no anchor files (``pretrained=False``,
``checkpoints=None``), then every weight comes from the checkpoint (teacher and optimiser ignored).
"""
from __future__ import annotations

import os

from snnet.anchors import expand_path
from snnet.checkpoint_io import CheckpointError, read_checkpoint, state_mismatch
from snnet.sn_net.build import NetworkConfig, build_network
from snnet.sn_net.network import StitchableNetwork

PREFIX = "net."


def network_config_from_checkpoint(checkpoint: dict, path: str | os.PathLike = "checkpoint") -> NetworkConfig:
    section = (checkpoint.get("hyper_parameters") or {}).get("network")
    if not isinstance(section, dict):
        raise CheckpointError(f"checkpoint {path}: no hyper_parameters.network: is it a checkpoint written by `snnet fit` (SNNetModule)?")
    try:
        return NetworkConfig(**section)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"checkpoint {path}: its network config does not build here: {e}") from e


def load_network(path: str | os.PathLike) -> tuple[StitchableNetwork, NetworkConfig]:
    """The trained network (eval mode, CPU) and the network config it was built from."""
    path = expand_path(path)
    checkpoint = read_checkpoint(path)
    config = network_config_from_checkpoint(checkpoint, path)
    net = build_network(config.without_weights())
    state = {k[len(PREFIX):]: v for k, v in checkpoint["state_dict"].items() if k.startswith(PREFIX)}
    if not state:
        raise CheckpointError(f"checkpoint {path}: the state_dict holds no '{PREFIX}*' weights of a stitchable network")
    mismatch = state_mismatch(net.state_dict(), state)
    if mismatch:
        raise CheckpointError(f"checkpoint {path}: its weights do not fit the network of its own config ({mismatch})")
    net.load_state_dict(state, strict=True)
    return net.eval(), config

"""Import paths from before the layout move, kept working (with a FutureWarning) so that checkpoints,
YAML ``class_path`` entries and user code written then still load, as timm does for moved modules.

One table, one mechanism: a meta-path finder answers an old module name with the new module object
itself (private names included, so pickles that recorded them load), and ``moved_attribute`` serves
names that left a module that still exists.
"""
from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import importlib.util
import sys
import warnings
from types import ModuleType
from typing import Any

MOVED_MODULES: dict[str, str] = {
    "snnet.profile": "snnet.profiling",
    "snnet.figures": "snnet.front",
    "snnet.network": "snnet.sn_net.network",
    "snnet.stitch_configs": "snnet.sn_net.stitch_configs",
    "snnet.sampling": "snnet.sn_net.sampling",
    "snnet.batchnorm": "snnet.sn_net.batchnorm",
    "snnet.module": "snnet.sn_net.module",
    "snnet.compile": "snnet.sn_net.compile",
    "snnet.choice": "snnet.sn_net.choice",
    "snnet.fragments": "snnet.stitchnet.fragments",
    "snnet.heads": "snnet.stitchnet.heads",
    "snnet.adapters": "snnet.general_stitching.adapters",
    "snnet.similarity": "snnet.general_stitching.similarity",
    "snnet.general": "snnet.general_stitching.module",
    "snnet.evaluate": "snnet.deploy.evaluate",
    "snnet.latency": "snnet.deploy.latency",
    "snnet.export": "snnet.deploy.export",
    "snnet.checkpoint": "snnet.deploy.load",
}
"""Old module -> new module."""

SPLIT_MODULES: dict[str, tuple[str, ...]] = {
    "snnet.stitchnet": ("snnet.stitchnet.composition", "snnet.stitchnet.search", "snnet.stitchnet.bridges", "snnet.stitchnet.module"),
}
"""An old module that became a package of the same name -> the modules its names went to."""

MOVED_NAMES: dict[tuple[str, str], str] = {
    ("snnet.anchors", "NetworkConfig"): "snnet.sn_net.build",
    ("snnet.anchors", "build_network"): "snnet.sn_net.build",
    ("snnet.checkpoint_io", "AtomicCheckpointIO"): "snnet.checkpoint_write",
}
"""(module, name) -> the module the name moved to."""


def _warn(old: str, new: str, stacklevel: int) -> None:
    warnings.warn(f"{old} moved to {new}; import it from there (the old path will be removed in a future release)",
                  FutureWarning, stacklevel=stacklevel)


class MovedModuleFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Imports an old module name as the module it moved to (the same object under both names)."""

    def find_spec(self, fullname: str, path: Any = None, target: ModuleType | None = None) -> importlib.machinery.ModuleSpec | None:
        if fullname in MOVED_MODULES:
            return importlib.util.spec_from_loader(fullname, self)
        return None

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType:
        _warn(spec.name, MOVED_MODULES[spec.name], stacklevel=3)
        module = importlib.import_module(MOVED_MODULES[spec.name])
        spec.loader_state = module.__spec__  # the import system sets the old name's spec on it next
        return module

    def exec_module(self, module: ModuleType) -> None:
        """The new module has run already: only give it back its own spec."""
        module.__spec__ = module.__spec__.loader_state


def install() -> None:
    """Put the finder first on ``sys.meta_path`` (once): an old name must not find a stale file."""
    if not any(isinstance(f, MovedModuleFinder) for f in sys.meta_path):
        sys.meta_path.insert(0, MovedModuleFinder())


def moved_attribute(module: str, name: str) -> Any:
    """For a module's ``__getattr__``: ``name`` from where it moved, or the usual AttributeError."""
    new = MOVED_NAMES.get((module, name))
    if new is None:
        new = next((m for m in SPLIT_MODULES.get(module, ()) if hasattr(importlib.import_module(m), name)), None)
    if new is None:
        raise AttributeError(f"module {module!r} has no attribute {name!r}")
    _warn(f"{module}.{name}", f"{new}.{name}", stacklevel=4)  # the user's line, past the module's __getattr__
    return getattr(importlib.import_module(new), name)

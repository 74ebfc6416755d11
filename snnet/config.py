"""Config dataclasses, the one way settings are declared (LightningCLI reads their fields)."""
from __future__ import annotations

from typing import Any, TypeVar

T = TypeVar("T")


def as_config(cls: type[T], value: T | dict[str, Any] | None) -> T:
    """``value`` as a ``cls`` instance: config dataclasses may arrive as mappings (YAML, checkpoints'
    hyper-parameters) or as None (every default)."""
    return value if isinstance(value, cls) else cls(**(value or {}))

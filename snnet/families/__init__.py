"""Model families as block views: the base view and registry, the generic splitter, hand adapters."""
from snnet.families import handwritten  # noqa: F401  (registers the hand adapters)
from snnet.families.base import (
    LAYOUTS,
    AnchorView,
    Layout,
    default_input_size,
    register_family,
    registered_adapter,
    supported_families,
)
from snnet.families.generic import (
    ProbeError,
    SplitError,
    anchor_view,
    check_view,
    copy_with_view,
    discover_blocks,
    generic_view,
    infer_layout,
)

__all__ = [
    "LAYOUTS", "AnchorView", "Layout", "ProbeError", "SplitError", "anchor_view", "check_view", "copy_with_view", "default_input_size",
    "discover_blocks", "generic_view", "infer_layout",
    "register_family", "registered_adapter", "supported_families",
]

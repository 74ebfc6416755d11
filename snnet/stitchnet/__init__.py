"""StitchNet, the zero-epoch path: fragments of a pool of pretrained models (``fragments``) composed
by a CKA-guided search (``search``), bridged by least squares (``bridges``), assembled into candidate
networks (``composition``) and run as a LightningModule (``module``); classifier heads fitted in closed
form (``heads``)."""
from typing import Any

from snnet.moved import moved_attribute


def __getattr__(name: str) -> Any:
    """Names of the single module ``snnet.stitchnet`` from before the layout move."""
    return moved_attribute(__name__, name)

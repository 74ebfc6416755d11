"""The evaluation transform of a network's data config, without the datamodules (and Lightning)
behind them: ``snnet serve`` prepares requests with it, ``snnet validate`` its batches."""
from __future__ import annotations

from typing import Any, Callable


def eval_transform(data_config: dict[str, Any]) -> Callable:
    """timm's evaluation transform (resize, center crop at ``crop_pct``, normalize) for ``data_config``
    (``input_size``, ``mean``, ``std``, ``interpolation``, ``crop_pct``)."""
    from timm.data import create_transform

    common = {k: data_config[k] for k in ("input_size", "mean", "std", "interpolation") if k in data_config}
    return create_transform(**common, crop_pct=data_config.get("crop_pct", 1.0), is_training=False)

"""A ``POST /predict`` body checked and turned into model input, in the HTTP process.

Everything that can be wrong with one request is found here, before it joins a batch: a bad
request is answered with its own 4xx and never fails the requests batched with it. Budgets resolve
with :func:`snnet.results.select_stitch`, exactly as ``snnet select`` does.
"""
from __future__ import annotations

import base64
import binascii
import io
import math
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

import numpy as np
from PIL import Image, UnidentifiedImageError

from snnet.results import StitchResult
from snnet.sn_net.choice import StitchChoice
from snnet.sn_net.network import StitchInfo

BUDGETS: tuple[str, ...] = ("max_gflops", "max_params", "max_latency_ms")
FIELDS: tuple[str, ...] = ("image", "stitch", *BUDGETS, "top_k")


class RequestError(Exception):
    """A request the server refuses: HTTP ``status`` and a message naming the value and what is valid."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status, self.message = status, message


@dataclass
class Catalog:
    """What the server knows about each stitch: the network's table and the measured results."""

    infos: Sequence[StitchInfo]
    results: Sequence[StitchResult]  # every row has latency_ms (from the file or measured at start-up)
    num_classes: int
    class_names: Sequence[str] | None = None
    metric: str = "acc1"

    def __post_init__(self) -> None:
        self.by_id = {r.id: r for r in self.results}

    def resolve(self, choice: StitchChoice) -> int | None:
        """The stitch the request asked for (id or budget), or None: the policy decides."""
        if choice.stitch is not None:
            if not 0 <= choice.stitch < len(self.infos):
                raise RequestError(422, f"unknown stitch {choice.stitch}: valid ids are 0..{len(self.infos) - 1}")
            return choice.stitch
        if not choice.has_budget:
            return None
        try:
            return choice.select(list(self.results)).id
        except ValueError as e:  # names the budget and the cheapest stitch
            raise RequestError(422, str(e)) from e

    def describe(self, stitch: int) -> dict[str, Any]:
        info, row = self.infos[stitch], self.by_id.get(stitch)
        return {
            "id": info.id, "name": info.name, "gflops": info.flops / 1e9, "params": info.params, "is_anchor": info.is_anchor,
            self.metric: None if row is None else getattr(row, self.metric),
        }


def read_number(fields: Mapping[str, Any], key: str, kind: type) -> float | int | None:
    value = fields.get(key)
    if value is None or value == "":
        return None
    if isinstance(value, bool):
        raise RequestError(400, f"{key} must be a number, got {value!r}")
    try:
        number = kind(value)
    except (TypeError, ValueError):
        raise RequestError(400, f"{key} must be {'an integer' if kind is int else 'a number'}, got {value!r}") from None
    if kind is int and isinstance(value, float) and not value.is_integer():
        raise RequestError(400, f"{key} must be an integer, got {value!r}")
    if kind is float and not math.isfinite(number):
        raise RequestError(400, f"{key} must be a finite number, got {value!r}")
    return number


def read_choice(fields: Mapping[str, Any], metric: str = "acc1") -> StitchChoice:
    """The stitch or budgets a request gives (strings from a form, numbers from JSON)."""
    unknown = sorted(set(fields) - set(FIELDS))
    if unknown:
        raise RequestError(400, f"unknown fields {unknown}; valid fields: {list(FIELDS)}")
    budgets = {key: read_number(fields, key, float) for key in BUDGETS}
    try:  # budgets checked as `snnet select` checks them; an id and a budget together refused
        return StitchChoice(stitch=read_number(fields, "stitch", int), metric=metric, **budgets)
    except ValueError as e:
        raise RequestError(422, str(e)) from None


def read_top_k(fields: Mapping[str, Any], default: int, num_classes: int) -> int:
    k = read_number(fields, "top_k", int)
    k = default if k is None else k
    if not 1 <= k <= num_classes:
        raise RequestError(422, f"top_k must be in 1..{num_classes} (the number of classes), got {k}")
    return k


def image_bytes(value: Any) -> bytes:
    """The bytes of a JSON ``image`` (base64, optionally a ``data:`` URL) or of a multipart upload."""
    if value is None:
        raise RequestError(400, "no image: send JSON {\"image\": \"<base64 JPEG/PNG>\"} or a multipart field 'image'")
    if isinstance(value, bytes):
        return value
    if not isinstance(value, str):
        raise RequestError(400, f"image must be a base64 string, got {type(value).__name__}")
    if value.startswith("data:"):
        value = value.partition(",")[2]
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError) as e:
        raise RequestError(400, f"image is not valid base64 ({e})") from None


def decode_image(data: bytes, max_pixels: int) -> Image.Image:
    """An RGB image from encoded bytes; its size is checked from the header before decoding."""
    if not data:
        raise RequestError(400, "image is empty (0 bytes)")
    try:
        image = Image.open(io.BytesIO(data))
    except UnidentifiedImageError:
        raise RequestError(400, f"image bytes ({len(data)} bytes) are not a decodable image: no known format (JPEG, PNG, ...)") from None
    except OSError as e:
        raise RequestError(400, f"image bytes ({len(data)} bytes) are not a decodable image: {e}") from None
    width, height = image.size
    if width * height > max_pixels:
        raise RequestError(413, f"image is {width}x{height} = {width * height} pixels; the limit is {max_pixels} pixels")
    try:
        image.load()
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        raise RequestError(400, f"image ({width}x{height}) could not be decoded: {e}") from None
    return image.convert("RGB")


def prepare(
    fields: Mapping[str, Any], catalog: Catalog, transform: Callable[[Image.Image], Any], max_pixels: int, top_k: int,
) -> tuple[np.ndarray, int | None, int]:
    """(model input C x H x W float32 array, the stitch asked for or None, top-k) for one request."""
    choice = read_choice(fields, catalog.metric)
    stitch = catalog.resolve(choice)
    k = read_top_k(fields, top_k, catalog.num_classes)
    image = decode_image(image_bytes(fields.get("image")), max_pixels)
    return transform(image).numpy().astype(np.float32, copy=False), stitch, k

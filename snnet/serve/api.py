"""The server: one stitchable network behind LitServe, every stitch reachable per request.

Two processes (LitServe's layout): the HTTP process checks each request, chooses its stitch (the
request's id or budget, else the policy, at the load the request arrives to) and keeps the
statistics; the inference worker holds the network and runs each dynamic batch once with
:meth:`~snnet.sn_net.network.StitchableNetwork.forward_rows`, every row through the stitch chosen for it.
"""
from __future__ import annotations

import signal
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import litserve as ls
import numpy as np
import torch
from fastapi import Depends, HTTPException, Request
from fastapi.responses import HTMLResponse, JSONResponse
from fastapi.security import APIKeyHeader
from litserve.loops import BatchedLoop
from litserve.server import RegularRequestHandler
from starlette.concurrency import run_in_threadpool

from snnet.serve.page import PAGE
from snnet.serve.policy import Policy
from snnet.serve.request import Catalog, RequestError, prepare
from snnet.serve.stats import ServeStats

_api_key_header = APIKeyHeader(name="X-API-Key", auto_error=False)


IDLE_WAIT_S = 1.0  # how long the idle worker blocks on the request queue before looking again (as LitServe's SingleLoop)


class _FirstThenQueue:
    """A request queue whose first ``get`` returns a request already taken from it."""

    def __init__(self, first: Any, queue: Any) -> None:
        self.first, self.queue = first, queue

    def get(self, block: bool = True, timeout: float | None = None) -> Any:
        if self.first is not None:
            first, self.first = self.first, None
            return first
        return self.queue.get(block=block, timeout=timeout)

    def get_nowait(self) -> Any:
        return self.get(block=False)


class IdleBlockingBatchedLoop(BatchedLoop):
    """LitServe's batched loop, except that an idle worker blocks on the request queue for the
    first request of a batch instead of polling it every millisecond (LitServe's loop asks the
    Manager process for a request every 1 ms while idle: ~12 % of a core in the two processes).
    The batch then fills for ``batch_timeout`` from that first request, as before."""

    def get_batch_requests(self, lit_api: ls.LitAPI, request_queue: Any, transport: Any) -> tuple[list, list]:
        first = self.get_request(request_queue, block=True, timeout=IDLE_WAIT_S)
        if first is None:
            return [], []
        return super().get_batch_requests(lit_api, _FirstThenQueue(first, request_queue), transport)


class StitchAPI(ls.LitAPI):
    """The inference worker: loads the checkpoint and answers batches of (input, stitch, top-k)."""

    def __init__(self, ckpt: str, max_batch_size: int = 16, batch_timeout: float = 0.002, api_key: str | None = None) -> None:
        super().__init__(max_batch_size=max_batch_size, batch_timeout=batch_timeout, api_path="/predict",
                         loop=IdleBlockingBatchedLoop() if max_batch_size > 1 else "auto")  # 1: SingleLoop blocks already
        self.ckpt, self.api_key = ckpt, api_key

    def setup(self, device: str) -> None:
        from snnet.deploy.pretrained import load_trained

        # Ctrl+C reaches the whole process group: the worker keeps answering while the HTTP
        # process drains its in-flight requests, and stops when the main process ends it.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        self.net = load_trained(self.ckpt).net
        self.net.to(device).eval()
        self.torch_device = torch.device(device)

    def authorize(self, x_api_key: str | None = Depends(_api_key_header)) -> None:
        """LitServe's API key: the ``X-API-Key`` header must match ``--api-key`` when one is set."""
        if self.api_key is not None and x_api_key != self.api_key:
            raise HTTPException(401, "Invalid API Key. Check that you are passing a correct 'X-API-Key' in your header.")

    def decode_request(self, request: dict) -> tuple[np.ndarray, int, int]:
        return request["x"], request["stitch"], request["top_k"]

    def batch(self, inputs: list) -> list:
        return inputs

    @torch.inference_mode()
    def predict(self, batch: Any) -> Any:
        single = not isinstance(batch, list)  # max_batch_size 1: LitServe hands over one request
        items = [batch] if single else batch
        start = time.perf_counter()
        x = torch.from_numpy(np.stack([item[0] for item in items])).to(self.torch_device)
        stitches = [item[1] for item in items]
        probs = self.net.forward_rows(x, stitches).float().softmax(-1)
        values, indices = probs.topk(max(item[2] for item in items), dim=-1)
        values, indices = values.cpu().tolist(), indices.cpu().tolist()  # one transfer per batch
        batch_info = {"size": len(items), "stitches": len(set(stitches)), "forward_ms": (time.perf_counter() - start) * 1e3}
        outputs = [
            {"stitch": s, "top": list(zip(indices[r][:k], values[r][:k])), "batch": batch_info}
            for r, (_, s, k) in enumerate(items)
        ]
        return outputs[0] if single else outputs

    def encode_response(self, output: dict) -> dict:
        return output


@dataclass
class ServeState:
    """The HTTP process's view: what each stitch is, how inputs are made, who chooses, what happened."""

    catalog: Catalog
    transform: Callable
    policy: Policy
    stats: ServeStats
    top_k: int = 5
    max_pixels: int = 4096 * 4096
    max_payload_bytes: int | None = None  # LitServe refuses larger bodies; kept here to say the limit
    in_flight: int = 0
    started: float = field(default_factory=time.time)

    def prepare(self, fields: dict) -> tuple[np.ndarray, int | None, int]:
        return prepare(fields, self.catalog, self.transform, self.max_pixels, self.top_k)

    def answer(self, output: dict, chosen_by: str, time_ms: float) -> dict:
        names = self.catalog.class_names
        return {
            "top": [{"class": c, "name": names[c] if names else str(c), "prob": p} for c, p in output["top"]],
            "stitch": self.catalog.describe(output["stitch"]),
            "chosen_by": chosen_by,
            "batch": output["batch"],  # the dynamic batch it ran in: rows, distinct stitches, forward time
            "time_ms": time_ms,
        }

    def stitches(self) -> dict:
        """The table the page plots: every measured stitch, the policy, its current choice."""
        return {
            "metric": self.catalog.metric,
            "stitches": [{**self.catalog.describe(r.id), "latency_ms": r.latency_ms} for r in self.catalog.results],
            "policy": self.policy.describe(),
        }

    def summary(self) -> dict:
        return {**self.stats.summary(), "in_flight": self.in_flight, "uptime_s": round(time.time() - self.started, 1),
                "policy": self.policy.describe()}


def _too_large(limit: int | None) -> RequestError:
    return RequestError(413, f"request body too large: the limit is {limit / 2**20:g} MB ({limit} bytes; snnet serve --max-payload-mb)"
                        if limit else "request body too large")


async def read_fields(request: Request, max_payload_bytes: int | None = None) -> dict:
    """The body's fields: JSON, or a multipart/urlencoded form (the image as an upload)."""
    declared = request.headers.get("content-length", "")
    if max_payload_bytes and declared.isdigit() and int(declared) > max_payload_bytes:
        raise _too_large(max_payload_bytes)
    content_type = request.headers.get("content-type", "")
    try:
        if content_type.startswith(("multipart/form-data", "application/x-www-form-urlencoded")):
            form = await request.form()
            fields = {}
            for key, value in form.multi_items():
                fields[key] = await value.read() if hasattr(value, "read") else value
            return fields
        if not content_type.startswith("application/json"):
            raise RequestError(415, f"content type {content_type or 'none'!r}: send application/json or multipart/form-data")
        body = await request.json()
    except HTTPException as e:  # LitServe's size check while the body streams in
        if e.status_code == 413:
            raise _too_large(max_payload_bytes) from None
        raise
    except ValueError as e:
        raise RequestError(400, f"body is not valid JSON ({e})") from None
    except RecursionError:
        raise RequestError(400, "body is not valid JSON: nested too deeply") from None
    if not isinstance(body, dict):
        raise RequestError(400, f"body must be a JSON object, got {type(body).__name__}")
    return body


class StitchServer(ls.LitServer):
    """LitServer with the request checks and stitch choice in front of the queue, and the page,
    ``/stats`` and ``/stitches`` next to LitServe's ``/health`` and ``/info``."""

    page_html: str | None = PAGE  # GET /: the image page (None: no page)

    def __init__(self, api: StitchAPI, state: ServeState, **kwargs: Any) -> None:
        self.state = state  # read by register_endpoints, which LitServer.__init__ calls
        super().__init__(api, **kwargs)

    def register_endpoints(self) -> None:
        state, auth, html = self.state, [Depends(self.setup_auth())], self.page_html

        async def page() -> HTMLResponse:  # no data in it: the page fetches with the key it is given
            return HTMLResponse(html)

        async def stats() -> JSONResponse:
            return JSONResponse(state.summary())

        async def stitches() -> JSONResponse:
            return JSONResponse(state.stitches())

        if html is not None:
            self.app.add_api_route("/", page, methods=["GET"])  # before LitServe's "/" so it wins
        self.app.add_api_route("/stats", stats, methods=["GET"], dependencies=auth)
        self.app.add_api_route("/stitches", stitches, methods=["GET"], dependencies=auth)
        super().register_endpoints()

    def _register_api_endpoints(self, lit_api: ls.LitAPI, request_type: Any, response_type: Any) -> None:
        handler, state = RegularRequestHandler(lit_api, self), self.state

        async def predict(request: Request) -> JSONResponse:
            start = time.perf_counter()
            state.in_flight += 1
            try:
                fields = await read_fields(request, state.max_payload_bytes)
                x, stitch, top_k = await run_in_threadpool(state.prepare, fields)
                depth, chosen_by = state.in_flight, "request"
                if stitch is None:
                    stitch, chosen_by = state.policy.choose(depth), "policy"
                output = await handler.handle_request({"x": x, "stitch": stitch, "top_k": top_k}, dict)
                time_ms = (time.perf_counter() - start) * 1e3
                state.stats.record(stitch, time_ms)
                state.policy.observe(stitch, depth, time_ms)
                return JSONResponse(state.answer(output, chosen_by, time_ms))
            except RequestError as e:
                state.stats.errors += 1
                return JSONResponse({"detail": e.message}, status_code=e.status)
            finally:
                state.in_flight -= 1

        self.app.add_api_route(lit_api.api_path, predict, methods=["POST"], dependencies=[Depends(self.setup_auth(lit_api))])

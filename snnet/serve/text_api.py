"""The language-model server: text completions from every stitch of one stitchable LM.

``POST /v1/completions`` takes an OpenAI-style completions body (``prompt``, ``max_tokens``,
``temperature``, ``top_p``, ``stream``, ``seed``; ``model`` is accepted and ignored) plus snnet's
choice of path: ``stitch``, a budget (``max_gflops`` per token, ``max_params``, ``max_latency_ms``
per token), or nothing (the policy decides at the load the request arrives to). The answer is an
OpenAI ``text_completion`` with the stitch (name, GFLOPs per token, perplexity), the tokens and
the time per generated token; ``"stream": true`` sends it as server-sent events, a chunk per
piece of text as the tokens are generated, then ``data: [DONE]``.

As for images, the HTTP process checks the request and chooses the stitch; the inference worker
(one LitServe streaming worker, one request at a time) generates with
:func:`snnet.sn_net.generate.stream` and sends every token as it comes. The SLO policy is the
vision server's, on latency per generated token: measured per stitch at start-up, a request's
time per token is its whole time (queue included) over its tokens.
"""
from __future__ import annotations

import dataclasses
import json
import time
import uuid
from dataclasses import dataclass
from typing import Any, AsyncIterator, Sequence

import torch
from fastapi import Depends, Request
from fastapi.responses import JSONResponse, StreamingResponse
from litserve.server import StreamingRequestHandler
from starlette.concurrency import run_in_threadpool

from snnet.families.lm import vocab_size
from snnet.results import StitchResult
from snnet.serve.api import ServeState, StitchAPI, StitchServer, read_fields
from snnet.serve.policy import FixedPolicy, LatencyTable, Policy, SLOPolicy
from snnet.serve.request import BUDGETS, Catalog, RequestError, read_choice, read_number
from snnet.serve.stats import ServeStats
from snnet.sn_net.generate import Sampling, generate, path_context_length, stream
from snnet.sn_net.network import StitchableNetwork
from snnet.text_data import Tokenizer

FIELDS: tuple[str, ...] = ("prompt", "max_tokens", "temperature", "top_p", "top_k", "stream", "seed", "model", "stitch", *BUDGETS)
API_PATH = "/v1/completions"


@dataclass
class Completion:
    """One checked request: prompt token ids, the stitch it asked for (None: the policy), how to sample."""

    ids: list[int]
    stitch: int | None
    max_tokens: int
    sampling: Sampling
    stream: bool = False
    seed: int | None = None

    def payload(self, stitch: int, stop: Sequence[int]) -> dict[str, Any]:
        """What the worker receives (plain values: it crosses a process boundary)."""
        s = self.sampling
        return {"ids": self.ids, "stitch": stitch, "max_tokens": self.max_tokens, "temperature": s.temperature,
                "top_k": s.top_k, "top_p": s.top_p, "seed": self.seed, "stop": list(stop)}


def read_bool(fields: dict, key: str) -> bool:
    value = fields.get(key, False)
    if isinstance(value, bool) or value is None:
        return bool(value)
    if isinstance(value, str) and value.lower() in ("true", "false", "1", "0"):
        return value.lower() in ("true", "1")
    raise RequestError(400, f"{key} must be true or false, got {value!r}")


def read_prompt(fields: dict) -> str:
    prompt = fields.get("prompt")
    if not isinstance(prompt, str):
        raise RequestError(400, f"prompt must be a string of text, got {type(prompt).__name__}" if prompt is not None
                           else "no prompt: send JSON {\"prompt\": \"<text>\"}")
    if not prompt:
        raise RequestError(400, "prompt is empty: send at least one character of text")
    try:
        prompt.encode("utf-8")
    except UnicodeEncodeError as e:  # a lone surrogate escaped in the JSON (\ud800)
        raise RequestError(400, f"prompt is not valid UTF-8: {e.reason} at character {e.start} ({prompt[e.start]!r})") from None
    return prompt


@dataclass
class TextServeState(ServeState):
    """The HTTP process's view of a language model: the vision state's catalog, policy and
    statistics, with the tokenizer and the context instead of an image transform."""

    tokenizer: Tokenizer | None = None
    context: int = 0  # the shortest context of any stitch's path (tokens)
    max_new_tokens: int = 64  # a request's default max_tokens
    model: str = ""

    @property
    def stop_tokens(self) -> list[int]:
        return [] if self.tokenizer.eos_id is None else [self.tokenizer.eos_id]

    def prepare_completion(self, fields: dict) -> Completion:
        unknown = sorted(set(fields) - set(FIELDS))
        if unknown:
            raise RequestError(400, f"unknown fields {unknown}; valid fields: {list(FIELDS)}")
        prompt = read_prompt(fields)
        stitch = self.catalog.resolve(read_choice({k: fields[k] for k in ("stitch", *BUDGETS) if k in fields}, self.catalog.metric))
        ids = self.tokenizer.prompt_ids(prompt)
        room = self.context - len(ids) + 1  # the last new token is not read back
        if room < 1:
            raise RequestError(413, f"prompt of {len(ids)} tokens is longer than the context of {self.context} tokens")
        max_tokens = read_number(fields, "max_tokens", int)
        max_tokens = min(self.max_new_tokens, room) if max_tokens is None else max_tokens
        if not 1 <= max_tokens <= room:
            raise RequestError(422, f"max_tokens must be in 1..{room} (the context of {self.context} tokens less the "
                                    f"prompt's {len(ids)}), got {max_tokens}")
        temperature = read_number(fields, "temperature", float)
        top_p, top_k = read_number(fields, "top_p", float), read_number(fields, "top_k", int)
        try:
            sampling = Sampling(0.0 if temperature is None else temperature, 0 if top_k is None else top_k,
                                1.0 if top_p is None else top_p)
        except ValueError as e:
            raise RequestError(422, str(e)) from None
        return Completion(ids, stitch, max_tokens, sampling, read_bool(fields, "stream"), read_number(fields, "seed", int))

    def chunk(self, cid: str, created: int, text: str, finish_reason: str | None = None, **extra: Any) -> dict:
        """An OpenAI ``text_completion`` object (a whole answer or one streamed chunk)."""
        return {"id": cid, "object": "text_completion", "created": created, "model": self.model,
                "choices": [{"index": 0, "text": text, "finish_reason": finish_reason, "logprobs": None}], **extra}

    async def pieces(self, job: Completion, stitch: int, chosen_by: str, depth: int, start: float,
                     lines: AsyncIterator[str]) -> AsyncIterator[dict]:
        """The worker's tokens as text pieces, then the summary (records the statistics; ends the request)."""
        decoder, done = self.tokenizer.decoder(), None
        try:
            async for line in lines:
                item = json.loads(line)
                if "token" in item:
                    text = decoder.feed([item["token"]])
                    if text:
                        yield {"text": text}
                else:
                    done = item
            if done is None:
                raise RuntimeError("the inference worker failed while generating (see the server log)")
            tokens = done["tokens"]
            time_ms = (time.perf_counter() - start) * 1e3
            per_token = time_ms / max(tokens, 1)
            self.stats.record(stitch, per_token)
            self.policy.observe(stitch, depth, per_token)
            yield {"text": decoder.flush(), "finish_reason": done["finish_reason"], "summary": {
                "usage": {"prompt_tokens": len(job.ids), "completion_tokens": tokens, "total_tokens": len(job.ids) + tokens},
                "stitch": self.catalog.describe(stitch), "chosen_by": chosen_by, "time_ms": time_ms,
                "ms_per_token": per_token, "generate_ms": done["generate_ms"]}}
        finally:
            self.in_flight -= 1


class TextAPI(StitchAPI):
    """The inference worker: loads the checkpoint (as for images) and streams one request's tokens."""

    def __init__(self, ckpt: str, api_key: str | None = None) -> None:
        super().__init__(ckpt, max_batch_size=1, batch_timeout=0.0, api_key=api_key)
        self.api_path, self.stream = API_PATH, True

    def decode_request(self, request: dict) -> dict:
        return request

    def predict(self, x: dict) -> Any:
        start = time.perf_counter()
        sampling = Sampling(x["temperature"], x["top_k"], x["top_p"])
        generator = None if x["seed"] is None else torch.Generator(self.torch_device).manual_seed(x["seed"])
        ids = torch.tensor([x["ids"]], dtype=torch.int64, device=self.torch_device)
        tokens, reason = 0, "length"
        for token in stream(self.net, ids, x["stitch"], x["max_tokens"], sampling=sampling, stop_tokens=x["stop"],
                            generator=generator):
            tokens += 1
            token = int(token[0])
            if token in x["stop"]:
                reason = "stop"
                break
            yield {"token": token}
        yield {"tokens": tokens, "finish_reason": reason, "generate_ms": (time.perf_counter() - start) * 1e3}

    def encode_response(self, outputs: Any) -> Any:
        yield from outputs


class TextServer(StitchServer):
    """The LM server: ``/v1/completions`` beside ``/stats``, ``/stitches``, ``/health``; no page."""

    page_html = None

    def _register_api_endpoints(self, lit_api: TextAPI, request_type: Any, response_type: Any) -> None:
        handler, state = StreamingRequestHandler(lit_api, self), self.state

        async def completions(request: Request) -> Any:
            start = time.perf_counter()
            state.in_flight += 1
            try:
                fields = await read_fields(request, state.max_payload_bytes)
                job = await run_in_threadpool(state.prepare_completion, fields)
                depth, stitch, chosen_by = state.in_flight, job.stitch, "request"
                if stitch is None:
                    stitch, chosen_by = state.policy.choose(depth), "policy"
                response = await handler.handle_request(job.payload(stitch, state.stop_tokens), dict)
            except RequestError as e:
                state.in_flight -= 1
                state.stats.errors += 1
                return JSONResponse({"detail": e.message}, status_code=e.status)
            except BaseException:
                state.in_flight -= 1
                raise
            pieces = state.pieces(job, stitch, chosen_by, depth, start, response.body_iterator)
            cid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
            if job.stream:
                return StreamingResponse(_events(state, pieces, cid, created), media_type="text/event-stream")
            text, last = [], {}
            try:
                async for piece in pieces:
                    text.append(piece["text"])
                    last = piece
            except RuntimeError as e:
                state.stats.errors += 1
                return JSONResponse({"detail": str(e)}, status_code=500)
            return JSONResponse(state.chunk(cid, created, "".join(text), last["finish_reason"], **last["summary"]))

        self.app.add_api_route(lit_api.api_path, completions, methods=["POST"], dependencies=[Depends(self.setup_auth(lit_api))])


async def _events(state: TextServeState, pieces: AsyncIterator[dict], cid: str, created: int) -> AsyncIterator[str]:
    """Server-sent events: a chunk per piece of text, the summary with the last one, then [DONE]."""
    try:
        async for piece in pieces:
            chunk = state.chunk(cid, created, piece["text"], piece.get("finish_reason"), **piece.get("summary", {}))
            yield f"data: {json.dumps(chunk)}\n\n"
    except RuntimeError as e:
        yield f"data: {json.dumps({'error': {'message': str(e)}})}\n\n"
    yield "data: [DONE]\n\n"


@torch.no_grad()
def measure_token_table(net: StitchableNetwork, ids: Sequence[int], device: str, prompt_tokens: int = 16,
                        new_tokens: int = 16, repeats: int = 5) -> LatencyTable:
    """Time per generated token (ms) of each stitch at batch 1 with the KV cache, on the serving
    device: what the SLO policy plans with (one request generates at a time). The fastest of
    ``repeats`` runs: a step costs a few ms, which other jobs on a shared CPU inflate at random, and
    the policy's online overhead fit adds back what the server really sees."""
    net.to(device).eval()
    vocab = vocab_size(net.anchors[0])
    ms = {}
    for stitch in ids:
        length = max(1, min(prompt_tokens, path_context_length(net, stitch) - new_tokens + 1))
        prompt = torch.randint(vocab, (1, length), generator=torch.Generator().manual_seed(0)).to(device)
        generate(net, prompt, stitch, new_tokens)  # warm-up
        times = []
        for _ in range(repeats):
            begin = time.perf_counter()
            generate(net, prompt, stitch, new_tokens)
            times.append((time.perf_counter() - begin) * 1e3 / new_tokens)
        ms[stitch] = (min(times),)
    return LatencyTable((1,), ms)


def build_text_server(cfg: Any, net: StitchableNetwork, local: str, results: list[StitchResult], device: str,
                      tokenizer: str) -> tuple[TextServer, TextServeState]:
    """The LM server for ``snnet serve`` (``cfg``: its ServeConfig), the latencies per token measured here."""
    tok = Tokenizer(tokenizer)
    vocab = vocab_size(net.anchors[0])
    if tok.vocab_size > vocab:
        raise ValueError(f"tokenizer {tokenizer!r} has {tok.vocab_size} tokens but the network's vocabulary has {vocab}: "
                         "give its own tokenizer with --tokenizer")
    ids = [r.id for r in results]
    table = (LatencyTable.from_results(results, (1,)) if cfg.latency == "results"
             else measure_token_table(net, ids, device))
    results = [r if r.latency_ms is not None else dataclasses.replace(r, latency_ms=table.batch_ms(r.id, 1)) for r in results]
    policy: Policy = (FixedPolicy(cfg.stitch) if cfg.policy == "fixed"
                      else SLOPolicy(results, table, cfg.slo_ms, cfg.margin, metric="ppl"))
    state = TextServeState(
        catalog=Catalog(net.table(), results, vocab, None, "ppl"), transform=None, policy=policy,
        stats=ServeStats(slo_ms=cfg.slo_ms if cfg.policy == "slo" else None), max_payload_bytes=int(cfg.max_payload_mb * 2**20),
        tokenizer=tok, context=min(path_context_length(net, s) for s in range(net.num_configs)),
        max_new_tokens=cfg.max_new_tokens, model=str(cfg.ckpt),
    )
    api = TextAPI(local, cfg.api_key)
    server = TextServer(api, state, accelerator=torch.device(device).type, devices=1, timeout=600,
                        max_payload_size=state.max_payload_bytes, disable_openapi_url=True, fast_queue=cfg.fast_queue)
    return server, state

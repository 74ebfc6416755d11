"""`snnet serve` on a language model for real: a tiny byte-level LM family fitted a few steps, behind
a LitServe server on a free 127.0.0.1 port; completions compared with generation in this process."""
import json

import pytest
import requests
import torch

from helpers import SERVE_HEADERS as HEADERS, SERVE_KEY as KEY, start_server, stop_server
from snnet.results import StitchResult, load_results, select_stitch
from snnet.serve.launch import read_checkpoint
from snnet.serve.policy import LatencyTable, SLOPolicy
from snnet.sn_net.generate import Sampling, generate
from snnet.text_data import Tokenizer
from test_lm import fit_config, run_fit, save_family

PROMPT = "def f(x"  # 7 byte tokens of a context of 16


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    root = tmp_path_factory.mktemp("lm_serve")
    run_fit(root / "run", fit_config(root / "run", save_family(root / "anchors")))
    return root / "run" / "checkpoints" / "step=6.ckpt", root / "run" / "fit_results.json"


@pytest.fixture(scope="module")
def server(fitted):
    proc, url = start_server(*fitted, "--api-key", KEY, "--slo-ms", "60000", "--device", "cpu", "--max-new-tokens", "6")
    yield proc, url
    stop_server(proc)


@pytest.fixture(scope="module")
def net(fitted):
    return read_checkpoint(fitted[0])[0].eval()


def post(url, body=None, data=None, stream=False, **kwargs):
    return requests.post(url + "/v1/completions", json=body, data=data, headers={**HEADERS, **kwargs.pop("headers", {})},
                         stream=stream, timeout=60, **kwargs)


def expected_text(net, stitch: int, new_tokens: int, **options) -> str:
    ids = torch.tensor([list(PROMPT.encode())])
    return bytes(generate(net, ids, stitch, new_tokens, **options)[0].tolist()).decode("utf-8", errors="replace")


def test_every_way_of_choosing_answers_as_generation_does(server, net, fitted):
    _, url = server
    results = load_results(fitted[1])
    assert max(r.ppl for r in results) > 100  # a perplexity above 100 is a valid result row
    for stitch in range(net.num_configs):
        answer = post(url, {"prompt": PROMPT, "max_tokens": 8, "stitch": stitch}).json()
        assert answer["object"] == "text_completion" and answer["chosen_by"] == "request"
        assert answer["choices"][0]["text"] == expected_text(net, stitch, 8)
        assert answer["choices"][0]["finish_reason"] == "length"
        assert answer["stitch"]["id"] == stitch and answer["stitch"]["ppl"] == results[stitch].ppl
        assert answer["usage"] == {"prompt_tokens": 7, "completion_tokens": 8, "total_tokens": 15}
        assert answer["ms_per_token"] == pytest.approx(answer["time_ms"] / 8)
    budget = sorted(r.gflops for r in results)[4]
    answer = post(url, {"prompt": PROMPT, "max_gflops": budget}).json()
    chosen = select_stitch(results, max_gflops=budget, metric="ppl").id
    assert answer["stitch"]["id"] == chosen and answer["chosen_by"] == "request"
    assert answer["choices"][0]["text"] == expected_text(net, chosen, 6)  # --max-new-tokens 6
    answer = post(url, {"prompt": PROMPT}).json()  # the policy: an SLO of a minute, the lowest perplexity
    assert answer["chosen_by"] == "policy" and answer["stitch"]["ppl"] == min(r.ppl for r in results)
    form = post(url, data={"prompt": PROMPT, "stitch": "1", "max_tokens": "3"}).json()  # a form works too
    assert form["choices"][0]["text"] == expected_text(net, 1, 3)


def test_sampling_with_a_seed_is_reproducible_and_equals_generation(server, net):
    _, url = server
    body = {"prompt": PROMPT, "max_tokens": 8, "stitch": 3, "temperature": 1.5, "top_k": 50, "top_p": 0.95, "seed": 7}
    first, second = post(url, body).json(), post(url, body).json()
    assert first["choices"][0]["text"] == second["choices"][0]["text"]
    assert first["choices"][0]["text"] == expected_text(net, 3, 8, sampling=Sampling(1.5, 50, 0.95),
                                                        generator=torch.Generator().manual_seed(7))


def test_streaming_sends_a_chunk_per_token_then_the_summary(server, net):
    _, url = server
    response = post(url, {"prompt": PROMPT, "max_tokens": 8, "stitch": 4, "stream": True}, stream=True)
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/event-stream")
    events = [line.removeprefix("data: ") for line in response.iter_lines(decode_unicode=True) if line]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    text = "".join(c["choices"][0]["text"] for c in chunks)
    assert text == expected_text(net, 4, 8)
    ascii_tokens = sum(1 for ch in text if ord(ch) < 128)  # one chunk per token that completes a character
    assert len(chunks) >= ascii_tokens >= 1
    assert all(c["choices"][0]["finish_reason"] is None for c in chunks[:-1])
    last = chunks[-1]
    assert last["choices"][0]["finish_reason"] == "length" and last["usage"]["completion_tokens"] == 8
    assert last["stitch"]["id"] == 4 and last["ms_per_token"] > 0


@pytest.mark.parametrize("body, status, message", [
    ({"prompt": ""}, 400, "prompt is empty"),
    ({}, 400, "no prompt"),
    ({"prompt": 5}, 400, "prompt must be a string of text, got int"),
    ({"prompt": "x" * 17}, 413, "prompt of 17 tokens is longer than the context of 16 tokens"),
    ({"prompt": PROMPT, "max_tokens": 11}, 422, r"max_tokens must be in 1..10 \(the context of 16 tokens less the prompt's 7\), got 11"),
    ({"prompt": PROMPT, "max_tokens": 0}, 422, "max_tokens must be in 1..10"),
    ({"prompt": PROMPT, "max_gflops": -1}, 422, "max_gflops"),
    ({"prompt": PROMPT, "max_gflops": 1e-12}, 422, "max gflops 1e-12 is below the cheapest stitch 0"),
    ({"prompt": PROMPT, "max_gflops": "lots"}, 400, "max_gflops must be a number, got 'lots'"),
    ({"prompt": PROMPT, "stitch": 99}, 422, r"unknown stitch 99: valid ids are 0..10"),
    ({"prompt": PROMPT, "stitch": 1, "max_gflops": 1.0}, 422, "not both"),
    ({"prompt": PROMPT, "temperature": -1}, 422, "temperature must be a finite number >= 0"),
    ({"prompt": PROMPT, "top_p": 2}, 422, r"top_p must be in \(0, 1\]"),
    ({"prompt": PROMPT, "stream": "maybe"}, 400, "stream must be true or false, got 'maybe'"),
    ({"prompt": PROMPT, "suffix": "x"}, 400, r"unknown fields \['suffix'\]"),
])
def test_bad_requests_get_their_status_and_the_server_keeps_serving(server, body, status, message):
    import re

    _, url = server
    response = post(url, body)
    assert response.status_code == status, response.text
    assert re.search(message, response.json()["detail"]), response.json()["detail"]
    assert post(url, {"prompt": PROMPT, "max_tokens": 2, "stitch": 0}).status_code == 200


def test_bodies_that_are_not_utf8_text_are_refused(server):
    _, url = server
    raw = b'{"prompt": "caf\xe9"}'  # Latin-1, not UTF-8
    response = requests.post(url + "/v1/completions", data=raw, headers={**HEADERS, "content-type": "application/json"}, timeout=30)
    assert response.status_code == 400 and "utf-8" in response.json()["detail"].lower()
    surrogate = b'{"prompt": "a\\ud800b"}'  # valid JSON, a lone surrogate: no UTF-8 text
    response = requests.post(url + "/v1/completions", data=surrogate, headers={**HEADERS, "content-type": "application/json"}, timeout=30)
    assert response.status_code == 400 and "prompt is not valid UTF-8" in response.json()["detail"]
    assert requests.post(url + "/v1/completions", json={"prompt": PROMPT}, timeout=30).status_code == 401  # no key
    stats = requests.get(url + "/stats", headers=HEADERS, timeout=10).json()
    assert stats["errors"] >= 2 and stats["requests"] >= 1


def test_slo_policy_on_perplexity_prefers_the_lowest_that_fits():
    results = [StitchResult(0, "s", 10, 1, True, ppl=9.0), StitchResult(1, "m", 20, 2, False, ppl=7.0),
               StitchResult(2, "l", 40, 4, True, ppl=5.0), StitchResult(3, "bad", 30, 3, False, ppl=12.0)]
    table = LatencyTable((1,), {0: (1.0,), 1: (2.0,), 2: (4.0,), 3: (3.0,)})  # ms per token
    policy = SLOPolicy(results, table, slo_ms=10.0, margin=1.0, metric="ppl")
    assert [r.id for r in policy.candidates] == [2, 1, 0]  # lowest perplexity first; 3 is off the front
    assert policy.choose(1) == 2 and policy.choose(2) == 2 and policy.choose(3) == 1 and policy.choose(6) == 0


def test_byte_decoder_holds_a_character_until_its_last_byte():
    tokenizer = Tokenizer("bytes")
    decoder = tokenizer.decoder()
    ids = tokenizer.prompt_ids("a✓b")
    assert len(ids) == 5
    assert [decoder.feed([i]) for i in ids] == ["a", "", "", "✓", "b"]
    decoder = tokenizer.decoder()
    assert decoder.feed([0xE2, 0x9C]) == "" and decoder.flush() == "\ufffd"

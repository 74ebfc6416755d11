"""`snnet serve` for real: the quickstart's checkpoint (tiny epochs) behind a LitServe server on a
free 127.0.0.1 port, a real HTTP client, answers compared with the network run in this process."""
import base64
import io
import json
import shutil
import signal
import subprocess
import tempfile
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import requests
import torch
from PIL import Image

from helpers import SERVE_HEADERS as HEADERS, SERVE_KEY as KEY, read_log, start_server, stop_server
from snnet.cli import main
from snnet.results import load_results, select_stitch
from snnet.serve.launch import eval_transform, read_checkpoint

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def server(quickstart):
    ckpt, results = quickstart
    proc, url = start_server(ckpt, results, "--api-key", KEY, "--batch-timeout-ms", "30", "--max-image-pixels", "1000000",
                             "--max-payload-mb", "3", "--slo-ms", "60000", "--device", "cpu", "--max-batch-size", "8")
    yield proc, url
    stop_server(proc)


@pytest.fixture(scope="module")
def reference(quickstart):
    """The same network in this process, its eval transform, and a few digits as PNG bytes."""
    from snnet.data import DigitsDataModule

    ckpt, results = quickstart
    net, names = read_checkpoint(ckpt)
    dm = DigitsDataModule(data_config={"input_size": (3, 16, 16)})
    dm.setup()
    images = []
    for i in range(6):
        buffer = io.BytesIO()
        Image.fromarray(dm.val_set.images[i]).save(buffer, format="PNG")
        images.append(buffer.getvalue())
    return net, names, eval_transform(net), images, load_results(results)


def expected(reference, image: bytes, stitch: int) -> torch.Tensor:
    net, _, transform, _, _ = reference
    with torch.inference_mode():
        return net(transform(Image.open(io.BytesIO(image)).convert("RGB"))[None], stitch).softmax(-1)[0]


def post(url, image: bytes | None = None, multipart=False, **fields):
    if multipart:
        return requests.post(url + "/predict", files={"image": ("x.png", image)} if image is not None else None,
                             data={k: str(v) for k, v in fields.items()}, headers=HEADERS, timeout=60)
    body = {**({"image": base64.b64encode(image).decode()} if image is not None else {}), **fields}
    return requests.post(url + "/predict", json=body, headers=HEADERS, timeout=60)


def assert_answer(answer: dict, probs: torch.Tensor, names) -> None:
    values, indices = probs.topk(5)
    assert [t["class"] for t in answer["top"]] == indices.tolist()
    np.testing.assert_allclose([t["prob"] for t in answer["top"]], values.numpy(), rtol=1e-4, atol=1e-6)
    assert [t["name"] for t in answer["top"]] == [names[i] for i in indices.tolist()]


def test_every_way_of_choosing_answers_as_the_network_does(server, reference):
    _, url = server
    net, names, _, images, results = reference
    assert names == [str(d) for d in range(10)]  # saved by the digits datamodule in the checkpoint
    table = requests.get(url + "/stitches", headers=HEADERS, timeout=10).json()
    served = load_results_from(table)
    budgets = [
        {"max_gflops": sorted(r.gflops for r in results)[3]},
        {"max_params": sorted(r.params for r in results)[4]},
        {"max_latency_ms": sorted(r.latency_ms for r in served)[5]},
        {"max_gflops": max(r.gflops for r in results), "max_params": sorted(r.params for r in results)[2]},
    ]
    for i, image in enumerate(images[:2]):
        for stitch in range(net.num_configs):
            answer = post(url, image, multipart=bool(i), stitch=stitch).json()
            assert answer["stitch"]["id"] == stitch and answer["chosen_by"] == "request"
            assert answer["stitch"]["name"] == net.infos[stitch].name
            assert answer["stitch"]["acc1"] == next(r.acc1 for r in results if r.id == stitch)
            assert_answer(answer, expected(reference, image, stitch), names)
        for budget in budgets:
            chosen = select_stitch(served, **budget).id  # as `snnet select` on the served latencies
            answer = post(url, image, multipart=bool(i), **budget).json()
            assert answer["stitch"]["id"] == chosen, budget
            assert_answer(answer, expected(reference, image, chosen), names)
        answer = post(url, image, multipart=bool(i)).json()
        assert answer["chosen_by"] == "policy" and answer["time_ms"] > 0
        assert answer["stitch"]["acc1"] == max(r.acc1 for r in results)  # a 60 s SLO: the most accurate
        assert_answer(answer, expected(reference, image, answer["stitch"]["id"]), names)


def load_results_from(table: dict):
    from snnet.results import StitchResult

    return [StitchResult(r["id"], r["name"], round(r["gflops"] * 1e9), r["params"], r["is_anchor"], acc1=r["acc1"],
                         latency_ms=r["latency_ms"]) for r in table["stitches"]]


def test_mixed_stitch_batches_equal_the_answers_one_at_a_time(server, reference):
    _, url = server
    net, names, _, images, _ = reference
    jobs = [(images[i % len(images)], (3 * i) % net.num_configs) for i in range(24)]
    with ThreadPoolExecutor(12) as pool:
        answers = list(pool.map(lambda job: post(url, job[0], stitch=job[1]).json(), jobs))
    assert max(a["batch"]["stitches"] for a in answers) > 1  # some batch mixed stitches (30 ms to fill one)
    for (image, stitch), answer in zip(jobs, answers):
        assert answer["stitch"]["id"] == stitch
        assert_answer(answer, expected(reference, image, stitch), names)


def _noise_png(width, height) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (height, width, 3), dtype=np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


def _flat_png(width, height) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), (90, 90, 90)).save(buffer, format="PNG")  # compresses to a few KB
    return buffer.getvalue()


def test_every_bad_request_gets_its_status_and_message_and_the_server_keeps_serving(server, reference):
    _, url = server
    net, _, _, images, results = reference
    cheapest = min(results, key=lambda r: r.flops)
    cases = [
        (post(url, b"not an image at all"), 400, "not a decodable image"),
        (post(url, b"\x89PNG\r\n\x1a\n junk", multipart=True), 400, "not a decodable image"),
        (requests.post(url + "/predict", json={"image": "%%%"}, headers=HEADERS, timeout=10), 400, "not valid base64"),
        (post(url, _flat_png(1200, 1000)), 413, "image is 1200x1000 = 1200000 pixels; the limit is 1000000 pixels"),
        (post(url, images[0], stitch=net.num_configs), 422, f"unknown stitch {net.num_configs}: valid ids are 0..{net.num_configs - 1}"),
        (post(url, images[0], max_gflops=cheapest.gflops / 2), 422, f"below the cheapest stitch {cheapest.id} ({cheapest.name})"),
        (post(url, images[0], max_gflops="cheap"), 400, "max_gflops must be a number, got 'cheap'"),
        (post(url, None, stitch=1), 400, "no image"),
        (requests.post(url + "/predict", data="{", headers={**HEADERS, "Content-Type": "application/json"}, timeout=10), 400, "not valid JSON"),
        (requests.post(url + "/predict", data=b"abc", headers={**HEADERS, "Content-Type": "image/png"}, timeout=10), 415, "send application/json or multipart/form-data"),
        (requests.post(url + "/predict", data=b"x" * (4 * 2**20), headers={**HEADERS, "Content-Type": "application/json"}, timeout=30), 413,
         "request body too large: the limit is 3 MB (3145728 bytes; snnet serve --max-payload-mb)"),
        (requests.post(url + "/predict", data='{"a": ' * 100000 + "1" + "}" * 100000,
                       headers={**HEADERS, "Content-Type": "application/json"}, timeout=30), 400, "nested too deeply"),
        (requests.post(url + "/predict", json={}, timeout=10), 401, "Invalid API Key"),
        (requests.get(url + "/stats", timeout=10), 401, "Invalid API Key"),
    ]
    for response, status, message in cases:
        assert response.status_code == status, (response.status_code, response.text)
        assert message in response.json()["detail"], response.json()
    good = post(url, images[0], stitch=0)
    assert good.status_code == 200 and good.json()["stitch"]["id"] == 0
    stats = requests.get(url + "/stats", headers=HEADERS, timeout=10).json()
    assert stats["errors"] >= 8 and stats["stitches"]["0"]["requests"] >= 1
    assert stats["policy"]["policy"] == "slo" and stats["policy"]["current"] in stats["policy"]["candidates"]
    assert {"p50_ms", "p95_ms"} <= set(stats["stitches"]["0"])


def test_refused_starts_name_the_file(quickstart, tmp_path, capsys):
    ckpt, results = quickstart
    corrupt = tmp_path / "corrupt.ckpt"
    corrupt.write_bytes(ckpt.read_bytes()[:5000])
    bad_json = tmp_path / "bad.json"
    bad_json.write_text("[{\"id\": 0,")
    other = tmp_path / "other.json"
    other.write_text(json.dumps([{**r, "name": "someone_else"} for r in json.loads(results.read_text())["stitches"]]))
    cases = [
        (["--ckpt", str(tmp_path / "missing.ckpt"), "--results", str(results)], f"checkpoint not found: {tmp_path / 'missing.ckpt'}"),
        (["--ckpt", str(corrupt), "--results", str(results)], f"checkpoint {corrupt}: truncated"),
        (["--ckpt", str(ckpt), "--results", str(tmp_path / "missing.json")], f"results file not found: {tmp_path / 'missing.json'}"),
        (["--ckpt", str(ckpt), "--results", str(bad_json)], f"results file {bad_json}: not valid JSON"),
        (["--ckpt", str(ckpt), "--results", str(other)], f"results file {other} does not describe checkpoint"),
        (["--ckpt", str(ckpt), "--results", str(results), "--policy", "fixed", "--stitch", "99"],
         f"stitch id 99 out of range: valid ids are 0..{len(json.loads(results.read_text())['stitches']) - 1}"),
    ]
    for argv, message in cases:
        with pytest.raises(SystemExit) as exit_info:
            main(["serve", *argv])
        assert exit_info.value.code == 2
        assert message in capsys.readouterr().err


def test_page_renders_the_front_and_the_current_stitch_in_a_browser(server):
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.skip("headless Chromium is not installed (Debian: apt-get install chromium)")
    _, url = server
    table = requests.get(url + "/stitches", headers=HEADERS, timeout=10).json()
    assert "<svg" in requests.get(url + "/", timeout=10).text  # the page itself needs no key; its data does
    out = subprocess.run(
        [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         f"--user-data-dir={tempfile.mkdtemp()}", "--virtual-time-budget=4000", "--dump-dom", f"{url}/?key={KEY}"],
        capture_output=True, text=True, timeout=90,
    )
    dom = out.stdout
    rows = [r for r in table["stitches"] if r["acc1"] is not None]
    assert dom.count('class="stitch"') == sum(not r["is_anchor"] for r in rows), out.stderr[-2000:]
    assert dom.count('class="anchor"') == sum(r["is_anchor"] for r in rows)
    assert f'id="current" data-id="{table["policy"]["current"]}"' in dom


def test_sigterm_finishes_the_requests_in_flight(server, reference):
    """Last: it stops the module's server. Requests the server had started (``in_flight`` in /stats)
    when SIGTERM came must all be answered; ones not yet accepted may be refused."""
    proc, url = server
    image = _noise_png(700, 700)  # 1.5 MB, tens of ms to decode and resize each: a queue to drain
    with ThreadPoolExecutor(16) as pool:
        for _ in range(3):  # on a loaded machine a round can drain before 4 are in flight at once: send another
            futures, in_flight = [pool.submit(post, url, image, stitch=i % 9) for i in range(16)], 0
            while in_flight < 4 and not all(f.done() for f in futures):
                in_flight = requests.get(url + "/stats", headers=HEADERS, timeout=30).json()["in_flight"]
            if in_flight >= 4:
                break
        proc.send_signal(signal.SIGTERM)
        answered = sum(f.exception() is None and f.result().status_code == 200 for f in futures)
    assert in_flight >= 4 and answered >= in_flight, (in_flight, answered)
    assert proc.wait(120) == 0
    assert "snnet serve: stopped" in read_log(proc)

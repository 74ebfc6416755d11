"""The serving policy, statistics and request checks as pure objects (no server): exact decisions
from known latency tables, and every bad request field with its status and message."""
import base64
import io

import numpy as np
import pytest
from PIL import Image

from snnet.sn_net.network import StitchInfo
from snnet.results import StitchResult, select_stitch
from snnet.serve.launch import ServeConfig, batch_sizes
from snnet.serve.policy import FixedPolicy, LatencyTable, SLOPolicy
from snnet.serve.request import Catalog, RequestError, decode_image, image_bytes, prepare, read_choice
from snnet.serve.stats import ServeStats, percentile

# four stitches: 3 is dominated (slower and less accurate than 2)
RESULTS = [
    StitchResult(0, "small", 10**8, 1000, True, acc1=80.0),
    StitchResult(1, "mid", 2 * 10**8, 2000, False, acc1=85.0),
    StitchResult(2, "large", 4 * 10**8, 4000, True, acc1=90.0),
    StitchResult(3, "bad", 3 * 10**8, 3000, False, acc1=70.0),
]
TABLE = LatencyTable((1, 2, 4), {0: (1.0, 1.5, 2.0), 1: (2.0, 3.0, 4.0), 2: (4.0, 6.0, 8.0), 3: (5.0, 7.0, 9.0)})


def test_latency_table_drains_the_queue_in_full_batches():
    assert TABLE.batch_ms(2, 3) == 8.0  # the smallest measured size holding 3 rows
    assert TABLE.batch_ms(2, 8) == 16.0  # beyond the largest: linear
    assert TABLE.queue_ms(2, 1) == 4.0 and TABLE.queue_ms(2, 4) == 8.0
    assert TABLE.queue_ms(2, 6) == 8.0 + 6.0 and TABLE.queue_ms(2, 9) == 2 * 8.0 + 4.0
    with pytest.raises(ValueError, match="ascending distinct"):
        LatencyTable((2, 1), {})
    with pytest.raises(ValueError, match=r"stitches \[0\] have latencies for \[1\] batch sizes, not 2"):
        LatencyTable((1, 2), {0: (1.0,)})
    with pytest.raises(KeyError, match="no latency measured for stitch 7"):
        TABLE.batch_ms(7, 1)
    assert batch_sizes(16) == (1, 2, 4, 8, 16) and batch_sizes(12) == (1, 2, 4, 8, 12) and batch_sizes(1) == (1,)


def test_slo_policy_serves_the_most_accurate_stitch_that_fits_and_moves_with_the_load():
    policy = SLOPolicy(RESULTS, TABLE, slo_ms=10.0, margin=1.0)
    assert [r.id for r in policy.candidates] == [2, 1, 0]  # 3 is off the front
    assert policy.choose(1) == 2  # 4 ms
    assert policy.choose(4) == 2  # 8 ms
    assert policy.choose(6) == 1  # large 14 ms > 10, mid 4 + 3 = 7 ms
    assert policy.choose(12) == 0  # mid 12 ms, small 6 ms
    assert policy.choose(100) == 0  # nothing fits: the fastest
    assert policy.current == 0
    assert policy.choose(2) == 2 and policy.describe()["current"] == 2  # back when the load falls
    tight = SLOPolicy(RESULTS, TABLE, slo_ms=10.0, margin=0.5)  # target 5 ms
    assert tight.choose(1) == 2 and tight.choose(2) == 1


def test_slo_policy_learns_the_overhead_it_observes_and_falls_back_with_the_load():
    policy = SLOPolicy(RESULTS, TABLE, slo_ms=10.0, margin=1.0, alpha=0.5)
    policy.observe(2, 1, 11.0)  # 7 ms more than the forward, one depth seen: a flat overhead of 7
    assert policy.overhead(1) == pytest.approx(7.0) and policy.overhead(5) == pytest.approx(7.0)
    assert policy.choose(1) == 1  # large: 7 + 4 > 10; mid: 7 + 2
    fit = SLOPolicy(RESULTS, TABLE, slo_ms=10.0, margin=1.0, alpha=0.1)
    for _ in range(200):  # residual = 1 + 2 * depth, e.g. waiting behind the others' decoding
        fit.observe(0, 1, 1.0 + 2.0 + TABLE.queue_ms(0, 1))
        fit.observe(1, 4, 1.0 + 8.0 + TABLE.queue_ms(1, 4))
    a, b = fit.overhead.coefficients()
    assert a == pytest.approx(1.0, abs=1e-6) and b == pytest.approx(2.0, abs=1e-6)
    assert fit.choose(1) == 2  # 3 + 4 <= 10: the most accurate at light load
    assert fit.choose(3) == 0  # 7 + 8, 7 + 4 > 10; 7 + 2 <= 10
    assert fit.choose(1) == 2  # back when the load falls
    assert fit.describe()["overhead_per_request_ms"] == pytest.approx(2.0)
    for _ in range(300):  # faster than modelled: never below zero
        fit.observe(0, 1, 0.0)
    assert fit.overhead(1) >= 0.0 and fit.overhead.coefficients()[0] >= 0.0
    with pytest.raises(ValueError, match="slo_ms must be positive"):
        SLOPolicy(RESULTS, TABLE, slo_ms=0)


def test_fixed_policy_and_latencies_from_the_results_file():
    assert FixedPolicy(3).choose(1000) == 3
    with_latency = [StitchResult(r.id, r.name, r.flops, r.params, r.is_anchor, r.acc1, latency_ms=float(r.id + 1)) for r in RESULTS]
    table = LatencyTable.from_results(with_latency, (1, 4))
    assert table.ms[2] == (3.0, 12.0)
    with pytest.raises(ValueError, match=r"no latency_ms for stitches \[0, 1, 2, 3\]"):
        LatencyTable.from_results(RESULTS, (1,))


def test_stats_percentiles_and_violations():
    assert percentile([1.0, 2.0, 3.0, 4.0, 5.0], 0.5) == 3.0
    assert percentile([10.0, 0.0], 0.95) == pytest.approx(np.percentile([0, 10], 95))
    stats = ServeStats(slo_ms=5.0)
    for ms in (1.0, 2.0, 9.0):
        stats.record(1, ms)
    stats.record(0, 3.0)
    summary = stats.summary()
    assert summary["requests"] == 4 and summary["stitches"]["1"]["requests"] == 3
    assert summary["stitches"]["1"]["slo_violations"] == 1 and summary["stitches"]["0"]["slo_violations"] == 0
    assert summary["stitches"]["1"]["p50_ms"] == 2.0


def test_serve_config_refuses_contradictions():
    with pytest.raises(ValueError, match="--policy fixed needs --stitch ID"):
        ServeConfig("c", "r", policy="fixed")
    with pytest.raises(ValueError, match="--stitch 2 is for --policy fixed"):
        ServeConfig("c", "r", stitch=2)
    with pytest.raises(ValueError, match="unknown policy 'fast'"):
        ServeConfig("c", "r", policy="fast")


def _png(size=(8, 8)) -> bytes:
    buffer = io.BytesIO()
    pixels = np.random.default_rng(0).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)  # noise: no tiny IDAT
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


CATALOG = Catalog([StitchInfo(r.id, r.name, r.flops, r.params, r.is_anchor) for r in RESULTS],
                  [StitchResult(**{**r.to_dict(), "latency_ms": float(r.id)}) for r in RESULTS], num_classes=10)


@pytest.mark.parametrize("fields, status, message", [
    ({"stitch": 4}, 422, r"unknown stitch 4: valid ids are 0..3"),
    ({"stitch": -1}, 422, r"unknown stitch -1: valid ids are 0..3"),
    ({"stitch": "two"}, 400, r"stitch must be an integer, got 'two'"),
    ({"stitch": 1.5}, 400, r"stitch must be an integer, got 1.5"),
    ({"max_gflops": 0.05}, 422, r"max gflops 0.05 is below the cheapest stitch 0 \(small\) at 0.1 gflops"),
    ({"max_params": 10}, 422, r"max params 10 is below the cheapest stitch 0 \(small\) at 1000 params"),
    ({"max_gflops": -1}, 422, r"max_gflops must be a finite positive number, got -1"),
    ({"max_gflops": "nan"}, 400, r"max_gflops must be a finite number"),
    ({"stitch": 1, "max_gflops": 1}, 422, r"give a stitch id \(1\) or a budget"),
    ({"max_gflop": 1}, 400, r"unknown fields \['max_gflop'\]; valid fields"),
    ({"top_k": 11}, 422, r"top_k must be in 1..10"),
])
def test_every_bad_choice_gets_its_status_and_message(fields, status, message):
    with pytest.raises(RequestError, match=message) as info:
        prepare({"image": base64.b64encode(_png()).decode(), **fields}, CATALOG, lambda im: None, 10**6, 5)
    assert info.value.status == status


def test_budgets_resolve_as_select_does():
    for budget in ({"max_gflops": 0.25}, {"max_params": 4000}, {"max_latency_ms": 1.5}, {"max_gflops": 1, "max_params": 2500}):
        assert CATALOG.resolve(read_choice(budget)) == select_stitch(CATALOG.results, **budget).id
    assert CATALOG.resolve(read_choice({})) is None and CATALOG.resolve(read_choice({"stitch": "3"})) == 3


def test_bad_images_get_their_status_and_message():
    cases = [
        (lambda: image_bytes(None), 400, "no image"),
        (lambda: image_bytes("not base64!"), 400, "image is not valid base64"),
        (lambda: image_bytes(12), 400, "image must be a base64 string, got int"),
        (lambda: decode_image(b"", 100), 400, r"image is empty \(0 bytes\)"),
        (lambda: decode_image(b"GIF89a garbage", 100), 400, r"image bytes \(14 bytes\) are not a decodable image: no known format"),
        (lambda: decode_image(_png((32, 32))[:1500], 10**6), 400, r"image \(32x32\) could not be decoded"),
        (lambda: decode_image(_png((40, 30)), 1000), 413, "image is 40x30 = 1200 pixels; the limit is 1000 pixels"),
    ]
    for call, status, message in cases:
        with pytest.raises(RequestError, match=message) as info:
            call()
        assert info.value.status == status
    data_url = "data:image/png;base64," + base64.b64encode(_png()).decode()
    assert decode_image(image_bytes(data_url), 100).size == (8, 8)

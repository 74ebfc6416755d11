"""Load test of `snnet serve` on loopback: the SLO policy against fixed stitches as the load steps
up and down.

For each policy a real server starts (``snnet serve`` in a subprocess); each step runs ``clients``
closed-loop client threads that send ``--requests`` requests in all (JPEG/PNG digits, the policy
choosing). Per step: throughput, p50/p95 of the server-side request time (what ``--slo-ms``
targets) and of the client-side round trip, the share over the SLO, the stitch mix and its
expected top-1 (the results file's accuracy of each stitch served, averaged over requests).

    python tools/bench_serve.py --ckpt outputs/quickstart/checkpoints/last.ckpt \\
        --results outputs/quickstart/fit_results.json --slo-ms 20

A family whose forward, not HTTP, dominates a request (BENCHMARKS.md): the reference's ResNet-18/50
with its published accuracies (``tools/published_family.py``), 224 px requests:

    python tools/bench_serve.py --ckpt outputs/published_r18_r50/network.ckpt \\
        --results outputs/published_r18_r50/results.json --slo-ms 600 --steps 1 2 4 2 1 --requests 40 \\
        --image-size 224 --serve-args --latency results --max-batch-size 4
"""
from __future__ import annotations

import argparse
import base64
import io
import json
import os
import signal
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import requests
from PIL import Image

ROOT = Path(__file__).parents[1]
sys.path.insert(0, str(ROOT))

from snnet.results import load_results  # noqa: E402
from snnet.serve.process import start_serve  # noqa: E402
from snnet.serve.stats import percentile  # noqa: E402


def digit_images(n: int, size: int = 8) -> list[str]:
    """``n`` validation digits as base64 PNG, ``size`` pixels square (the quickstart's data at 8; any
    image works for timing, and a larger one makes decoding and resizing cost what a photo does)."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    out = []
    for image in digits.images[-n:]:
        buffer = io.BytesIO()
        picture = Image.fromarray((image * (255 / 16)).round().astype("uint8")).convert("RGB")
        picture.resize((size, size), Image.BILINEAR).save(buffer, format="PNG")
        out.append(base64.b64encode(buffer.getvalue()).decode())
    return out


def run_step(url: str, images: list[str], clients: int, total: int) -> list[dict]:
    """``total`` requests from ``clients`` closed-loop threads; one record per request."""
    records, lock, counter = [], threading.Lock(), iter(range(total))

    def client() -> None:
        session = requests.Session()
        while True:
            with lock:
                i = next(counter, None)
            if i is None:
                return
            start = time.perf_counter()
            response = session.post(url + "/predict", json={"image": images[i % len(images)]}, timeout=120)
            rtt = (time.perf_counter() - start) * 1e3
            answer = response.json()
            with lock:
                records.append({"status": response.status_code, "rtt_ms": rtt, "time_ms": answer.get("time_ms"),
                                "stitch": answer.get("stitch", {}).get("id"), "end": time.perf_counter()})

    threads = [threading.Thread(target=client) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return records


def summarise(records: list[dict], wall_s: float, slo_ms: float, acc: dict[int, float]) -> dict:
    ok = [r for r in records if r["status"] == 200]
    server, rtt = [r["time_ms"] for r in ok], [r["rtt_ms"] for r in ok]
    mix = Counter(r["stitch"] for r in ok)
    return {
        "requests": len(records), "errors": len(records) - len(ok), "throughput_rps": len(ok) / wall_s,
        "p50_ms": percentile(server, 0.5), "p95_ms": percentile(server, 0.95),
        "rtt_p50_ms": percentile(rtt, 0.5), "rtt_p95_ms": percentile(rtt, 0.95),
        "slo_violations_pct": 100 * sum(t > slo_ms for t in server) / len(server),
        "mix": dict(sorted(mix.items())), "expected_acc1": sum(acc[s] * n for s, n in mix.items()) / len(ok),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ckpt", required=True)
    parser.add_argument("--results", required=True)
    parser.add_argument("--slo-ms", type=float, default=20.0)
    parser.add_argument("--steps", type=int, nargs="+", default=[1, 4, 16, 4, 1], help="concurrent clients per step")
    parser.add_argument("--requests", type=int, default=160, help="requests per step")
    parser.add_argument("--warmup", type=int, default=20, help="untimed requests before the steps")
    parser.add_argument("--image-size", type=int, default=8, help="side of the request images in pixels (8: the digits as they are)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--threads", default="1", help="OMP_NUM_THREADS of the server (1: no contention with the HTTP process)")
    parser.add_argument("--serve-args", nargs=argparse.REMAINDER, default=[], help="more snnet serve options (last)")
    parser.add_argument("--policies", nargs="+", default=["slo", "largest", "smallest"],
                        help="slo, largest (fixed on the largest anchor), smallest (fixed on the smallest)")
    parser.add_argument("--out", default="outputs/bench_serve.json")
    args = parser.parse_args()

    results = load_results(args.results)
    acc = {r.id: r.acc1 for r in results}
    anchors = sorted((r for r in results if r.is_anchor), key=lambda r: r.flops)
    known = {
        "slo": ("slo", ["--policy", "slo", "--slo-ms", str(args.slo_ms)]),
        "largest": (f"fixed largest ({anchors[-1].id})", ["--policy", "fixed", "--stitch", str(anchors[-1].id)]),
        "smallest": (f"fixed smallest ({anchors[0].id})", ["--policy", "fixed", "--stitch", str(anchors[0].id)]),
    }
    unknown = sorted(set(args.policies) - set(known))
    if unknown:
        parser.error(f"unknown policies {unknown}; choose from {sorted(known)}")
    policies = dict(known[p] for p in args.policies)
    images = digit_images(64, args.image_size)
    rows = []
    for name, options in policies.items():
        proc, url = start_serve(["--ckpt", args.ckpt, "--results", args.results, *options, "--device", args.device, *args.serve_args],
                                env={**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": args.threads})
        try:
            run_step(url, images, 1, args.warmup)
            for step, clients in enumerate(args.steps):
                t0 = time.perf_counter()
                records = run_step(url, images, clients, args.requests)
                row = {"policy": name, "step": step, "clients": clients,
                       **summarise(records, time.perf_counter() - t0, args.slo_ms, acc)}
                rows.append(row)
                print(json.dumps(row), flush=True)
            stats = requests.get(url + "/stats", timeout=10).json()
            print(f"{name}: /stats {json.dumps(stats)}", flush=True)
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(120)
    from bench_common import run_meta  # imports torch: not before the server's clients ran

    meta = run_meta(slo_ms=args.slo_ms)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    print(markdown(rows, acc))
    print(json.dumps(meta))


def markdown(rows: list[dict], acc: dict[int, float]) -> str:
    lines = ["| policy | step | clients | req/s | p50 ms | p95 ms | client p95 ms | over SLO | stitch mix | expected top-1 % |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        mix = ", ".join(f"{s}: {n}" for s, n in r["mix"].items())
        lines.append(f"| {r['policy']} | {r['step']} | {r['clients']} | {r['throughput_rps']:.0f} | {r['p50_ms']:.1f} | "
                     f"{r['p95_ms']:.1f} | {r['rtt_p95_ms']:.1f} | {r['slo_violations_pct']:.0f} % | {mix} | {r['expected_acc1']:.2f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()

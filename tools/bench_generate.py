"""Generation speed of a stitchable language model: tokens/s per stitch, and `snnet serve` under load.

Part 1 (in this process): for every stitch, greedy generation of ``--new-tokens`` tokens after a
prompt, batch 1 and a left-padded batch of ``--batch`` prompts of different lengths, with the KV
cache and recomputing the whole sequence at every step; the median of ``--repeats`` runs (wall
time, ``torch.set_num_threads(--threads)``).

Part 2 (``--serve``): a real ``snnet serve`` per policy (SLO, fixed largest anchor, fixed smallest
anchor); each load step runs that many closed-loop clients sending ``--requests`` completions in all
(``max_tokens`` = ``--new-tokens``, the policy choosing). Per step: tokens/s, p50/p95 of the
server-side time per generated token (what ``--slo-ms`` targets), the share over the SLO, the
stitch mix and its expected perplexity (the results file's ppl of each stitch served, averaged).

    python tools/bench_generate.py --ckpt outputs/quickstart_lm/checkpoints/last.ckpt \\
        --results outputs/quickstart_lm/fit_results.json --serve --slo-ms 8
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import requests
import torch

ROOT = Path(__file__).parents[1]
sys.path.insert(0, str(ROOT))

from bench_common import run_meta  # noqa: E402
from snnet.deploy.pretrained import load_trained  # noqa: E402
from snnet.results import load_results  # noqa: E402
from snnet.serve.process import start_serve  # noqa: E402
from snnet.serve.stats import percentile  # noqa: E402
from snnet.sn_net.generate import generate, left_pad  # noqa: E402

PROMPTS = ["def __init__(self", "import os\n", "class Stitch", "    return x", "for i in range(", "# the",
           "if __name__ == ", "    def forward(self, x):"]


def median_s(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def throughput(net, stitches: list[int], new_tokens: int, batch: int, repeats: int) -> list[dict]:
    """Tokens/s of each stitch: batch 1 and a padded batch, with the KV cache and recomputing."""
    prompts = [list(p.encode()) for p in (PROMPTS * batch)[:batch]]
    single = torch.tensor([prompts[0]])
    ids, mask = left_pad(prompts)
    rows = []
    for s in stitches:
        row = {"stitch": s, "name": net.infos[s].name, "mflops_per_token": net.infos[s].flops / 1e6}
        for cache in (True, False):
            key = "cache" if cache else "recompute"
            one = median_s(lambda: generate(net, single, s, new_tokens, use_cache=cache), repeats)
            many = median_s(lambda: generate(net, ids, s, new_tokens, attention_mask=mask, use_cache=cache), repeats)
            row[f"b1_{key}_tok_s"] = new_tokens / one
            row[f"b{batch}_{key}_tok_s"] = batch * new_tokens / many
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def run_step(url: str, clients: int, total: int, new_tokens: int) -> list[dict]:
    """``total`` completions from ``clients`` closed-loop threads; one record per request."""
    records, lock, counter = [], threading.Lock(), iter(range(total))

    def client() -> None:
        session = requests.Session()
        while True:
            with lock:
                i = next(counter, None)
            if i is None:
                return
            response = session.post(url + "/v1/completions", json={"prompt": PROMPTS[i % len(PROMPTS)], "max_tokens": new_tokens},
                                    timeout=600)
            answer = response.json()
            with lock:
                records.append({"status": response.status_code, "ms_per_token": answer.get("ms_per_token"),
                                "tokens": answer.get("usage", {}).get("completion_tokens", 0),
                                "stitch": answer.get("stitch", {}).get("id")})

    threads = [threading.Thread(target=client) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return records


def summarise(records: list[dict], wall_s: float, slo_ms: float, ppl: dict[int, float]) -> dict:
    ok = [r for r in records if r["status"] == 200]
    per_token = [r["ms_per_token"] for r in ok]
    mix = Counter(r["stitch"] for r in ok)
    return {
        "requests": len(records), "errors": len(records) - len(ok), "tokens_s": sum(r["tokens"] for r in ok) / wall_s,
        "p50_ms_token": percentile(per_token, 0.5), "p95_ms_token": percentile(per_token, 0.95),
        "slo_violations_pct": 100 * sum(t > slo_ms for t in per_token) / len(per_token),
        "mix": dict(sorted(mix.items())), "expected_ppl": sum(ppl[s] * n for s, n in mix.items()) / len(ok),
    }


def serve_load(args, ppl: dict[int, float], anchors: list) -> list[dict]:
    policies = {
        f"slo {args.slo_ms:g} ms/token": ["--policy", "slo", "--slo-ms", str(args.slo_ms)],
        f"fixed largest ({anchors[-1].id})": ["--policy", "fixed", "--stitch", str(anchors[-1].id)],
        f"fixed smallest ({anchors[0].id})": ["--policy", "fixed", "--stitch", str(anchors[0].id)],
    }
    rows = []
    for name, options in policies.items():
        proc, url = start_serve(["--ckpt", args.ckpt, "--results", args.results, *options, "--device", "cpu"],
                                env={**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": str(args.threads)})
        try:
            run_step(url, 1, 2, args.new_tokens)  # warm-up
            for step, clients in enumerate(args.steps):
                t0 = time.perf_counter()
                records = run_step(url, clients, args.requests, args.new_tokens)
                row = {"policy": name, "step": step, "clients": clients, **summarise(records, time.perf_counter() - t0, args.slo_ms, ppl)}
                rows.append(row)
                print(json.dumps(row), flush=True)
            policy = requests.get(url + "/stitches", timeout=10).json()  # start-up ms/token per stitch, the policy's state
            print(f"{name}: {json.dumps(policy)}", flush=True)
            rows[-1]["server"] = policy
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(120)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ckpt", required=True, help="an LM checkpoint or pretrained folder")
    parser.add_argument("--results", required=True, help="its results JSON (ppl per stitch)")
    parser.add_argument("--stitches", type=int, nargs="*", help="stitch ids to time (default: all)")
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--serve", action="store_true", help="also the server under stepped load (part 2)")
    parser.add_argument("--slo-ms", type=float, default=8.0, help="the SLO policy's target per generated token")
    parser.add_argument("--steps", type=int, nargs="+", default=[1, 2, 4, 2, 1], help="concurrent clients per step")
    parser.add_argument("--requests", type=int, default=12, help="completions per step")
    parser.add_argument("--out", default="outputs/bench_generate.json")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    net = load_trained(args.ckpt).net.eval()
    results = load_results(args.results)
    ppl = {r.id: r.ppl for r in results}
    stitches = args.stitches if args.stitches else list(range(net.num_configs))
    rows = throughput(net, stitches, args.new_tokens, args.batch, args.repeats)
    print(markdown_throughput(rows, args.batch, ppl))
    load = []
    if args.serve:
        anchors = sorted((r for r in results if r.is_anchor), key=lambda r: r.flops)
        load = serve_load(args, ppl, anchors)
        print(markdown_load(load))
    meta = run_meta()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"meta": meta, "throughput": rows, "load": load}, indent=1))
    print(json.dumps(meta))


def markdown_throughput(rows: list[dict], batch: int, ppl: dict[int, float]) -> str:
    lines = [f"| stitch | MFLOPs/token | ppl | batch 1 cache | batch 1 recompute | batch {batch} cache | batch {batch} recompute |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['stitch']} {r['name']} | {r['mflops_per_token']:.2f} | {ppl[r['stitch']]:.2f} | {r['b1_cache_tok_s']:.0f} | "
                     f"{r['b1_recompute_tok_s']:.0f} | {r[f'b{batch}_cache_tok_s']:.0f} | {r[f'b{batch}_recompute_tok_s']:.0f} |")
    return "\n".join(lines)


def markdown_load(rows: list[dict]) -> str:
    lines = ["| policy | step | clients | tokens/s | p50 ms/token | p95 ms/token | over SLO | stitch mix | expected ppl |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        mix = ", ".join(f"{s}: {n}" for s, n in r["mix"].items())
        lines.append(f"| {r['policy']} | {r['step']} | {r['clients']} | {r['tokens_s']:.0f} | {r['p50_ms_token']:.2f} | "
                     f"{r['p95_ms_token']:.2f} | {r['slo_violations_pct']:.0f} % | {mix} | {r['expected_ppl']:.2f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()

"""KV moved and time to first token of a later round: AMPD's remote incremental prefill (flow c) versus the
full-context transfer of an always-disaggregated deployment, on real vLLM-CPU workers, in the same run.

For each (history H, increment I):
  setup   the session's history (H tokens) lives on the decode worker D (a local round there);
  flow c  P reads the history's blocks from D, computes only the increment, D reads only the new blocks
          from P, D emits the first token;
  full    both caches cold (another P, another D): P computes all H+I tokens, D reads all of them.
Caches are reset between cases. Reported: bytes moved (both directions), TTFT (P request + D's first token),
tokens computed on P, and the ratios flow c / full.

Run (starts P on core 0 and D on core 1 inside a fresh loopback-only network namespace, under the engine lock):
    python benchmarks/kv_transfer.py --histories 512,2048,8192 --increments 64,256,1024 --json out.json
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
import time

from ampd_plugin import localcluster as lc
from ampd_plugin.connector import params as W
from ampd_plugin.tiny_model import PRESETS, build_tiny_model


def _ids(n: int, rng: random.Random) -> list[int]:
    return [rng.randrange(10, 4000) for _ in range(n)]


def _prompt_compute(url: str) -> float:
    return lc.metric_sum(lc.scrape_metrics(url), "vllm:prompt_tokens_by_source_total", source="local_compute")


def run_case(p_url: str, d_url: str, history: int, increment: int, seed: int) -> dict:
    rng = random.Random(seed)
    hist_prompt = _ids(history - 1, rng)
    new = _ids(increment, rng)
    session = f"bench-{history}-{increment}-{seed}"
    for url in (p_url, d_url):
        lc.reset_prefix_cache(url)
    # the history lives on D: one local round, retained
    first = lc.completion(d_url, hist_prompt, max_tokens=1, kv_transfer_params=W.local_params(session=session))
    prompt = hist_prompt + lc.output_ids(first) + new
    # flow c
    p_before = _prompt_compute(p_url)
    t0 = time.perf_counter()
    p_ans = lc.completion(p_url, prompt, max_tokens=1, kv_transfer_params=W.remote_prefill_params(
        session=session, history_from=d_url, history_tokens=history))
    p_kv = p_ans["kv_transfer_params"]
    d_ans = lc.completion(d_url, prompt, max_tokens=1, kv_transfer_params=W.decode_params(p_kv, session=session))
    ttft_c = time.perf_counter() - t0
    d_kv = d_ans["kv_transfer_params"]
    p_computed_c = _prompt_compute(p_url) - p_before
    bytes_to_p_c = W.response_stats(p_kv).get("read_bytes", 0)  # history D -> P
    bytes_to_d_c = W.response_stats(d_kv).get("read_bytes", 0)  # increment P -> D
    bytes_c = bytes_to_p_c + bytes_to_d_c
    errors = [e for e in (W.response_error(p_kv), W.response_error(d_kv)) if e]
    # full-context transfer, cold caches everywhere
    lc.completion(d_url, [1], max_tokens=1, kv_transfer_params=W.local_params(session=session, retain=False))
    for url in (p_url, d_url):
        lc.reset_prefix_cache(url)
    p_before = _prompt_compute(p_url)
    t0 = time.perf_counter()
    p_kv = lc.completion(p_url, prompt, max_tokens=1, kv_transfer_params=W.remote_prefill_params())["kv_transfer_params"]
    d_ans_full = lc.completion(d_url, prompt, max_tokens=1, kv_transfer_params=W.decode_params(p_kv))
    ttft_full = time.perf_counter() - t0
    p_computed_full = _prompt_compute(p_url) - p_before
    bytes_full = W.response_stats(d_ans_full["kv_transfer_params"]).get("read_bytes", 0)
    same = lc.output_ids(d_ans) == lc.output_ids(d_ans_full)
    return {"history": history, "increment": increment, "bytes_c": bytes_c, "bytes_to_d_c": bytes_to_d_c,
            "bytes_full": bytes_full,
            "bytes_ratio": round(bytes_c / bytes_full, 4) if bytes_full else None,
            "bytes_to_d_ratio": round(bytes_to_d_c / bytes_full, 4) if bytes_full else None,
            "ttft_c_s": round(ttft_c, 4), "ttft_full_s": round(ttft_full, 4),
            "ttft_ratio": round(ttft_c / ttft_full, 4), "p_computed_c": p_computed_c,
            "p_computed_full": p_computed_full, "same_first_token": same, "errors": errors}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--histories", default="512,2048,8192")
    ap.add_argument("--increments", default="64,256,1024")
    ap.add_argument("--preset", default="bench", help="tiny-model preset (bench: 4 KiB KV/token, 10k context)")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--json", dest="json_out", default=None)
    ap.add_argument("--attach", default=None, help="JSON {prefill: url, decode: url} of running ampd workers")
    ap.add_argument("--netns", default="ampd-bench", help="namespace to re-run in when not isolated")
    args = ap.parse_args(argv)

    if not args.attach and not lc.in_isolated_netns() and os.environ.get(lc.ALLOW_HOST_NETWORK_ENV) != "1":
        print(f"re-running inside network namespace {args.netns} (Mooncake binds all interfaces)", flush=True)
        try:
            return lc.reexec_in_netns(args.netns, [sys.executable, os.path.abspath(__file__), *(argv or sys.argv[1:])])
        finally:
            lc.delete_netns(args.netns)

    histories = [int(x) for x in args.histories.split(",")]
    increments = [int(x) for x in args.increments.split(",")]
    spec = PRESETS[args.preset]
    servers: list[lc.VllmServer] = []
    try:
        if args.attach:
            urls = json.load(open(args.attach))
            p_url, d_url = urls["prefill"], urls["decode"]
        else:
            model = build_tiny_model(args.preset)
            max_len = max(histories) + max(increments) + 64
            log_dir = tempfile.mkdtemp(prefix="ampd-bench-")
            common = dict(log_dir=log_dir, max_model_len=max_len, kv_cache_gib=2, dev_mode=True)
            servers = [lc.start_vllm(model, name="prefill", cpu=0, ampd=True, **common),
                       lc.start_vllm(model, name="decode", cpu=1, ampd=True, **common)]
            lc.wait_healthy(servers, timeout_s=400)
            p_url, d_url = servers[0].url, servers[1].url
        run_case(p_url, d_url, 300, 64, seed=0)  # warm-up: first transfers open the Mooncake segments
        rows = []
        for h in histories:
            for i in increments:
                for r in range(args.repeats):
                    row = run_case(p_url, d_url, h, i, seed=1000 * h + i + r)
                    rows.append(row)
                    print(json.dumps(row), flush=True)
    finally:
        lc.stop_all(servers)

    print(f"\nmodel preset {args.preset}: {spec.kv_bytes_per_token()} B of KV per token; P and D one core each\n")
    print("| history | increment | KV to D, flow c | KV to D, full | to-D ratio | KV moved in total, c / full "
          "| TTFT flow c (s) | TTFT full (s) | TTFT ratio | P computed c / full |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['history']} | {r['increment']} | {r['bytes_to_d_c'] / 2**20:.2f} MiB | {r['bytes_full'] / 2**20:.2f} MiB "
              f"| {r['bytes_to_d_ratio']} | {r['bytes_c'] / 2**20:.2f} / {r['bytes_full'] / 2**20:.2f} MiB "
              f"| {r['ttft_c_s']:.3f} | {r['ttft_full_s']:.3f} | {r['ttft_ratio']} "
              f"| {r['p_computed_c']:.0f} / {r['p_computed_full']:.0f} |")
    if args.json_out:
        with open(args.json_out, "w") as fh:
            json.dump({"preset": args.preset, "kv_bytes_per_token": spec.kv_bytes_per_token(), "rows": rows}, fh, indent=1)
    bad = [r for r in rows if r["errors"] or not r["same_first_token"]]
    if bad:
        print(f"WARNING: {len(bad)} case(s) had errors or differing first tokens: {bad}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""KV moved and time to first token of a later round: AMPD's remote incremental prefill (flow c) versus the
full-context transfer of an always-disaggregated deployment, on real vLLM-CPU workers, in the same run.

For each (history H, increment I):
  setup   the session's history (H tokens) lives on the decode worker D (a local round there);
  flow c  P reads the history's blocks from D, computes only the increment, D reads only the new blocks
          from P, D emits the first token;
  full    both caches cold (another P, another D): P computes all H+I tokens, D reads all of them.
Caches are reset between cases. Reported: bytes moved (both directions), TTFT (P request + D's first token),
tokens computed on P, the readers' own read times, and the ratios flow c / full.

Tensor parallelism: ``--prefill-tp 1,2 --decode-tp 1,2`` starts one P and one D engine per TP size and runs
every (P TP, D TP) pair in the same run (a TP-2 engine binds one rank to each core). The summary gives, per
flow, bytes and time per pair, and the ratio of a mixed-TP read's time to a same-TP read's for the same bytes.

Run (starts P on core 0 and D on core 1 inside a fresh loopback-only network namespace, under the engine lock):
    python benchmarks/kv_transfer.py --histories 512,2048,8192 --increments 64,256,1024 --json out.json
    python benchmarks/kv_transfer.py --prefill-tp 1,2 --decode-tp 1,2 --histories 2048 --increments 256
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import statistics
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
    p_kv = p_kv_c = p_ans["kv_transfer_params"]
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
    full_stats = W.response_stats(d_ans_full["kv_transfer_params"])
    bytes_full = full_stats.get("read_bytes", 0)
    errors += [e for e in (W.response_error(p_kv), W.response_error(d_ans_full["kv_transfer_params"])) if e]
    same = lc.output_ids(d_ans) == lc.output_ids(d_ans_full)
    return {"history": history, "increment": increment, "bytes_c": bytes_c, "bytes_to_d_c": bytes_to_d_c,
            "bytes_to_p_c": bytes_to_p_c, "read_ms_p_c": W.response_stats(p_kv_c).get("read_ms"),
            "read_ms_d_c": W.response_stats(d_kv).get("read_ms"), "read_ms_full": full_stats.get("read_ms"),
            "bytes_full": bytes_full,
            "bytes_ratio": round(bytes_c / bytes_full, 4) if bytes_full else None,
            "bytes_to_d_ratio": round(bytes_to_d_c / bytes_full, 4) if bytes_full else None,
            "ttft_c_s": round(ttft_c, 4), "ttft_full_s": round(ttft_full, 4),
            "ttft_ratio": round(ttft_c / ttft_full, 4), "p_computed_c": p_computed_c,
            "p_computed_full": p_computed_full, "same_first_token": same, "errors": errors}


def _tps(text: str) -> list[int]:
    tps = sorted({int(x) for x in text.split(",") if x.strip()})
    if not tps or any(t not in (1, 2) for t in tps):
        raise SystemExit("--prefill-tp/--decode-tp take 1 and/or 2 on this benchmark (one core per TP rank)")
    return tps


def _start(model, name: str, tp: int, cpu: int, common: dict) -> lc.VllmServer:
    return lc.start_vllm(model, name=name, cpu="0|1" if tp == 2 else cpu, ampd=True,
                         extra_args=["--tensor-parallel-size", str(tp)] if tp > 1 else [], **common)


def _summary(rows: list[dict]) -> list[dict]:
    """Per (P TP, D TP): mean bytes and read times per flow, and mixed-TP / same-TP read-time ratios."""
    out = []
    for pair, group in itertools.groupby(sorted(rows, key=lambda r: (r["p_tp"], r["d_tp"])),
                                         key=lambda r: (r["p_tp"], r["d_tp"])):
        group = list(group)
        mean = lambda k: statistics.mean(r[k] for r in group if r.get(k) is not None) \
            if any(r.get(k) is not None for r in group) else None  # noqa: E731
        out.append({"p_tp": pair[0], "d_tp": pair[1], "cases": len(group), "bytes_full": mean("bytes_full"),
                    "read_ms_full": mean("read_ms_full"), "bytes_to_p_c": mean("bytes_to_p_c"),
                    "read_ms_p_c": mean("read_ms_p_c"), "bytes_to_d_c": mean("bytes_to_d_c"),
                    "read_ms_d_c": mean("read_ms_d_c"), "ttft_c_s": mean("ttft_c_s"), "ttft_full_s": mean("ttft_full_s")})
    same = [s for s in out if s["p_tp"] == s["d_tp"] and s["read_ms_full"]]
    base = statistics.mean(s["read_ms_full"] for s in same) if same else None
    for s in out:
        s["read_ratio_vs_same_tp"] = round(s["read_ms_full"] / base, 3) if base and s["read_ms_full"] else None
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--histories", default="512,2048,8192")
    ap.add_argument("--increments", default="64,256,1024")
    ap.add_argument("--preset", default="bench", help="tiny-model preset (bench: 4 KiB KV/token, 10k context)")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--prefill-tp", default="1", help="P tensor-parallel sizes, e.g. 1,2 (every pair is run)")
    ap.add_argument("--decode-tp", default="1", help="D tensor-parallel sizes, e.g. 1,2")
    ap.add_argument("--json", dest="json_out", default=None)
    ap.add_argument("--attach", default=None, help="JSON {prefill: url, decode: url} of running ampd workers (TP 1)")
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
    p_tps, d_tps = _tps(args.prefill_tp), _tps(args.decode_tp)
    spec = PRESETS[args.preset]
    servers: list[lc.VllmServer] = []
    held = contextlib.ExitStack()
    try:
        if args.attach:
            urls = json.load(open(args.attach))
            p_urls, d_urls = {1: urls["prefill"]}, {1: urls["decode"]}
            p_tps = d_tps = [1]
        else:
            model = build_tiny_model(args.preset)
            max_len = max(histories) + max(increments) + 64
            log_dir = tempfile.mkdtemp(prefix="ampd-bench-")
            # TP 2 allocates the KV space per rank: keep four engines within the test box's memory
            kv_gib = 1 if max(p_tps + d_tps) > 1 else 2
            common = dict(log_dir=log_dir, max_model_len=max_len, kv_cache_gib=kv_gib, dev_mode=True)
            held.enter_context(lc.engine_lock(on_wait=lambda: print("waiting for the engine lock …", flush=True)))
            p_srv = {tp: _start(model, f"prefill-tp{tp}", tp, 0, common) for tp in p_tps}
            d_srv = {tp: _start(model, f"decode-tp{tp}", tp, 1, common) for tp in d_tps}
            servers = [*p_srv.values(), *d_srv.values()]
            lc.wait_healthy(servers, timeout_s=600)
            p_urls = {tp: s.url for tp, s in p_srv.items()}
            d_urls = {tp: s.url for tp, s in d_srv.items()}
        rows = []
        for p_tp, d_tp in itertools.product(p_tps, d_tps):
            run_case(p_urls[p_tp], d_urls[d_tp], 300, 64, seed=0)  # warm-up: first transfers open the Mooncake segments
            for h in histories:
                for i in increments:
                    for r in range(args.repeats):
                        row = {"p_tp": p_tp, "d_tp": d_tp, **run_case(p_urls[p_tp], d_urls[d_tp], h, i,
                                                                      seed=1000 * h + i + r)}
                        rows.append(row)
                        print(json.dumps(row), flush=True)
    finally:
        lc.stop_all(servers)
        held.close()

    print(f"\nmodel preset {args.preset}: {spec.kv_bytes_per_token()} B of KV per token; P and D one core each "
          "(TP 2: one rank per core, sharing both cores with the other engine)\n")
    print("| P TP | D TP | history | increment | KV to D, flow c | KV to D, full | to-D ratio | KV moved in total, c / full "
          "| TTFT flow c (s) | TTFT full (s) | TTFT ratio | P computed c / full |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['p_tp']} | {r['d_tp']} | {r['history']} | {r['increment']} | {r['bytes_to_d_c'] / 2**20:.2f} MiB "
              f"| {r['bytes_full'] / 2**20:.2f} MiB "
              f"| {r['bytes_to_d_ratio']} | {r['bytes_c'] / 2**20:.2f} / {r['bytes_full'] / 2**20:.2f} MiB "
              f"| {r['ttft_c_s']:.3f} | {r['ttft_full_s']:.3f} | {r['ttft_ratio']} "
              f"| {r['p_computed_c']:.0f} / {r['p_computed_full']:.0f} |")
    summary = _summary(rows)
    if len(summary) > 1:
        print("\nPer TP pair (means): bytes and the reader's own read time per flow; ratio = full read time / "
              "mean same-TP full read time (same bytes)\n")
        print("| P TP → D TP | full: KV to D | full: D read (ms) | flow c: history to P | P read (ms) "
              "| flow c: increment to D | D read (ms) | read-time ratio vs same TP |")
        print("|---|---|---|---|---|---|---|---|")
        fmt = lambda v, d=1: "—" if v is None else f"{v:.{d}f}"  # noqa: E731
        for s in summary:
            print(f"| {s['p_tp']} → {s['d_tp']} | {fmt(s['bytes_full'] and s['bytes_full'] / 2**20, 2)} MiB "
                  f"| {fmt(s['read_ms_full'])} | {fmt(s['bytes_to_p_c'] and s['bytes_to_p_c'] / 2**20, 2)} MiB "
                  f"| {fmt(s['read_ms_p_c'])} | {fmt(s['bytes_to_d_c'] and s['bytes_to_d_c'] / 2**20, 2)} MiB "
                  f"| {fmt(s['read_ms_d_c'])} | {fmt(s['read_ratio_vs_same_tp'], 3)} |")
    if args.json_out:
        with open(args.json_out, "w") as fh:
            json.dump({"preset": args.preset, "kv_bytes_per_token": spec.kv_bytes_per_token(), "rows": rows,
                       "summary": summary}, fh, indent=1)
    bad = [r for r in rows if r["errors"] or not r["same_first_token"]]
    if bad:
        print(f"WARNING: {len(bad)} case(s) had errors or differing first tokens: {bad}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""`ampd-plugin profile`: measure a running engine and fit the cost model's coefficients.

Why measure through the OpenAI API: it is what every engine (vLLM, SGLang) serves, and what the router
sees, so HTTP and scheduling overheads land in the fitted constant term where they belong.

- **Incremental prefill** T_pre(l_hist, l_incr): for each grid point send a fresh random history
  (token ids, block-aligned) with `max_tokens=1` so the engine's prefix cache holds it, then send
  history + increment streamed and time the first token. Only the increment is computed the second time,
  exactly like round k of a session on the worker that kept its history.
- **Decode step** T_dec(batch, context): `batch` concurrent streams with `context`-token prompts and
  `ignore_eos`; the step time is the median over the streams of their TPOT (time per output token after
  the first), which is what the load test and the SLO measure.
- **KV transfer** T_kv(tokens) (two endpoints running the `ampd` connector): a remote prefill on the first
  endpoint, then the decode request on the second reads the KV; the connector's own read counters on the
  second endpoint's /metrics give bytes and seconds (fallback: its TTFT minus that of the same, now
  cached, prompt). Without the connector the link is recorded as assumed (`--assume-link-gbps`).
Coefficients are non-negative least squares (`costmodel.fit_prefill/fit_decode/fit_link`); the fit error is reported
and stored with the raw samples in the YAML's `meta`.
"""

from __future__ import annotations

import asyncio
import re
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import aiohttp
import click
import numpy as np
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from ampd_plugin.costmodel import (FittedCostModel, Layout, LayoutCoefficients, LinkCoefficients, fit_decode,
                                   fit_link, fit_prefill, load_model_spec)
from ampd_plugin.loadtest.stream import SSEStreamParser, StreamError
from ampd_plugin.planner import profile_serving as serving_probe
from ampd_plugin.planner.serving import CPU_TOKEN_BUDGET, GPU_TOKEN_BUDGET, ServingTerms

TOKEN_LOW, TOKEN_HIGH = 10, 250  # ids valid in any vocabulary of ≥ 256 tokens


class ProfileError(RuntimeError):
    """The engine did not answer as an OpenAI-compatible server should; the message says what it did."""


@dataclass
class Grid:
    hist: Sequence[int] = (0, 256, 1024)
    incr: Sequence[int] = (32, 256, 768)
    batches: Sequence[int] = (1, 4, 8)
    contexts: Sequence[int] = (128, 1024)
    transfer: Sequence[int] = (256, 1024)
    decode_tokens: int = 24
    repeats: int = 2
    block_size: int = 16

    def aligned_hist(self) -> list[int]:
        """History lengths rounded down to whole KV blocks (only full blocks are prefix-cached)."""
        return sorted({h - h % self.block_size for h in self.hist})


@dataclass
class Samples:
    prefill: list[tuple[int, int, float]] = field(default_factory=list)  # (l_hist, l_incr, seconds)
    decode: list[tuple[int, int, float]] = field(default_factory=list)  # (batch, context_tokens, seconds)
    transfer: list[tuple[int, float]] = field(default_factory=list)  # (tokens, seconds)
    skipped: list[str] = field(default_factory=list)  # grid points that could not be measured, and why


# --------------------------------------------------------------------------------------- engine client
class Engine:
    """The few OpenAI-API calls profiling needs (aiohttp; bounded timeouts)."""

    def __init__(self, url: str, session: aiohttp.ClientSession, timeout_s: float):
        self.url = url.rstrip("/")
        self.http = session
        self.timeout = aiohttp.ClientTimeout(total=timeout_s)
        self.model: str | None = None
        self.root: str | None = None
        # vLLM can put each token's id in its stream chunk: a token whose text is empty (part of a multi-byte
        # character, likely with random prompts) then still counts as a token.
        self.stream_token_ids = False

    async def discover(self) -> None:
        try:
            async with self.http.get(f"{self.url}/v1/models", timeout=self.timeout) as resp:
                if resp.status != 200:
                    raise ProfileError(f"{self.url}/v1/models answered HTTP {resp.status}: {(await resp.text())[:300]}")
                data = await resp.json()
        except aiohttp.ClientError as exc:
            raise ProfileError(f"cannot reach {self.url}: {exc}") from None
        models = data.get("data") or []
        if not models:
            raise ProfileError(f"{self.url}/v1/models lists no model")
        self.model = models[0].get("id")
        self.root = models[0].get("root") or self.model
        self.stream_token_ids = models[0].get("owned_by") == "vllm"

    def body(self, ids: list[int], max_tokens: int, stream: bool, kv: dict | None = None,
             extra: dict | None = None) -> dict:
        body: dict[str, Any] = {"model": self.model, "prompt": ids, "max_tokens": max_tokens, "temperature": 0.0,
                                "ignore_eos": True, "stream": stream, **(extra or {})}
        if stream and self.stream_token_ids:
            body["return_token_ids"] = True
        if kv is not None:
            body["kv_transfer_params"] = kv
        return body

    async def complete(self, ids: list[int], max_tokens: int = 1, kv: dict | None = None,
                       headers: dict | None = None, extra: dict | None = None) -> dict:
        """Non-streaming completion; returns the JSON body."""
        async with self.http.post(f"{self.url}/v1/completions", json=self.body(ids, max_tokens, False, kv, extra),
                                  headers=headers, timeout=self.timeout) as resp:
            if resp.status != 200:
                raise ProfileError(f"{self.url}/v1/completions answered HTTP {resp.status}: {(await resp.text())[:300]}")
            return await resp.json()

    async def stream(self, ids: list[int], max_tokens: int, kv: dict | None = None,
                     headers: dict | None = None) -> list[float]:
        """Streamed completion; returns the arrival time (perf_counter, relative to send) of every token chunk.

        Parsed by the load test's SSE parser, so profile and load test time tokens the same way.
        """
        t0 = time.perf_counter()
        parser = SSEStreamParser(t_sent=t0)
        async with self.http.post(f"{self.url}/v1/completions", json=self.body(ids, max_tokens, True, kv),
                                  headers=headers, timeout=self.timeout) as resp:
            if resp.status != 200:
                raise ProfileError(f"{self.url}/v1/completions answered HTTP {resp.status}: {(await resp.text())[:300]}")
            try:
                async for data in resp.content.iter_any():
                    parser.feed(data, time.perf_counter())
                m = parser.close(time.perf_counter())
            except StreamError as exc:
                raise ProfileError(f"{self.url}: {exc}") from exc
        if m.t_first is None:
            raise ProfileError(f"{self.url}: a streamed completion produced no token")
        times = [m.t_first - t0]
        for gap in m.gaps:
            times.append(times[-1] + gap)
        return times

    async def cache_info(self) -> tuple[int | None, int | None]:
        """(KV capacity in tokens, block size): vLLM's `vllm:cache_config_info` metric (num_gpu_blocks ×
        block_size); SGLang's /get_server_info (max_total_num_tokens, page_size)."""
        try:
            async with self.http.get(f"{self.url}/metrics", timeout=self.timeout) as resp:
                if resp.status == 200:
                    m = re.search(r"vllm:cache_config_info\{([^}]*)\}", await resp.text())
                    if m:
                        labels = dict(re.findall(r'(\w+)="([^"]*)"', m.group(1)))
                        block = int(labels["block_size"]) if labels.get("block_size", "None") != "None" else None
                        blocks = labels.get("num_gpu_blocks") or labels.get("num_cpu_blocks")
                        if blocks and blocks != "None" and block:
                            return int(blocks) * block, block
                        return None, block
            async with self.http.get(f"{self.url}/get_server_info", timeout=self.timeout) as resp:
                if resp.status == 200:
                    info = await resp.json()
                    cap = info.get("max_total_num_tokens")
                    return (int(cap) if cap else None), (int(info["page_size"]) if info.get("page_size") else None)
        except (aiohttp.ClientError, ValueError, KeyError):
            pass
        return None, None


    async def read_counters(self) -> dict[str, float]:
        """The ampd connector's own read counters on /metrics (summed over label sets); {} without them."""
        wanted = {"vllm:ampd_kv_read_bytes_total": "bytes", "vllm:ampd_kv_read_seconds_sum": "seconds",
                  "vllm:ampd_kv_reads_total": "reads"}
        out: dict[str, float] = {}
        try:
            async with self.http.get(f"{self.url}/metrics", timeout=self.timeout) as resp:
                if resp.status != 200:
                    return {}
                for line in (await resp.text()).splitlines():
                    name = line.split("{", 1)[0].split(" ", 1)[0]
                    if name in wanted:
                        out[wanted[name]] = out.get(wanted[name], 0.0) + float(line.rsplit(" ", 1)[1])
        except (aiohttp.ClientError, ValueError):
            return {}
        return out


# --------------------------------------------------------------------------------------- measurements
class Profiler:
    def __init__(self, grid: Grid, seed: int = 0, tick: Callable[[str], None] | None = None):
        self.grid = grid
        self.rng = np.random.default_rng(seed)
        self.tick = tick or (lambda _msg: None)

    def fresh(self, n: int) -> list[int]:
        """Random token ids: never a prefix of anything sent before (so never a stale cache hit)."""
        return [int(t) for t in self.rng.integers(TOKEN_LOW, TOKEN_HIGH, size=max(n, 1))]

    async def warm_up(self, engine: Engine) -> None:
        for _ in range(2):
            await engine.stream(self.fresh(64), 4)

    async def prefill(self, engine: Engine, samples: Samples) -> None:
        for hist in self.grid.aligned_hist():
            for incr in self.grid.incr:
                times = []
                for _ in range(self.grid.repeats):
                    ids = self.fresh(hist + incr)
                    if hist:
                        await engine.complete(ids[:hist], 1)  # now cached
                    times.append((await engine.stream(ids, 1))[0])
                    self.tick(f"prefill hist={hist} incr={incr}")
                samples.prefill.append((hist, incr, statistics.median(times)))

    async def decode(self, engine: Engine, samples: Samples) -> None:
        n_out = self.grid.decode_tokens
        for batch in self.grid.batches:
            for ctx in self.grid.contexts:
                step = await self.decode_step(engine, batch, ctx, n_out)
                if step is not None:
                    samples.decode.append((batch, batch * (ctx + n_out // 2), step))
                else:
                    samples.skipped.append(f"decode batch={batch} ctx={ctx}: no step time measurable "
                                           "(streams arrived in one burst and end-to-end times did not grow)")
                self.tick(f"decode batch={batch} ctx={ctx}")

    async def decode_step(self, engine: Engine, batch: int, ctx: int, n_out: int) -> float | None:
        """The decode step time at (batch, ctx): from token arrival times where the stream shows them, else
        end to end.

        A starved API server (an engine's busy threads on a small host) can hold a whole stream and send it
        in one write, which hides the step time inside the stream. The last token's arrival still bounds
        when decoding ended, so the fallback pairs `batch` n-token streams with `batch` one-token requests of
        the same shape: step = (T_last(n) − T_last(1)) / (n − 1), median over repeats.
        """
        steps: list[float] = []
        ends: list[float] = []
        for _ in range(max(self.grid.repeats, 1)):
            streams = await asyncio.gather(*(engine.stream(self.fresh(ctx), n_out) for _ in range(batch)))
            try:
                steps.append(steady_step_time(streams, n_out))
                continue
            except CoalescedStreams:
                pass
            firsts = await asyncio.gather(*(engine.stream(self.fresh(ctx), 1) for _ in range(batch)))
            longest = statistics.median(s[-1] for s in streams)
            shortest = statistics.median(s[-1] for s in firsts)
            if longest > shortest:
                ends.append((longest - shortest) / (n_out - 1))
        # Token arrival times, where any repeat shows them, beat the end-to-end difference of two noisy runs.
        if steps:
            return float(statistics.median(steps))
        return float(statistics.median(ends)) if ends else None

    async def transfer(self, prefill: Engine, decode: Engine, samples: Samples, kv_bytes_per_token: int) -> str | None:
        """Times KV moved P→D by the `ampd` connector; returns why it could not, or None.

        Preferred timing: the connector's own read counters on D's /metrics (bytes and seconds of the
        read). Fallback: D's TTFT with the read minus its TTFT for the same prompt once cached.
        """
        from ampd_plugin.connector import params as wire

        # One discarded transfer first: the peers' first read pays the transfer engine's connection set-up.
        warm = self.fresh(min(self.grid.transfer))
        resp = await prefill.complete(warm, 1, kv=wire.remote_prefill_params())
        kv = resp.get("kv_transfer_params")
        if wire.response_source(kv) is not None:
            await decode.stream(warm, 1, kv=wire.decode_params(kv))
        for tokens in self.grid.transfer:
            times, sizes = [], []
            for _ in range(self.grid.repeats):
                ids = self.fresh(tokens)
                resp = await prefill.complete(ids, 1, kv=wire.remote_prefill_params())
                kv = resp.get("kv_transfer_params")
                if wire.response_source(kv) is None:
                    return ("the endpoints do not run the ampd connector (no source descriptor in the prefill "
                            f"response{': ' + str(wire.response_error(kv)) if wire.response_error(kv) else ''})")
                before = await decode.read_counters()
                remote = (await decode.stream(ids, 1, kv=wire.decode_params(kv)))[0]
                after = before
                for _ in range(20):  # counters reach the API server with the engine's next stats update
                    after = await decode.read_counters()
                    if after.get("reads", 0) > before.get("reads", 0):
                        break
                    await asyncio.sleep(0.1)
                if after.get("reads", 0) > before.get("reads", 0) and after.get("bytes", 0) > before.get("bytes", 0):
                    sizes.append((after["bytes"] - before["bytes"]) / kv_bytes_per_token)
                    times.append(after["seconds"] - before["seconds"])
                else:
                    cached = (await decode.stream(ids, 1))[0]  # the same prompt, now in D's prefix cache
                    sizes.append(float(tokens))
                    times.append(max(remote - cached, 0.0))
                self.tick(f"kv transfer tokens={tokens}")
            # The least of the repeats: scheduling noise only ever adds to a read this short.
            samples.transfer.append((int(statistics.median(sizes)), min(times)))
        return None


def steady_step_time(streams: Sequence[Sequence[float]], tokens: int) -> float:
    """Median over the batch's streams of the time per output token after the first (TPOT), the decode step
    as the user sees it. Counting tokens rather than chunk gaps keeps it right when the server coalesces
    several tokens into one chunk or the client reads a burst of chunks at once."""
    if tokens < 2:
        raise ProfileError("decode streams need at least two tokens; raise --decode-tokens")
    timed = [s for s in streams if len(s) >= 2]
    if not timed:
        raise ProfileError("decode streams produced fewer than two chunks; raise --decode-tokens")
    per_stream = [step for step in (_stream_step(s, tokens) for s in timed) if step is not None]
    if not per_stream:
        raise CoalescedStreams("every decode stream arrived in one burst; the step time is not visible")
    return float(statistics.median(per_stream))


_SAME_READ_S = 5e-4  # chunks closer than this arrived in one read of the socket


def _stream_step(times: Sequence[float], tokens: int) -> float | None:
    """One stream's step time, or None when its arrival times do not show it (all at one instant: the API
    server or client was descheduled for the whole decode). A stream whose first tokens arrived together was
    held back at its start: only the tokens after that burst, over the time after it, measure the step
    (from the first arrival, a 27-token burst of 30 would look ten times faster). Needs one time per token;
    at least a quarter of the stream must follow the burst."""
    if times[-1] <= times[0]:
        return None
    if len(times) < tokens:  # the server put several tokens in a chunk: only the whole span is known
        return (times[-1] - times[0]) / (tokens - 1)
    burst = 1
    while burst < len(times) and times[burst] - times[0] < _SAME_READ_S:
        burst += 1
    after = len(times) - burst
    if after < max(1, len(times) // 4):
        return None
    return (times[-1] - times[burst - 1]) / after


class CoalescedStreams(ProfileError):
    """All tokens of every stream arrived at once."""


# --------------------------------------------------------------------------------------- fitting
def relative_errors(model: Callable[[int, int], float], samples: Sequence[tuple[int, int, float]]) -> list[float]:
    return [abs(model(a, b) - y) / y for a, b, y in samples if y > 0]


def build_fitted(samples: Samples, kv_bytes_per_token: int, kv_capacity: int, tp: int, links: Sequence[str],
                 assume_link_gbps: float, meta: dict) -> tuple[FittedCostModel, dict]:
    """Fit all coefficients; returns the model and the fit-error report."""
    if len(samples.prefill) < 3 or len(samples.decode) < 3:
        why = f"; skipped: {'; '.join(samples.skipped)}" if samples.skipped else ""
        raise ProfileError(f"need at least 3 prefill and 3 decode grid points to fit, measured "
                           f"{len(samples.prefill)} and {len(samples.decode)} (enlarge the grid or raise "
                           f"--decode-tokens){why}")
    pre = fit_prefill(samples.prefill)
    dec = fit_decode(samples.decode)
    report = {
        "prefill_mape": float(np.mean(relative_errors(pre, samples.prefill))),
        "prefill_max_error": float(np.max(relative_errors(pre, samples.prefill))),
        "decode_mape": float(np.mean(relative_errors(dec, samples.decode))),
        "decode_max_error": float(np.max(relative_errors(dec, samples.decode))),
    }
    link = None
    if len(samples.transfer) >= 2:
        try:
            link = fit_link(samples.transfer, kv_bytes_per_token)
            errs = [abs(link(t * kv_bytes_per_token) - s) / s for t, s in samples.transfer if s > 0]
            report["transfer_mape"] = float(np.mean(errs)) if errs else 0.0
            link_source = "measured"
        except ValueError as exc:
            meta = {**meta, "transfer_skipped": str(exc)}
    if link is None:
        link = LinkCoefficients(200e-6, assume_link_gbps * 1e9)
        link_source = f"assumed {assume_link_gbps:g} GB/s"
    layout = Layout(tp=tp)
    if samples.skipped:
        meta = {**meta, "skipped": list(samples.skipped)}
    meta = {**meta, "fit": report, "link_source": link_source,
            "samples": {"prefill": [list(s) for s in samples.prefill], "decode": [list(s) for s in samples.decode],
                        "transfer": [list(s) for s in samples.transfer]}}
    model = FittedCostModel(
        kv_bytes_per_token=kv_bytes_per_token,
        layouts={layout: LayoutCoefficients(layout, pre, dec, kv_capacity)},
        links={name: link for name in links},
        model=str(meta.get("model", "")), gpu=str(meta.get("device", "")), meta=meta,
    )
    return model, report


# --------------------------------------------------------------------------------------- command
async def run_profile(endpoints: Sequence[str], grid: Grid, seed: int, timeout_s: float, kv_bytes_per_token: int | None,
                      model_spec: str | None, kv_capacity: int | None, tick: Callable[[str], None]) -> tuple[Samples, dict]:
    prof = Profiler(grid, seed, tick)
    samples = Samples()
    info: dict[str, Any] = {"endpoints": list(endpoints)}
    async with aiohttp.ClientSession() as http:
        engines = [Engine(url, http, timeout_s) for url in endpoints]
        for e in engines:
            await e.discover()
        first = engines[0]
        info["model"] = first.model
        spec_source = model_spec or first.root
        if kv_bytes_per_token is None:
            try:
                kv_bytes_per_token = load_model_spec(spec_source).kv_bytes_per_token
            except ValueError as exc:
                raise ProfileError(f"cannot tell the KV bytes per token of {spec_source!r} ({exc}); "
                                   "pass --model CONFIG or --kv-bytes-per-token") from None
        info["kv_bytes_per_token"] = kv_bytes_per_token
        reported_capacity, block = await first.cache_info()
        if block:  # only whole blocks are prefix-cached: align histories to the engine's real block size
            grid.block_size = block
        info["block_size"] = grid.block_size
        if kv_capacity is None:
            kv_capacity = reported_capacity
            if kv_capacity is None:
                raise ProfileError("the engine does not report its KV capacity; pass --kv-capacity-tokens")
        info["kv_capacity_tokens"] = kv_capacity
        await prof.warm_up(first)
        await prof.prefill(first, samples)
        await prof.decode(first, samples)
        if len(engines) >= 2:
            await prof.warm_up(engines[1])
            why = await prof.transfer(first, engines[1], samples, kv_bytes_per_token)
            if why:
                info["transfer_skipped"] = why
    return samples, info


async def run_serving(endpoints: Sequence[str], fitted: FittedCostModel, grid: Grid, seed: int, timeout_s: float,
                      token_budget: int, via_router: bool, log_dir: Path,
                      tick: Callable[[str], None]) -> tuple[ServingTerms, dict, list[str]]:
    """The serving-path terms (`profile_serving`): front end directly, router hop and remote-round costs
    through a router this function starts. Returns the terms, their raw samples and notes on what was
    not measured."""
    import itertools

    prof = Profiler(grid, seed + 1, tick)
    raw: dict[str, Any] = {}
    notes: list[str] = []
    ids = itertools.count()
    session = lambda: f"ampd-profile-{seed}-{next(ids)}"  # noqa: E731
    async with aiohttp.ClientSession() as http:
        first = Engine(endpoints[0], http, timeout_s)
        await first.discover()
        raw["frontend"] = await serving_probe.measure_frontend(first, prof.fresh, grid.repeats)
        tick("front end")
        terms = ServingTerms(token_budget=token_budget, router_s=0.0, remote_s=0.0, export_s=0.0,
                             frontend_s=serving_probe.fit_frontend(raw["frontend"]), frontend_in_t_pre=True)
        if not via_router:
            return terms, raw, ["router hop and remote-round costs not measured (--no-via-router)"]
        hists = grid.aligned_hist()
        incr = sorted(grid.incr)[len(grid.incr) // 2]
        shapes = [(0, incr)] + ([(hists[-1], incr)] if hists[-1] else [])
        provisional = serving_probe.provisional_profile(fitted)
        slo_args = ["--profile", str(provisional), "--ttft-slo", "60", "--itl-slo", "60"]
        try:
            with serving_probe.RouterProcess(["--policy", "colocated", "--kv-connector", "none",
                                              "--decode", endpoints[0], *slo_args], log_dir, "profile-router-local") as r:
                via = Engine(r.url, http, timeout_s)
                await via.discover()
                raw["router_local"] = await serving_probe.measure_router_local(first, via, prof.fresh, shapes,
                                                                               grid.repeats, session)
            terms = terms.replace(router_s=serving_probe.fit_router_hop(raw["router_local"]))
            tick("router hop")
            if len(endpoints) < 2 or not fitted.meta.get("samples", {}).get("transfer"):
                notes.append("remote-round costs not measured (needs two endpoints running the ampd connector)")
                return terms, raw, notes
            with serving_probe.RouterProcess(["--policy", "disagg", "--kv-connector", "ampd", "--prefill", endpoints[0],
                                              "--decode", endpoints[1], *slo_args], log_dir, "profile-router-remote") as r:
                via = Engine(r.url, http, timeout_s)
                await via.discover()
                raw["router_remote"] = await serving_probe.measure_router_remote(
                    via, prof.fresh, [(max(hists[-1], incr), incr)], grid.repeats, session)
            remote_s, export_s = serving_probe.fit_remote(fitted, terms, raw["router_remote"])
            terms = terms.replace(remote_s=remote_s, export_s=export_s)
            tick("remote round")
        finally:
            provisional.unlink(missing_ok=True)
    return terms, raw, notes


def _ints(_ctx, _param, value: str) -> tuple[int, ...]:
    try:
        out = tuple(int(v) for v in value.split(",") if v.strip())
    except ValueError:
        raise click.BadParameter(f"expected comma-separated integers, got {value!r}")
    if not out or any(v < 0 for v in out):
        raise click.BadParameter("values must be non-negative integers")
    return out


@click.command("profile")
@click.option("--endpoint", "endpoints", multiple=True, required=True,
              help="OpenAI base URL of a running engine (give two to also time a KV transfer between them).")
@click.option("--out", "out_path", required=True, type=click.Path(dir_okay=False), help="Fitted cost-model YAML.")
@click.option("--model", "model_spec", help="Preset or config.json for KV bytes/token (default: the served model's dir).")
@click.option("--tp", type=int, default=1, show_default=True, help="TP degree of the measured engine (layout key).")
@click.option("--device", default="", help="Label stored as the profile's `gpu` (e.g. cpu, H100).")
@click.option("--hist", default="0,256,1024", show_default=True, callback=_ints, help="History lengths (tokens).")
@click.option("--incr", default="32,256,768", show_default=True, callback=_ints, help="Increment lengths (tokens).")
@click.option("--batches", default="1,4,8", show_default=True, callback=_ints, help="Decode batch sizes.")
@click.option("--contexts", default="128,1024", show_default=True, callback=_ints, help="Decode prompt lengths.")
@click.option("--transfer", "transfer_sizes", default="256,1024", show_default=True, callback=_ints,
              help="KV transfer sizes (tokens), two endpoints only.")
@click.option("--decode-tokens", type=int, default=24, show_default=True, help="Tokens per decode stream.")
@click.option("--repeats", type=int, default=2, show_default=True, help="Prefill/transfer repeats (median).")
@click.option("--block-size", type=int, default=16, show_default=True, help="KV block size for history alignment when the engine does not report it.")
@click.option("--kv-bytes-per-token", type=int, help="Override (else from the model config).")
@click.option("--kv-capacity-tokens", type=int, help="Override (else from the engine's /metrics).")
@click.option("--assume-link-gbps", type=float, default=1.6, show_default=True,
              help="Link bandwidth recorded when no transfer is measured (Mooncake TCP on loopback ≈ 1.6 GB/s).")
@click.option("--links", default="net,nvlink", show_default=True, help="Link names the transfer fit is stored under.")
@click.option("--timeout", "timeout_s", type=float, default=300.0, show_default=True, help="Per-request timeout (s).")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--max-num-batched-tokens", "token_budget", type=int,
              help="The engine's step token budget (vLLM max_num_batched_tokens); default vLLM's: "
                   f"{CPU_TOKEN_BUDGET} with --device cpu, else {GPU_TOKEN_BUDGET}.")
@click.option("--via-router/--no-via-router", default=True, show_default=True,
              help="Also time rounds through `ampd-plugin route` (started here on 127.0.0.1) for the router hop "
                   "and, with two ampd endpoints, the remote round's extra call and history export.")
def profile(endpoints, out_path, model_spec, tp, device, hist, incr, batches, contexts, transfer_sizes, decode_tokens,
            repeats, block_size, kv_bytes_per_token, kv_capacity_tokens, assume_link_gbps, links, timeout_s, seed,
            token_budget, via_router):
    """Measure a running vLLM/SGLang engine and fit T_pre, T_dec (and T_kv) for `plan --profile`."""
    if decode_tokens < 3 or repeats < 1 or block_size < 1 or tp < 1:
        raise click.UsageError("--decode-tokens ≥ 3, --repeats ≥ 1, --block-size ≥ 1 and --tp ≥ 1 are required")
    if not incr or min(incr) < 1 or not batches or min(batches) < 1 or min(contexts) < 1:
        raise click.UsageError("--incr, --batches and --contexts values must be ≥ 1")
    link_names = [n.strip() for n in links.split(",") if n.strip()]
    grid = Grid(hist, incr, batches, contexts, transfer_sizes, decode_tokens, repeats, block_size)
    total = len(grid.aligned_hist()) * len(incr) * repeats + len(batches) * len(contexts) + 1 + 2 * via_router
    if len(endpoints) >= 2:
        total += len(transfer_sizes) * repeats
    console = Console(stderr=True)
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=console) as progress:
        task = progress.add_task("profiling", total=total)
        try:
            samples, info = asyncio.run(run_profile(
                endpoints, grid, seed, timeout_s, kv_bytes_per_token, model_spec, kv_capacity_tokens,
                lambda msg: progress.update(task, advance=1, description=msg)))
        except (ProfileError, asyncio.TimeoutError) as exc:
            raise click.ClickException(str(exc) or "a request to the engine timed out")
    meta = {**info, "device": device, "grid": {"hist": list(grid.aligned_hist()), "incr": list(incr),
                                                 "batches": list(batches), "contexts": list(contexts),
                                                 "decode_tokens": decode_tokens, "repeats": repeats}}
    try:
        fitted, report = build_fitted(samples, info["kv_bytes_per_token"], info["kv_capacity_tokens"], tp,
                                      link_names, assume_link_gbps, meta)
    except (ProfileError, ValueError) as exc:
        raise click.ClickException(str(exc))
    if token_budget is None:
        token_budget = CPU_TOKEN_BUDGET if device.lower() == "cpu" else GPU_TOKEN_BUDGET
    if token_budget < 1:
        raise click.UsageError("--max-num-batched-tokens must be >= 1")
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=console) as progress:
        task = progress.add_task("serving path", total=1 + 2 * via_router)
        try:
            terms, raw, notes = asyncio.run(run_serving(
                endpoints, fitted, grid, seed, timeout_s, token_budget, via_router, Path(out_path).resolve().parent,
                lambda msg: progress.update(task, advance=1, description=msg)))
        except (ProfileError, RuntimeError, ValueError, asyncio.TimeoutError) as exc:
            raise click.ClickException(f"serving-path measurement failed: {exc or 'timeout'}")
    fitted.serving = terms.to_dict()
    fitted.meta["samples"]["serving"] = {k: [list(x) for x in v] for k, v in raw.items()}
    if notes:
        fitted.meta["serving_notes"] = notes
    fitted.to_yaml(out_path)
    print_report(fitted, report, info, Console())
    Console().print(f"wrote {Path(out_path)}")


def print_report(fitted: FittedCostModel, report: dict, info: dict, console: Console) -> None:
    c = next(iter(fitted.layouts.values()))
    table = Table(title=f"fitted cost model for {info.get('model')} (tp={c.layout.tp})")
    table.add_column("term")
    table.add_column("coefficients")
    table.add_column("fit error (mean / max)", justify="right")
    table.add_row("T_pre = a + b·l_incr + c·l_incr·(l_hist + l_incr/2)",
                  f"a={c.prefill.a:.4g}s b={c.prefill.b:.4g}s c={c.prefill.c:.4g}s",
                  f"{report['prefill_mape']:.1%} / {report['prefill_max_error']:.1%}")
    table.add_row("T_dec = a + b·batch + c·context", f"a={c.decode.a:.4g}s b={c.decode.b:.4g}s c={c.decode.c:.4g}s",
                  f"{report['decode_mape']:.1%} / {report['decode_max_error']:.1%}")
    for name, link in fitted.links.items():
        err = f"{report['transfer_mape']:.1%}" if "transfer_mape" in report else fitted.meta.get("link_source", "")
        table.add_row(f"T_kv ({name})", f"latency={link.latency_s:.3g}s bw={link.bandwidth_bytes_per_s / 1e9:.3g} GB/s", err)
    console.print(table)
    console.print(f"KV capacity {c.kv_capacity_tokens} tokens; {fitted.kv_bytes_per_token} bytes/token")
    skipped = info.get("transfer_skipped") or fitted.meta.get("transfer_skipped")
    if skipped:
        console.print(f"[yellow]KV transfer not fitted:[/yellow] {skipped}")
    if fitted.serving:
        t = fitted.serving
        console.print(f"serving path: token budget {t['token_budget']}, front end {t['frontend_s'] * 1e3:.2f} ms/request, "
                      f"router hop {t['router_s'] * 1e3:.2f} ms, remote call {t['remote_s'] * 1e3:.2f} ms, "
                      f"history export {t['export_s'] * 1e3:.2f} ms")
    for note in fitted.meta.get("serving_notes", []):
        console.print(f"[yellow]{note}[/yellow]")

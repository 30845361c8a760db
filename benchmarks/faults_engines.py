"""Injected faults on real engines under a bounded multi-round load: what does a client lose?

    python benchmarks/faults.py --engines [--sessions 8] [--rounds 4] [--seed 0] [--json OUT]

One prefill and two decode vLLM-CPU workers (tiny model, `ampd` connector) behind a real `ampd-plugin route`
(policy ampd). Each phase runs the same load — `--sessions` concurrent multi-round chat sessions through the
OpenAI SDK, streamed, greedy, `ignore_eos` — and injects one fault a few seconds in, while streams are open:

- `baseline`   no fault;
- `hang D`     SIGSTOP of a decode worker's process group for 15 s, then SIGCONT;
- `kill -9 D`  SIGKILL of a decode worker mid-load;
- `restart D`  that worker started again on its port (recovery: until the router serves from it again);
- `kill -9 P`  SIGKILL of the prefill worker.

Per phase: rounds planned / completed / errored / lost (a session stops at its first error, as the load
test's sessions do: its remaining rounds are lost), answers cut short (fewer tokens than asked), the
router's failovers and rebinds, recovery time, and the router's RSS. Exit code 1 when a fault phase
errored or lost a round. A Mooncake transfer failure is not injected here (tests/integration/
test_connector_failures.py covers it on real engines).
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ampd_plugin import localcluster as lc
from router_process import rss_kib

PHASES = ("baseline", "hang D", "kill -9 D", "restart D", "kill -9 P")
MAX_TOKENS = 48
HANG_S = 15.0
FAULT_AT_S = 4.0  # into the phase's load: several streams are open by then


@dataclass
class Phase:
    name: str
    planned: int = 0
    completed: int = 0
    errored: int = 0
    lost: int = 0
    cut_short: int = 0
    errors: list[str] = field(default_factory=list)
    failovers: float = 0.0
    rebinds: float = 0.0
    recovery_s: float | None = None
    rss_kib_before: int = 0
    rss_kib_after: int = 0
    seconds: float = 0.0


def router_counter(url: str, name: str) -> float:
    try:
        return lc.metric_sum(lc.scrape_metrics(url, prefix="ampd_router_"), name)
    except OSError:
        return float("nan")


def worker_up(url: str, worker: str) -> bool:
    try:
        return lc.metric_sum(lc.scrape_metrics(url, prefix="ampd_router_"), "ampd_router_worker_up", worker=worker) == 1.0
    except OSError:
        return False


async def session(client, model: str, sid: str, rounds: int, phase: Phase, seed: int) -> None:
    """One multi-round conversation; stops at its first error (its remaining rounds are lost)."""
    messages = [{"role": "user", "content": f"Session {sid} (seed {seed}): plan a trip through {rounds} towns."}]
    for k in range(rounds):
        try:
            stream = await client.chat.completions.create(
                model=model, messages=messages, max_tokens=MAX_TOKENS, temperature=0.0, stream=True,
                stream_options={"include_usage": True}, extra_body={"ignore_eos": True},
                extra_headers={"X-Session-ID": sid})
            text, usage = [], None
            async for chunk in stream:
                if chunk.usage is not None:
                    usage = chunk.usage
                text.extend(c.delta.content for c in chunk.choices if c.delta and c.delta.content)
        except Exception as exc:  # noqa: BLE001 - every client-visible failure is what this counts
            phase.errored += 1
            phase.lost += rounds - k - 1
            phase.errors.append(f"{sid} round {k}: {type(exc).__name__}: {str(exc)[:160]}")
            return
        phase.completed += 1
        if usage is None or usage.completion_tokens != MAX_TOKENS:
            phase.cut_short += 1
        messages += [{"role": "assistant", "content": "".join(text)},
                     {"role": "user", "content": f"Round {k + 2}: the next town has {k * 3 + 2} sights. Continue."}]
        await asyncio.sleep(0.3)


async def run_phase(name: str, router, workers: dict, args, model_dir: Path, log_dir: Path, inject) -> Phase:
    import openai

    phase = Phase(name, planned=args.sessions * args.rounds)
    phase.rss_kib_before = rss_kib(router.proc.pid) or 0
    failovers0 = router_counter(router.url, "ampd_router_stream_failovers_total")
    rebinds0 = router_counter(router.url, "ampd_router_session_rebinds_total")
    client = openai.AsyncOpenAI(base_url=router.url + "/v1", api_key="none", max_retries=0, timeout=180)
    model = (await client.models.list()).data[0].id
    t0 = time.monotonic()
    load = asyncio.gather(*(session(client, model, f"{name.replace(' ', '')}-{i}", args.rounds, phase, args.seed)
                            for i in range(args.sessions)))
    fault = asyncio.create_task(inject(phase)) if inject else None
    await load
    if fault is not None:
        await fault
    phase.seconds = time.monotonic() - t0
    await client.close()
    phase.failovers = router_counter(router.url, "ampd_router_stream_failovers_total") - failovers0
    phase.rebinds = router_counter(router.url, "ampd_router_session_rebinds_total") - rebinds0
    phase.rss_kib_after = rss_kib(router.proc.pid) or 0
    return phase


def start_worker(model_dir: Path, name: str, cpu: int, log_dir: Path, port: int | None = None) -> lc.VllmServer:
    return lc.start_vllm(model_dir, name=name, cpu=cpu, log_dir=log_dir, port=port, max_model_len=4096,
                         ampd={"protocol": "tcp", "transfer_timeout_s": 3, "http_timeout_s": 10})


async def evaluate(args, log_dir: Path) -> list[Phase]:
    from ampd_plugin.tiny_model import build_tiny_model

    model_dir = build_tiny_model("tiny")
    workers = {"P": start_worker(model_dir, "prefill", 0, log_dir), "D0": start_worker(model_dir, "decode0", 1, log_dir),
               "D1": start_worker(model_dir, "decode1", 0, log_dir)}
    router = None
    try:
        lc.wait_healthy(workers.values(), timeout_s=420)
        cfg = log_dir / "router.yaml"
        # Three engines share two cores (P and D1 on cpu 0): a history export D1 has to recompute can hold
        # its streams for seconds, so the stall limit sits well above that and well below the hang.
        cfg.write_text("stall_timeout_s: 10\nhealth_interval_s: 1\nhealth_timeout_s: 2\n")
        port = lc.free_port()
        router = lc.spawn_server("router", [sys.executable, "-m", "ampd_plugin.cli", "route", "--policy", "ampd",
                                            "--port", str(port), "--config", str(cfg), "--tokenizer", str(model_dir),
                                            "--prefill", workers["P"].url, "--decode", workers["D0"].url,
                                            workers["D1"].url], log_dir, port)
        lc.wait_healthy([router], timeout_s=60)
        d0 = workers["D0"]

        async def hang(phase: Phase) -> None:
            await asyncio.sleep(FAULT_AT_S)
            os.killpg(d0.proc.pid, signal.SIGSTOP)
            await asyncio.sleep(HANG_S)
            os.killpg(d0.proc.pid, signal.SIGCONT)
            t = time.monotonic()
            phase.recovery_s = await until(lambda: worker_up(router.url, "decode-0"), 120, t)

        async def kill_d(phase: Phase) -> None:
            await asyncio.sleep(FAULT_AT_S)
            os.killpg(d0.proc.pid, signal.SIGKILL)

        async def restart_d(phase: Phase) -> None:
            t = time.monotonic()
            d0.stop()
            workers["D0"] = start_worker(model_dir, "decode0-restarted", 1, log_dir, port=d0.port)
            phase.recovery_s = await until(lambda: worker_up(router.url, "decode-0"), 420, t)

        async def kill_p(phase: Phase) -> None:
            await asyncio.sleep(FAULT_AT_S)
            os.killpg(workers["P"].proc.pid, signal.SIGKILL)

        injections = {"baseline": None, "hang D": hang, "kill -9 D": kill_d, "kill -9 P": kill_p}
        phases = []
        for name in PHASES:
            if name == "restart D":  # recovery first, then the same load on the restored cluster
                holder = Phase(name)
                await restart_d(holder)
                phase = await run_phase(name, router, workers, args, model_dir, log_dir, None)
                phase.recovery_s = holder.recovery_s
            else:
                phase = await run_phase(name, router, workers, args, model_dir, log_dir, injections[name])
            print(line(phase), flush=True)
            phases.append(phase)
        return phases
    finally:
        if router is not None:
            router.stop()
        lc.stop_all(workers.values())


async def until(check, timeout_s: float, t0: float) -> float | None:
    while time.monotonic() - t0 < timeout_s:
        if await asyncio.to_thread(check):
            return time.monotonic() - t0
        await asyncio.sleep(0.5)
    return None


HEADER = (f"{'phase':<11} {'planned':>7} {'done':>5} {'errored':>7} {'lost':>5} {'short':>5} {'failovers':>9} "
          f"{'rebinds':>7} {'recovery':>9} {'RSS KiB':>17} {'s':>6}")


def line(p: Phase) -> str:
    rec = f"{p.recovery_s:.1f} s" if p.recovery_s is not None else "–"
    return (f"{p.name:<11} {p.planned:>7} {p.completed:>5} {p.errored:>7} {p.lost:>5} {p.cut_short:>5} "
            f"{p.failovers:>9.0f} {p.rebinds:>7.0f} {rec:>9} {p.rss_kib_before:>8}→{p.rss_kib_after:<8} {p.seconds:>6.1f}")


def report(phases: list[Phase]) -> str:
    out = [HEADER, *(line(p) for p in phases)]
    for p in phases:
        out += [f"  {p.name}: {e}" for e in p.errors[:5]]
    return "\n".join(out)


def failed(phases: list[Phase]) -> bool:
    return any(p.errored or p.lost or p.cut_short for p in phases)


def main(args) -> int:
    import tempfile

    if not lc.in_isolated_netns() and os.environ.get(lc.ALLOW_HOST_NETWORK_ENV) != "1":
        if os.geteuid() != 0:
            raise SystemExit("faults --engines starts Mooncake transfer engines, which listen on every interface; it "
                             "runs itself in a fresh loopback-only network namespace, which needs root")
        ns = f"ampd-faults-{os.getpid()}"
        try:
            return lc.reexec_in_netns(ns, [sys.executable, os.path.abspath(sys.argv[0]), *sys.argv[1:]])
        finally:
            lc.delete_netns(ns)
    log_dir = Path(tempfile.mkdtemp(prefix="faults-engines-"))
    print(f"logs: {log_dir}\n{HEADER}", flush=True)
    with lc.engine_lock(on_wait=lambda: print("waiting for the engine lock …", flush=True)):
        phases = asyncio.run(evaluate(args, log_dir))
    print("\n" + report(phases))
    if args.json:
        Path(args.json).write_text(json.dumps({"sessions": args.sessions, "rounds": args.rounds, "seed": args.seed,
                                               "max_tokens": MAX_TOKENS, "phases": [asdict(p) for p in phases]},
                                              indent=1) + "\n")
    return 1 if failed(phases) else 0

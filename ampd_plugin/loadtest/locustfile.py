"""Locust glue: multi-round sessions, hand-measured TTFT/ITL, raw records merged across workers, SLO report.

Run with `locust -f loadtest/locustfile.py --host http://127.0.0.1:8000 --workload toolbench ...` or
through `ampd-plugin loadtest`. The logic lives in the sibling modules (importable without Locust running);
this module only wires it to Locust's users, events, custom arguments and messages.

Distributed mode (`--master` / `--worker`): at test start the master sends each worker its shard
(index, count) and the common start time; every worker loads the same seeded workload and plays its
share; at stop each worker sends its raw records to the master, which waits for all of them (bounded)
before writing the one report. The master decides the process exit code.
"""

from __future__ import annotations

from locust import HttpUser, constant, events, task  # first: Locust must monkey-patch before ssl is imported
from locust.exception import StopUser
from locust.runners import LocalRunner, MasterRunner, WorkerRunner

import logging
import time
from pathlib import Path
from types import SimpleNamespace

import gevent

from ampd_plugin.loadtest import report as reporting
from ampd_plugin.loadtest.prompts import TextSynthesizer, discover_model, load_tokenizer
from ampd_plugin.loadtest.records import RecordStore
from ampd_plugin.loadtest.schedule import DEFAULT_RATE, DEFAULT_SESSIONS, SessionSchedule, Shard, build_sessions
from ampd_plugin.loadtest.session import RoundResult, SessionPlayer
from ampd_plugin.loadtest.where import router_kv_bytes

log = logging.getLogger("ampd.loadtest")

MSG_SHARD, MSG_HELLO, MSG_RECORDS, MSG_FLUSH, MSG_DONE = (
    "ampd_shard", "ampd_hello", "ampd_records", "ampd_flush", "ampd_done")
MAX_ROUND_EVENT_NAMES = 10  # TTFT rows per round index in the web UI: r0..r9, then "r10+"

state = SimpleNamespace(
    store=RecordStore(), schedule=None, synthesizer=None, model="", t0=0.0, shard=Shard(),
    hello=set(), done_workers=set(), reported=False, report=None, tokenizer_name="", setup_error=None,
    kv0=None,
)


@events.init_command_line_parser.add_listener
def add_arguments(parser) -> None:
    g = parser.add_argument_group("ampd-plugin multi-round sessions")
    g.add_argument("--workload", default="toolbench",
                   help="Workload profile name (toolbench, gaia, hotpotqa, dureader, coding-agent) or a trace file path")
    g.add_argument("--trace", default="", help="JSONL trace file (Mooncake/AIPerf schema); overrides --workload")
    g.add_argument("--sessions", type=int, default=None,
                   help=f"Number of sessions to play (profile default {DEFAULT_SESSIONS}; trace default: all)")
    g.add_argument("--session-rate", type=float, default=None,
                   help="Poisson session arrival rate (sessions/s); sessions start at their scheduled times "
                        f"(profile default {DEFAULT_RATE}; trace default: the trace's own arrival times)")
    g.add_argument("--seed", type=int, default=0, help="Seed of the workload and of the prompt text")
    g.add_argument("--ttft-slo", type=float, default=2.0, help="TTFT SLO in seconds")
    g.add_argument("--itl-slo", type=float, default=0.1, help="ITL (TPOT per round) SLO in seconds")
    g.add_argument("--slo-target", type=float, default=0.9,
                   help="Required share of rounds meeting both SLOs; below it the exit code is 1")
    g.add_argument("--report-dir", default="loadtest-report", help="Where report.json, records.csv, report.png go")
    g.add_argument("--model", default="", help="Model name to request (default: the server's first /v1/models)")
    g.add_argument("--tokenizer", default="",
                   help="Tokenizer for exact prompt lengths (default: the server's model path if local)")
    g.add_argument("--input-scale", type=float, default=1.0, help="Multiply every round's input length")
    g.add_argument("--output-scale", type=float, default=1.0, help="Multiply every round's output length")
    g.add_argument("--max-rounds", type=int, default=0, help="Cut sessions to at most this many rounds (0: no cut)")
    g.add_argument("--prompt-salt", default="", help="Change the prompt text (not its length) between runs")
    g.add_argument("--no-quit-when-done", action="store_true",
                   help="Keep running after every session finished (default: stop the test)")


# ---------------------------------------------------------------------------------------------- set-up


def _options(environment):
    return environment.parsed_options


def prepare_player_side(environment) -> None:
    """Load the workload (this process's shard), the tokenizer and the model name."""
    opts = _options(environment)
    schedule = SessionSchedule(build_sessions(opts.trace or opts.workload, opts.sessions, opts.session_rate,
                                                    opts.seed, opts.input_scale, opts.output_scale,
                                                    opts.max_rounds, is_trace=bool(opts.trace)), state.shard)
    model_id, root = discover_model(environment.host or "")
    state.model = opts.model or model_id
    if not state.model:
        raise RuntimeError(f"no --model given and {environment.host}/v1/models did not name one")
    state.tokenizer_name = opts.tokenizer or (root if root and Path(root).exists() else model_id)
    tokenizer = load_tokenizer(state.tokenizer_name)
    if tokenizer is None:
        log.warning("no tokenizer: prompt lengths approximate (%.2f words/token)", 0.75)
        state.tokenizer_name = ""
    state.synthesizer = TextSynthesizer(tokenizer, seed=opts.seed, salt=opts.prompt_salt)
    _ = state.synthesizer.words  # build the word list now, not inside the first timed round
    state.schedule = schedule  # last: users play nothing unless everything above worked
    log.info("%d sessions for this process (shard %d/%d), model %r, tokenizer %r",
             len(schedule), state.shard.index, state.shard.count, state.model, state.tokenizer_name or None)


@events.init.add_listener
def on_init(environment, **_kw) -> None:
    runner = environment.runner
    if isinstance(runner, WorkerRunner):
        runner.register_message(MSG_SHARD, _on_shard)
        runner.register_message(MSG_FLUSH, _on_flush)
    elif isinstance(runner, MasterRunner):
        runner.register_message(MSG_HELLO, lambda environment, msg, **kw: state.hello.add(msg.node_id))
        runner.register_message(MSG_RECORDS, _on_records)
        runner.register_message(MSG_DONE, _on_worker_done)


@events.test_start.add_listener
def on_test_start(environment, **_kw) -> None:
    state.store.clear()
    state.reported, state.report, state.setup_error = False, None, None
    state.done_workers.clear()
    runner = environment.runner
    if not isinstance(runner, WorkerRunner):
        state.kv0 = router_kv_bytes(environment.host)  # what the router had counted before this test
    if isinstance(runner, MasterRunner):
        state.hello.clear()
        state.t0 = time.time()
        workers = sorted(c.id for c in runner.clients.values() if c.state != "missing")
        for index, client_id in enumerate(workers):
            runner.send_message(MSG_SHARD, {"index": index, "count": len(workers), "t0": state.t0}, client_id=client_id)
        return
    if not isinstance(runner, WorkerRunner):
        state.shard, state.t0 = Shard(), time.time()
    state.schedule = None
    try:
        prepare_player_side(environment)
    except Exception as exc:  # noqa: BLE001 — a set-up failure ends the run with a clear message
        log.error("load test set-up failed: %s", exc)
        state.setup_error = str(exc)
        environment.process_exit_code = reporting.EXIT_NO_DATA
        gevent.spawn(runner.quit)
        return
    if isinstance(runner, WorkerRunner):
        runner.send_message(MSG_HELLO, {"sessions": len(state.schedule)})


def _on_shard(environment, msg, **_kw) -> None:
    state.shard = Shard(int(msg.data["index"]), int(msg.data["count"]))
    state.t0 = float(msg.data["t0"])


# ---------------------------------------------------------------------------------------------- users


class MultiRoundSessionUser(HttpUser):
    """A slot that plays whole sessions: take the next scheduled session, wait for its arrival, play it."""

    wait_time = constant(0)

    @task
    def play_next_session(self) -> None:
        schedule = state.schedule
        session = schedule.take() if schedule is not None else None
        if session is None:  # all handed out, or set-up failed
            raise StopUser()
        try:
            delay = state.t0 + float(session.arrival_s) - time.time()
            if delay > 0:
                time.sleep(delay)  # gevent-patched: other users keep running
            player = SessionPlayer(
                self._transport, state.synthesizer, state.model,
                on_round=lambda result: on_round(self.environment, result),
                source=_source_name(self.environment),
            )
            player.play(session, late_start=max(0.0, -delay))
        finally:
            if schedule.finish():
                _this_process_done(self.environment)

    def _transport(self, body: dict, headers: dict):
        resp = self.client.post("/v1/chat/completions", json=body, headers=headers, stream=True,
                                name="/v1/chat/completions (headers)")
        if resp.status_code >= 400:
            raise HTTPStatusError(f"HTTP {resp.status_code}: {resp.text[:300]}")
        return resp.headers, resp.iter_content(chunk_size=None)


class HTTPStatusError(Exception):
    pass


def _source_name(environment) -> str:
    runner = environment.runner
    return f"worker{runner.worker_index}" if isinstance(runner, WorkerRunner) else "local"


def on_round(environment, result: RoundResult) -> None:
    """Keep the raw record and fire custom events so the web UI shows TTFT, TPOT and ITL."""
    record = result.record
    state.store.add(record)
    fire = environment.events.request.fire
    if record.error is not None:
        fire(request_type="ROUND", name="failed round", response_time=0, response_length=0,
             exception=Exception(record.error), context={})
        return
    k = record.round_index
    name = f"TTFT r{k}" if k < MAX_ROUND_EVENT_NAMES else f"TTFT r{MAX_ROUND_EVENT_NAMES}+"
    for n in ("TTFT", name):
        fire(request_type="METRIC", name=n, response_time=record.ttft * 1000, response_length=record.prompt_tokens,
             exception=None, context={})
    if record.itl is not None:
        fire(request_type="METRIC", name="TPOT", response_time=record.itl * 1000,
             response_length=record.output_tokens, exception=None, context={})
    for gap in result.measurement.gaps:
        fire(request_type="METRIC", name="ITL", response_time=gap * 1000, response_length=1,
             exception=None, context={})


# ---------------------------------------------------------------------------------------------- the end


def _finish_test(environment) -> None:
    if getattr(_options(environment), "no_quit_when_done", False):
        return
    runner = environment.runner
    headless = getattr(_options(environment), "headless", True)
    log.info("all sessions played; stopping the test")
    gevent.spawn(runner.quit if headless else runner.stop)


def _this_process_done(environment) -> None:
    runner = environment.runner
    if isinstance(runner, WorkerRunner):
        runner.send_message(MSG_DONE, {})
    elif isinstance(runner, LocalRunner):
        _finish_test(environment)


def _on_worker_done(environment, msg, **_kw) -> None:
    state.done_workers.add(msg.node_id)
    if state.hello and state.hello <= state.done_workers:
        _finish_test(environment)


def _on_flush(environment, msg, **_kw) -> None:
    """The master asks for our records: stop our users first so every started round is counted."""
    runner = environment.runner
    if runner.state not in ("stopped", "ready"):
        gevent.spawn(runner.stop)  # its test_stop sends the records
    else:
        runner.send_message(MSG_RECORDS, {"records": state.store.local_payload()})


def _on_records(environment, msg, **_kw) -> None:
    state.store.merge(msg.node_id, msg.data.get("records") or [])


@events.test_stop.add_listener
def on_test_stop(environment, **_kw) -> None:
    runner = environment.runner
    if isinstance(runner, WorkerRunner):
        runner.send_message(MSG_RECORDS, {"records": state.store.local_payload()})
        return
    if isinstance(runner, MasterRunner):
        _collect_from_workers(environment)
    finish_report(environment)


def _collect_from_workers(environment, extra_wait: float = 15.0) -> None:
    runner = environment.runner
    missing = state.hello - state.store.sources
    for client_id in missing:
        runner.send_message(MSG_FLUSH, {}, client_id=client_id)
    deadline = time.time() + (environment.stop_timeout or 0) + extra_wait
    while state.hello - state.store.sources and time.time() < deadline:
        gevent.sleep(0.2)
    if state.hello - state.store.sources:
        log.error("no records from workers %s; the report covers the others",
                  sorted(state.hello - state.store.sources))


def finish_report(environment) -> dict | None:
    """Build, write and print the report once per test run; set the process exit code."""
    if state.reported:
        return state.report
    state.reported = True
    opts = _options(environment)
    records = state.store.all()
    try:
        planned = build_sessions(opts.trace or opts.workload, opts.sessions, opts.session_rate, opts.seed,
                                 opts.input_scale, opts.output_scale, opts.max_rounds, is_trace=bool(opts.trace))
    except Exception:  # noqa: BLE001 — the report must still be written
        planned = []
    rate = opts.session_rate or (None if opts.trace else DEFAULT_RATE)
    source = opts.trace or opts.workload
    meta = {
        "title": f"ampd-plugin load test — {source}, {len(planned)} sessions"
                 + (f" @ {rate:g}/s" if rate else " (trace arrivals)"),
        "host": environment.host, "workload": source, "sessions_planned": len(planned),
        "rounds_planned": sum(len(s.rounds) for s in planned), "session_rate": rate, "seed": opts.seed,
        "model": state.model, "tokenizer": state.tokenizer_name or None, "input_scale": opts.input_scale,
        "output_scale": opts.output_scale, "max_rounds": opts.max_rounds,
        "workers": max(1, len(state.hello)), "wall_time_s": time.time() - state.t0 if state.t0 else None,
    }
    if state.setup_error:
        meta["setup_error"] = state.setup_error
    report = reporting.build_report(records, opts.ttft_slo, opts.itl_slo, opts.slo_target, meta)
    reporting.add_router_kv_bytes(report, getattr(state, "kv0", None), router_kv_bytes(environment.host))
    paths = reporting.write_report(report, records, opts.report_dir)
    reporting.print_report(report)
    log.info("report written: %s", ", ".join(str(p) for p in paths.values()))
    environment.process_exit_code = report["exit_code"]
    state.report = report
    return report

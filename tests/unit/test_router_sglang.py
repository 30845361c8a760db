"""The router with `--engine sglang` against in-process fake SGLang workers (no real SGLang can run here)."""

import asyncio

import pytest
from click.testing import CliRunner
from router_fakes import answer_tokens, prompt_key, run
from sglang_fakes import SGLangHarness

from ampd_plugin.connector.sglang.wire import AMPD_LOCAL_BOOTSTRAP_HOST
from ampd_plugin.router.cli import route
from ampd_plugin.router.config import RouterConfig

USER = [{"role": "user", "content": "hello there, tell me a story"}]
FIELDS = ("bootstrap_host", "bootstrap_port", "bootstrap_room")


def expected(messages, n=8):
    return "".join(answer_tokens(prompt_key({"messages": messages}), n))


@pytest.mark.parametrize("stream", [False, True])
def test_remote_round_sends_both_bodies_concurrently_with_one_room(stream):
    async def main():
        async with SGLangHarness(policy="disagg") as h:
            h.prefill[0].first_token_delay = 0.3  # the prefill is still running when the decode request arrives
            status, out, headers = await h.chat(USER, session="s1", stream=stream)
            return status, out, headers, h.prefill[0], h.decode[0]

    status, out, headers, p, d = run(main())
    text = out if stream else out["choices"][0]["message"]["content"]
    assert status == 200 and text == expected(USER)
    assert headers["x-ampd-route"] == "remote" and headers["x-ampd-worker"] == "prefill-0"
    (pb,), (db,) = p.requests, d.requests
    assert {k: pb[k] for k in FIELDS} == {k: db[k] for k in FIELDS}
    assert db["bootstrap_host"] == "127.0.0.1" and db["bootstrap_port"] == 9100
    assert 0 <= db["bootstrap_room"] < 2**63
    assert db["messages"] == USER and db["stream"] is stream and "kv_transfer_params" not in db
    assert d.arrivals[0] < p.finished[0]  # sent concurrently, not after the prefill answered
    assert d.bootstrap_failures == 0


def test_rooms_differ_between_rounds_and_each_prefill_gets_its_own_port():
    async def main():
        async with SGLangHarness(n_prefill=2, policy="disagg") as h:
            for i in range(4):
                status, _, _ = await h.chat(USER, session=f"s{i}")
                assert status == 200
            return h.prefill, h.decode[0]

    prefill, d = run(main())
    rooms = [r["bootstrap_room"] for r in d.requests]
    assert len(set(rooms)) == 4
    for i, p in enumerate(prefill):
        assert all(r["bootstrap_port"] == 9100 + i for r in p.requests)
    assert sum(len(p.requests) for p in prefill) == 4 and d.bootstrap_failures == 0


@pytest.mark.parametrize("stream", [False, True])
def test_local_round_hits_decode_only_with_the_sentinel_host(stream):
    async def main():
        async with SGLangHarness(policy="colocated") as h:
            status, out, headers = await h.chat(USER, session="s1", stream=stream)
            return status, out, headers, h.prefill[0].requests, h.decode[0].requests

    status, out, headers, p_reqs, (db,) = run(main())
    text = out if stream else out["choices"][0]["message"]["content"]
    assert status == 200 and text == expected(USER) and headers["x-ampd-route"] == "local"
    assert p_reqs == []
    assert db["bootstrap_host"] == AMPD_LOCAL_BOOTSTRAP_HOST and isinstance(db["bootstrap_room"], int)


def test_streaming_relay_counts_tokens_and_multi_round_session_stays_put():
    async def main():
        async with SGLangHarness(n_decode=2, policy="disagg") as h:
            msgs, seen = list(USER), []
            for _ in range(3):
                status, text, headers = await h.chat(msgs, session="conv", stream=True, max_tokens=5)
                assert status == 200 and text == expected(msgs, 5)
                seen.append(headers["x-ampd-decode"])
                msgs = msgs + [{"role": "assistant", "content": text}, {"role": "user", "content": "and then?"}]
            return seen, await h.metrics_text()

    seen, metrics = run(main())
    assert len(set(seen)) == 1
    assert "ampd_router_ttft_seconds" in metrics


def test_dead_prefill_worker_falls_back_to_local():
    async def main():
        async with SGLangHarness(policy="disagg", health_interval_s=30) as h:
            await h.prefill[0].stop()
            status, out, headers = await h.chat(USER, session="s")
            return status, out, headers, h.decode[0]

    status, out, headers, d = run(main())
    assert status == 200 and headers["x-ampd-route"] == "local"
    assert out["choices"][0]["message"]["content"] == expected(USER)
    assert d.requests[-1]["bootstrap_host"] == AMPD_LOCAL_BOOTSTRAP_HOST


def test_prefill_error_aborts_the_decode_wait_and_computes_locally():
    async def main():
        async with SGLangHarness(policy="disagg") as h:
            h.prefill[0].fail_status = 500
            status, out, _ = await h.chat(USER, session="s")
            return status, out, h.decode[0]

    status, out, d = run(main())
    assert status == 200 and out["choices"][0]["message"]["content"] == expected(USER)
    assert d.requests[-1]["bootstrap_host"] == AMPD_LOCAL_BOOTSTRAP_HOST


def test_prefill_failing_after_the_decode_answered_is_counted_and_the_stream_completes():
    async def main():
        async with SGLangHarness(policy="disagg") as h:
            h.prefill[0].late_failure_s = 0.2
            h.decode[0].token_delay = 0.06  # the stream is still running when the prefill fails
            status, text, headers = await h.chat(USER, session="s", stream=True)
            for _ in range(100):  # the prefill's failure arrives after the relay began
                if h.prefill[0].finished:
                    break
                await asyncio.sleep(0.02)
            await asyncio.sleep(0.05)
            return status, text, headers, h.decode[0], h.prefill[0], await h.metrics_text()

    status, text, headers, d, p, metrics = run(main())
    assert status == 200 and text == expected(USER) and headers["x-ampd-route"] == "remote"
    assert p.finished and d.arrivals[0] < p.finished[0]
    assert 'ampd_router_errors_total{kind="prefill_failed"} 1.0' in metrics


def test_config_validation_and_ports():
    base = RouterConfig(prefill=["http://127.0.0.1:1", "http://127.0.0.1:2"], decode=["http://127.0.0.1:3"])
    assert base.updated({"engine": "sglang"}).prefill_bootstrap_ports() == [8998, 8998]
    assert base.updated({"engine": "sglang", "bootstrap_ports": [9000]}).prefill_bootstrap_ports() == [9000, 9000]
    for bad in ({"engine": "tgi"}, {"bootstrap_ports": [9000]}, {"engine": "sglang", "bootstrap_ports": [1, 2, 3]},
                {"engine": "sglang", "bootstrap_ports": [70000, 1]}, {"engine": "sglang", "bootstrap_ports": 9000},
                {"engine": "sglang", "balanced_pd_share": 0.5}):
        with pytest.raises(ValueError):
            base.updated(bad).validate()


def test_cli_flags(tmp_path):
    runner = CliRunner()
    assert "--engine" in runner.invoke(route, ["--help"]).output
    assert "--bootstrap-port" in runner.invoke(route, ["--help"]).output
    bad = runner.invoke(route, ["--decode", "http://127.0.0.1:1", "--prefill", "http://127.0.0.1:2",
                                "--engine", "sglang", "--bootstrap-port", "x"])
    assert bad.exit_code == 2 and "expected a port number" in bad.output
    cfg = tmp_path / "r.yaml"
    cfg.write_text("engine: sglang\nbootstrap_ports: [9001]\ndecode: [http://127.0.0.1:1]\n")
    assert RouterConfig.from_yaml(cfg).engine == "sglang"


def test_kv_pressure_migration_becomes_a_local_prefill_on_the_new_decode_worker():
    async def main():
        async with SGLangHarness(n_decode=2, policy="colocated", decode_kv_tokens=400) as h:
            msgs = [{"role": "user", "content": "x " * 300}]
            _, out, h1 = await h.chat(msgs, session="m", max_tokens=8)
            first = h1["x-ampd-decode"]
            h.router.cluster.decode[first].kv_used_tokens = 390  # the worker fills up with other sessions
            msgs = msgs + [out["choices"][0]["message"], {"role": "user", "content": "go on"}]
            status, out2, h2 = await h.chat(msgs, session="m", max_tokens=8)
            new = h2["x-ampd-decode"]
            return first, new, status, out2, msgs, h.decode[int(new[-1])].requests[-1], h.prefill[0].requests

    first, new, status, out2, msgs, req, p_reqs = run(main())
    assert new != first and status == 200 and out2["choices"][0]["message"]["content"] == expected(msgs)
    assert req["bootstrap_host"] == AMPD_LOCAL_BOOTSTRAP_HOST and "kv_transfer_params" not in req
    assert p_reqs == []

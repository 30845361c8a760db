"""The demo's pure parts: router /metrics → local fraction and KV bytes, the side-by-side table, root check."""

import os
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner
from rich.console import Console

sys.path.insert(0, str(Path(__file__).parent))
from test_loadtest_locust import FakeOpenAI  # noqa: E402

from ampd_plugin import demo as demo_mod  # noqa: E402

METRICS = """# TYPE ampd_router_routes_total counter
ampd_router_routes_total{reason="alg1",route="local",worker="decode-0"} 3.0
ampd_router_routes_total{reason="alg1",route="remote",worker="prefill-0"} 1.0
ampd_router_kv_bytes_moved_total{kind="remote"} 1048576.0
ampd_router_kv_bytes_moved_total{kind="history_read"} 1024.0
"""


class MetricsServer(FakeOpenAI):
    async def metrics(self, request):
        from aiohttp import web

        return web.Response(text=METRICS)

    def _run(self):
        import asyncio

        from aiohttp import web

        asyncio.set_event_loop(self._loop)
        app = web.Application()
        app.router.add_get("/metrics", self.metrics)
        runner = web.AppRunner(app)
        self._loop.run_until_complete(runner.setup())
        self._loop.run_until_complete(web.TCPSite(runner, "127.0.0.1", self.port).start())
        self._ready.set()
        self._loop.run_forever()


def test_router_numbers_from_metrics():
    server = MetricsServer().start()
    try:
        local, kv = demo_mod.router_numbers(server.url)
    finally:
        server.stop()
    assert local == pytest.approx(0.75) and kv == 1048576 + 1024


def test_router_numbers_when_router_is_gone():
    from ampd_plugin.localcluster import free_port

    assert demo_mod.router_numbers(f"http://127.0.0.1:{free_port()}") == (None, None)


def test_table_renders_side_by_side():
    console = Console(record=True, width=200)
    results = [demo_mod.PolicyResult("ampd", 0.95, 0.8, 0.1, 0.5, 0.02, 0.04, 40, 0, 0.6, 2**21),
               demo_mod.PolicyResult("disagg", failure="router exited with 1")]
    demo_mod.print_table(results, console, "t")
    text = console.export_text()
    assert "95.0 %" in text and "2.0 MiB" in text and "disagg: router exited with 1" in text


@pytest.mark.skipif(os.geteuid() == 0, reason="checks the message non-root users get")
def test_non_root_gets_a_clear_message():
    res = CliRunner().invoke(demo_mod.demo, [])
    assert res.exit_code != 0 and "needs root" in res.output


def test_repeated_runs_show_median_and_range():
    console = Console(record=True, width=200)
    results = [demo_mod.PolicyResult("ampd", attainment=a, run=i) for i, a in enumerate((0.9, 0.5, 0.7))]
    demo_mod.print_table(results, console, "t")
    text = console.export_text()
    assert "70.0 % (50.0 %–90.0 %)" in text and "over 3 runs" in text


def test_policy_specs_carry_router_params_and_are_checked_up_front():
    import click
    import pytest

    from ampd_plugin.demo import check_policy_spec, split_policy_spec

    assert split_policy_spec("ampd") == ("ampd", [])
    assert split_policy_spec("ampd:itl_aware=true:predictive=true") == ("ampd", ["itl_aware=true", "predictive=true"])
    check_policy_spec("ampd:itl_aware=true:predictive=true")
    check_policy_spec("colocated")
    assert split_policy_spec("ampd*") == ("ampd", ["predictive=true", "itl_aware=true"])
    check_policy_spec("ampd*")
    for bad in ("nosuchpolicy", "ampd:nosuchparam=1", "ampd:itl_aware"):
        with pytest.raises(click.BadParameter):
            check_policy_spec(bad)

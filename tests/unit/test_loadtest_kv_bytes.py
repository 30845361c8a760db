"""The load test's "KV bytes" figure: from per-round headers when a server sends them, else from the
router's /metrics counter before/after the test, with its source recorded; None for servers without it."""

from __future__ import annotations

import http.server
import threading

import pytest

from ampd_plugin.loadtest.report import add_router_kv_bytes
from ampd_plugin.loadtest.where import router_kv_bytes

METRICS = b"""# HELP ampd_router_kv_bytes_moved_total KV bytes
ampd_router_kv_bytes_moved_total{plan="remote"} 4096.0
ampd_router_kv_bytes_moved_total{plan="history_read"} 1024.0
ampd_router_rounds_total{first="true"} 3.0
"""


@pytest.fixture
def server():
    body = {"text": METRICS}

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802
            self.send_response(200)
            self.end_headers()
            self.wfile.write(body["text"])

        def log_message(self, *args):
            pass

    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{srv.server_address[1]}", body
    srv.shutdown()
    srv.server_close()


def test_router_counter_is_read_and_summed(server):
    url, body = server
    assert router_kv_bytes(url) == 5120.0
    body["text"] = b'ampd_router_rounds_total{first="true"} 3.0\n'  # our router, nothing moved yet
    assert router_kv_bytes(url) == 0.0
    body["text"] = b"vllm:num_requests_running 0\n"  # an engine or vllm-router: no such counter
    assert router_kv_bytes(url) is None


def test_unreachable_server_gives_none():
    from ampd_plugin.localcluster import free_port

    assert router_kv_bytes(f"http://127.0.0.1:{free_port()}") is None


def report(kv=0):
    return {"summary": {"kv_bytes_moved": kv}, "meta": {}}


def test_delta_of_the_router_counter_fills_the_figure():
    r = report()
    add_router_kv_bytes(r, 1000.0, 5120.0)
    assert r["router_kv_bytes_moved"] == 4120 and "router /metrics" in r["meta"]["kv_bytes_source"]
    assert r["summary"]["kv_bytes_moved"] == 0  # the summary stays what the records say


def test_headers_win_and_missing_counters_are_said():
    r = report(300)
    add_router_kv_bytes(r, 0.0, 9999.0)
    assert r["summary"]["kv_bytes_moved"] == 300 and "headers" in r["meta"]["kv_bytes_source"]
    r = report()
    add_router_kv_bytes(r, None, None)
    assert r["router_kv_bytes_moved"] is None and r["meta"]["kv_bytes_source"] == "not reported by this server"

"""SGLang PD wire bodies built from a routing decision (no SGLang needed)."""

import random

import pytest

from ampd_plugin.connector.sglang.wire import (
    AMPD_LOCAL_BOOTSTRAP_HOST,
    MAX_BOOTSTRAP_ROOM,
    SGLANG_DEFAULT_BOOTSTRAP_PORT,
    is_local_prefill_request,
)
from ampd_plugin.router.sglang_wire import (
    SGLangPrefillEndpoint,
    bodies_for_route,
    bootstrap_host_of,
    local_prefill_body,
    new_bootstrap_room,
    remote_prefill_bodies,
)
from ampd_plugin.router_policy.state import Route

CHAT = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "stream": True}


def test_remote_sends_same_bootstrap_fields_to_both():
    plan = remote_prefill_bodies(CHAT, SGLangPrefillEndpoint("http://127.0.0.1:30000", 9001), room=42)
    assert plan.prefill_body == plan.decode_body
    assert plan.prefill_body is not plan.decode_body
    assert plan.decode_body["bootstrap_host"] == "127.0.0.1"
    assert plan.decode_body["bootstrap_port"] == 9001
    assert plan.decode_body["bootstrap_room"] == 42
    assert plan.prefill_url == "http://127.0.0.1:30000"
    assert not plan.is_local
    # the caller's body is not modified
    assert "bootstrap_room" not in CHAT


def test_local_goes_to_decode_only_with_sentinel():
    plan = local_prefill_body(CHAT, room=7)
    assert plan.is_local and plan.prefill_body is None
    assert plan.decode_body["bootstrap_host"] == AMPD_LOCAL_BOOTSTRAP_HOST
    assert plan.decode_body["bootstrap_room"] == 7
    assert plan.decode_body["bootstrap_port"] == SGLANG_DEFAULT_BOOTSTRAP_PORT
    assert is_local_prefill_request(plan.decode_body["bootstrap_host"])
    assert not is_local_prefill_request("127.0.0.1")
    assert not is_local_prefill_request(None)


def test_batched_generate_gets_lists_with_distinct_rooms():
    body = {"text": ["a", "b", "c"], "sampling_params": {"max_new_tokens": 4}}
    plan = remote_prefill_bodies(body, SGLangPrefillEndpoint("http://10.0.0.5:1"), room=MAX_BOOTSTRAP_ROOM)
    assert plan.decode_body["bootstrap_host"] == ["10.0.0.5"] * 3
    assert plan.decode_body["bootstrap_port"] == [SGLANG_DEFAULT_BOOTSTRAP_PORT] * 3
    rooms = plan.decode_body["bootstrap_room"]
    assert len(set(rooms)) == 3 and all(0 <= r <= MAX_BOOTSTRAP_ROOM for r in rooms)
    single_ids = remote_prefill_bodies({"input_ids": [1, 2, 3]}, SGLangPrefillEndpoint("127.0.0.1:1"), room=1)
    assert single_ids.decode_body["bootstrap_room"] == 1  # a flat id list is one prompt


def test_route_dispatch_and_errors():
    endpoints = {"p0": SGLangPrefillEndpoint("http://127.0.0.1:30000")}
    remote = bodies_for_route(Route("remote", "p0"), CHAT, endpoints, room=3)
    assert remote.prefill_url == "http://127.0.0.1:30000" and remote.bootstrap_room == 3
    local = bodies_for_route(Route("local", "d0"), CHAT, endpoints, room=4)
    assert local.is_local
    with pytest.raises(ValueError, match="unknown prefill worker 'p9'.*p0"):
        bodies_for_route(Route("remote", "p9"), CHAT, endpoints)
    with pytest.raises(ValueError, match="bootstrap_room"):
        local_prefill_body(CHAT, room=-1)
    with pytest.raises(ValueError, match="bootstrap_room"):
        local_prefill_body(CHAT, room=2**63)


def test_hosts_and_rooms():
    assert bootstrap_host_of("http://[::1]:8000") == "[::1]"
    assert bootstrap_host_of("127.0.0.1:8000") == "127.0.0.1"
    assert bootstrap_host_of("https://prefill-0.svc:443") == "prefill-0.svc"
    for bad in ("http://", "http://h:1/v1", "h"):
        with pytest.raises(ValueError):
            bootstrap_host_of(bad)
    a = new_bootstrap_room(random.Random(0))
    assert a == new_bootstrap_room(random.Random(0)) and 0 <= a <= MAX_BOOTSTRAP_ROOM

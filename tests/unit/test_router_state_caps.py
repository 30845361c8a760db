"""The router's tables are bounded: a session cap (least recently used idle session forgotten), a cap on the
prompt text kept (oldest sessions keep digests instead), and every bound exported in /metrics."""

import pytest
from router_fakes import RouterHarness, run

from ampd_plugin.router.history import reusable_tokens
from ampd_plugin.router.sessions import PromptCounter, SessionStore, SessionTableFull

USER = [{"role": "user", "content": "hello there"}]


def _named(store, sid, text=""):
    s = store.get(sid, True, admit=False)
    PromptCounter.remember(s, text, len(text) // 4)
    store.admit(s)
    return s


def test_the_least_recently_used_idle_session_makes_room():
    gone = []
    store = SessionStore(ttl_s=60, max_sessions=3)
    store.on_evict = gone.append
    a, b, c = (_named(store, sid) for sid in "abc")
    store.get("a", True)  # a is used again: b is now the oldest
    b.busy = True  # ... but mid-round, so c goes
    _named(store, "d")
    assert [s.session_id for s in gone] == ["c"] and len(store) == 3 and store.evicted == 1
    a.busy = store.peek("d").busy = True  # every remembered session mid-round: a new one is refused
    with pytest.raises(SessionTableFull):
        _named(store, "e")


def test_the_text_cap_keeps_digests_and_the_history_is_still_reused():
    store = SessionStore(ttl_s=60, max_text_chars=1000)
    old = _named(store, "old", "x" * 600)
    old.last_output = "y" * 100
    _named(store, "new", "z" * 600)  # 1300 > 1000: the oldest session's texts become digests
    assert old.last_text == "" and old.remote_prefix[0] == 600 and store.shed == 1
    assert store.stored_chars() == 600
    counter = PromptCounter(None)
    # the next round extends what the worker holds: all of it reusable, counted from the digest's tokens
    assert reusable_tokens(old, "x" * 600 + "y" * 100 + "more", counter) is None
    assert counter.count("x" * 600 + "more", old, remember=False) == 150 + 1
    assert reusable_tokens(old, "rewritten", counter) == 0


def test_caps_and_ttls_are_in_metrics_and_an_evicted_session_still_gets_served():
    async def main():
        async with RouterHarness(n_decode=1, policy="colocated", max_sessions=3, session_ttl_s=900) as h:
            for i in range(5):
                assert (await h.chat(USER, session=f"s{i}"))[0] == 200
            again = await h.chat(USER + [{"role": "user", "content": "back"}], session="s0")  # was forgotten
            return again, await h.metrics_text(), len(h.router.cluster.bindings)

    again, metrics, bindings = run(main())
    assert again[0] == 200 and bindings <= 3
    assert "ampd_router_sessions 3.0" in metrics
    assert 'ampd_router_state_evictions_total{table="sessions"} 3.0' in metrics
    assert 'ampd_router_state_limit{kind="cap",table="sessions"} 3.0' in metrics
    assert 'ampd_router_state_limit{kind="ttl_seconds",table="sessions"} 900.0' in metrics
    for table in ("prompt_text", "bindings", "residency", "request_body", "request_head"):
        assert f'table="{table}"' in metrics

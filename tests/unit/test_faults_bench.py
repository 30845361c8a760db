"""benchmarks/faults.py at a small N: a real router process, 300 hostile requests, no 5xx, no hang, no crash."""

from __future__ import annotations

import importlib.util
import json
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
spec = importlib.util.spec_from_file_location("faults_bench", REPO / "benchmarks" / "faults.py")
faults = importlib.util.module_from_spec(spec)
sys.modules[spec.name] = faults
spec.loader.exec_module(faults)


@pytest.fixture(scope="module")
def result(tmp_path_factory):
    out = tmp_path_factory.mktemp("faults") / "faults.json"
    t0 = time.monotonic()
    code = faults.main(["--hostile", "300", "--seed", "1", "--bystander-seconds", "2", "--json", str(out)])
    return code, json.loads(out.read_text()), time.monotonic() - t0


def test_hostile_input_gets_no_5xx_and_the_router_survives(result):
    _, r, wall = result
    assert wall < 60
    assert r["requests"] == 300 and set(r["by_case"]) == set(faults.cases(None, None))  # every case ran
    assert r["n_5xx"] == 0 and r["n_hung"] == 0
    assert r["router_alive"] and r["health_after"] == 200 and r["router_log_errors"] == []
    assert r["by_case"]["valid_3_rounds"] == {"200": sum(r["by_case"]["valid_3_rounds"].values())}
    assert r["by_case"]["slowloris"].keys() <= {"408"}  # cut off within client_header_timeout_s
    assert r["state_after"]["ampd_router_rounds_in_flight"] == 0
    assert r["unexpected"] == {}  # every case got what the router's contract says (EXPECT)
    # Hostile requests leave no session behind: only the valid conversations are remembered.
    grown = r["state_after"]["ampd_router_sessions"] - r["state_before"]["ampd_router_sessions"]
    assert grown <= sum(r["by_case"]["valid_3_rounds"].values())


def test_the_bystander_stream_is_timed_in_every_phase_and_always_exact(result):
    """The stall figures come from real token gaps (a stream that stalled would show, a wrong relay fails)."""
    _, r, _ = result
    assert set(r["stalls"]) == {"quiet", "benign", "hostile"}
    for st in r["stalls"].values():
        assert st["gaps"]["n"] > 100 and st["answers"].keys() == {"exact"}  # a phase of 2 s holds a whole answer
        assert 0 <= st["gaps"]["p50"] <= st["gaps"]["p99"] <= st["gaps"]["max"]
    assert r["stalls"]["benign"]["load"].keys() == {"200"}
    assert r["state_before"]["ampd_router_sessions"] > 0  # the benign load really ran through the router


def test_a_valid_40kb_request_sent_in_one_write_succeeds(result):
    """Head and a body larger than max_header_bytes in one read: the body never counts as head."""
    code, r, _ = result
    assert r["by_case"]["valid_40KB_one_write"] == {"200": sum(r["by_case"]["valid_40KB_one_write"].values())}
    assert code == 0


def test_a_short_soak_leaves_no_state_and_fails_no_round(tmp_path):
    """The soak mode end to end on a real router process, shortened: every round exact, tables empty after
    one session TTL of idleness (RSS growth over 15 s is not meaningful; the long run is in docs/)."""
    out = tmp_path / "soak.json"
    t0 = time.monotonic()
    faults.main(["--soak", "0.25", "--session-ttl", "3", "--rate", "40", "--json", str(out)])
    r = json.loads(out.read_text())
    assert time.monotonic() - t0 < 60
    assert r["failed"] == {} and r["rounds_ok"] > 100 and r["router_alive"]
    assert r["state_idle"] == {"ampd_router_sessions": 0.0, "ampd_router_bindings": 0.0,
                               "ampd_router_stored_prompt_chars": 0.0, "ampd_router_rounds_in_flight": 0.0}
    assert len(r["samples"]) >= 2 and all(s["rss_kib"] for s in r["samples"])

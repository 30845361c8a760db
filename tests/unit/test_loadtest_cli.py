"""`ampd-plugin loadtest`: command construction, option checks, a run and a sweep against the fake server."""

import json
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

sys.path.insert(0, str(Path(__file__).parent))
from test_loadtest_locust import FakeOpenAI  # noqa: E402

from ampd_plugin.loadtest_cli import LoadTestSpec, locust_command, loadtest, run_loadtest, run_sweep  # noqa: E402


@pytest.fixture(scope="module")
def fake_server():
    server = FakeOpenAI().start()
    yield server
    server.stop()


def test_command_carries_every_option():
    spec = LoadTestSpec(host="http://127.0.0.1:1", trace="t.jsonl", sessions=5, session_rate=0.3, duration_s=90,
                        ttft_slo=1.5, itl_slo=0.2, slo_target=0.8, seed=4, report_dir="out", model="m")
    cmd = locust_command(spec, users=5)
    joined = " ".join(cmd)
    for part in ("--trace t.jsonl", "--sessions 5", "--session-rate 0.3", "--run-time 90s", "--ttft-slo 1.5",
                 "--itl-slo 0.2", "--slo-target 0.8", "--seed 4", "--report-dir out", "--model m", "-u 5",
                 "--headless"):
        assert part in joined
    assert "--workload" not in cmd and "--master" not in cmd
    assert "--master" in locust_command(LoadTestSpec(host="h", workers=2), users=1, master_port=5557)


def test_bad_workload_and_rates_are_clear_errors():
    runner = CliRunner()
    res = runner.invoke(loadtest, ["--host", "http://127.0.0.1:1", "--workload", "nope"])
    assert res.exit_code == 2 and "unknown workload" in res.output
    res = runner.invoke(loadtest, ["--host", "http://127.0.0.1:1", "--sweep", "1,x"])
    assert res.exit_code == 2 and "comma-separated" in res.output


def _spec(server, out, **kw):
    return LoadTestSpec(host=server.url, workload="hotpotqa", sessions=4, session_rate=4, duration_s=60,
                        ttft_slo=1.0, itl_slo=0.5, report_dir=str(out), input_scale=0.02, output_scale=0.05, **kw)


def test_run_returns_report(fake_server, tmp_path):
    code, report = run_loadtest(_spec(fake_server, tmp_path), quiet=True)
    assert code == 0 and report["summary"]["rounds"] == 12 and report["passed"]


def test_sweep_gives_goodput_and_plot(fake_server, tmp_path):
    result = run_sweep(_spec(fake_server, tmp_path), [2.0, 8.0], quiet=True)
    assert [p["rate"] for p in result["points"]] == [2.0, 8.0]
    assert result["goodput"] == 8.0  # the fake server is never overloaded
    assert (tmp_path / "sweep.png").stat().st_size > 0
    assert json.loads((tmp_path / "sweep.json").read_text())["goodput"] == 8.0
    assert (tmp_path / "rate-2" / "report.json").exists()

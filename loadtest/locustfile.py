"""Locust entry point for ampd-plugin's multi-round SLO load test.

    locust -f loadtest/locustfile.py --headless --host http://127.0.0.1:8000 \
        --workload toolbench --sessions 20 --session-rate 0.5 -u 20 -r 20 \
        --ttft-slo 2 --itl-slo 0.1 --slo-target 0.9 --report-dir out/

The implementation is the installed package (`ampd_plugin.loadtest`), so this file also works from a
plain `pip install ampd-plugin[loadtest]` via `locust -f $(python -m ampd_plugin.loadtest.where)`.
"""

from ampd_plugin.loadtest.locustfile import MultiRoundSessionUser  # noqa: F401  (Locust finds the user here)

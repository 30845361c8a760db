"""Multi-round Locust load test: sessions, streaming TTFT/ITL measurement, records, SLO report."""

from pathlib import Path

LOCUSTFILE = Path(__file__).with_name("locustfile.py")

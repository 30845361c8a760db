"""Raw per-round records of one Locust process, and their merge on the master in distributed mode.

Locust's own statistics bucket response times (to 10 ms above 100 ms, 100 ms above 1 s), too coarse to
judge an SLO per round, and they cannot be re-split by session or round index. So every process keeps
its raw records; workers send theirs to the master (a custom Locust message) when they stop, and the
master merges them. A worker may send its list more than once (on stop and again when the master asks),
so the master keeps the latest list per worker — merging is idempotent.
"""

from __future__ import annotations

import threading
from dataclasses import fields

from ampd_plugin.loadtest.session import LoadRecord

_FIELDS = {f.name for f in fields(LoadRecord)}


def record_from_dict(data: dict) -> LoadRecord:
    """Rebuild a record from its dict form, ignoring unknown keys (a newer worker) and NaN sent as None."""
    kw = {k: v for k, v in data.items() if k in _FIELDS}
    if kw.get("ttft") is None:
        kw["ttft"] = float("nan")
    return LoadRecord(**kw)


class RecordStore:
    """This process's records plus, on a master, the latest list received from each worker."""

    def __init__(self) -> None:
        self._local: list[LoadRecord] = []
        self._remote: dict[str, list[LoadRecord]] = {}
        self._lock = threading.Lock()

    def add(self, record: LoadRecord) -> None:
        with self._lock:
            self._local.append(record)

    def clear(self) -> None:
        with self._lock:
            self._local.clear()
            self._remote.clear()

    def local_payload(self) -> list[dict]:
        """This process's records, ready for a Locust message (plain dicts, msgpack-safe)."""
        with self._lock:
            return [r.to_dict() for r in self._local]

    def merge(self, source: str, payload: list[dict]) -> None:
        """Store a worker's full list (replacing any earlier list from the same worker)."""
        records = [record_from_dict(d) for d in payload]
        with self._lock:
            self._remote[source] = records

    @property
    def sources(self) -> set[str]:
        with self._lock:
            return set(self._remote)

    def all(self) -> list[LoadRecord]:
        with self._lock:
            merged = list(self._local)
            for records in self._remote.values():
                merged.extend(records)
        return sorted(merged, key=lambda r: (r.start, r.session_id, r.round_index))

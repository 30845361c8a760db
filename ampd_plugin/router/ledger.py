"""The KV ledger: which decode worker holds which session's KV, and how many tokens of it.

Two views must agree: each `Session` remembers its `resident_worker`/`resident_tokens` (the next round's
`l_hist`), and each decode `WorkerState.kv_used_tokens` sums what its sessions hold (what policies and
migration read). Every change of residency goes through here, so the two cannot drift apart.
"""

from __future__ import annotations

from ampd_plugin.router.sessions import Session, SessionStore
from ampd_plugin.router_policy.state import ClusterState


class KVLedger:
    def __init__(self, cluster: ClusterState, sessions: SessionStore) -> None:
        self.cluster = cluster
        self.sessions = sessions

    def settle(self, s: Session, worker_id: str | None, tokens: int) -> None:
        """After a round: `s` now holds `tokens` on `worker_id` (None: nothing is kept anywhere)."""
        self._drop(s)
        if worker_id is None:
            s.resident_tokens, s.resident_worker = 0, None
            return
        s.resident_tokens, s.resident_worker = tokens, worker_id
        self.cluster.decode[worker_id].kv_used_tokens += tokens

    def forget(self, s: Session) -> None:
        """An expired session: its KV no longer counts and its binding goes."""
        self._drop(s)
        self.cluster.unbind_session(s.session_id)

    def worker_lost(self, worker_id: str) -> list[str]:
        """A decode worker died: its sessions lose their history and binding; returns the unbound sessions."""
        lost = self.cluster.unbind_worker(worker_id)
        self.sessions.on_worker_lost(worker_id)
        self.cluster.decode[worker_id].kv_used_tokens = 0
        return lost

    def _drop(self, s: Session) -> None:
        if s.resident_worker and s.resident_worker in self.cluster.decode:
            w = self.cluster.decode[s.resident_worker]
            w.kv_used_tokens = max(0, w.kv_used_tokens - s.resident_tokens)

"""Who may steer an engine's KV memory: the cluster secret, signed descriptors and notices, known peers.

A connector can make an engine read another engine's memory (a source descriptor), release its pins
early (a "done" notice), keep them longer (a "renew" notice) or POST prompt token ids to another server
(``history.from``). All of these travel over addresses any cluster member can reach, so:

- One **cluster secret** (``AMPD_CLUSTER_SECRET``, or a file named by ``AMPD_CLUSTER_SECRET_FILE``) is
  shared by every engine. It is read from the environment only, never logged, never put on a command line.
- With a secret, a holder **HMAC-signs** each descriptor it hands out, a reader refuses one that is unsigned
  or altered, ZMQ notices carry a MAC, a nonce and an expiry (a replayed or stale notice is refused), and a
  history export is answered only for a caller that proves it knows the secret.
- ``history.from`` is fetched only from **known peers** (`PeerAllowList`): the URLs listed in
  ``kv_connector_extra_config.peers``, or — when none are listed — this host's own addresses (single host).

Without a secret everything still works on a single host (signatures are neither made nor checked); the
connector says so at start-up.
"""

from __future__ import annotations

import collections
import hashlib
import hmac
import json
import os
import secrets
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

from ampd_plugin.connector.params import SourceDescriptor, WorkerAddress, prompt_fingerprint

SECRET_ENV = "AMPD_CLUSTER_SECRET"
SECRET_FILE_ENV = "AMPD_CLUSTER_SECRET_FILE"
MIN_SECRET_BYTES = 16
NOTICE_TTL_S = 30.0
"""A notice is valid this long after it was made (and is remembered that long to refuse its replay)."""
EXPORT_TOKEN_TTL_S = 120.0
MAX_NOTICE_RANKS = 256
"""A reader has at most this many tensor-parallel ranks (bounds what a holder tracks per transfer)."""
REPLAY_CAPACITY = 65536
"""Nonces remembered at most; when full of unexpired nonces, new notices are refused (fail closed)."""


class AuthError(ValueError):
    """A descriptor, notice or export request failed authentication; the text says why (never the secret)."""


def load_secret(environ: Mapping[str, str] | None = None) -> bytes | None:
    """The cluster secret from the environment, or ``None`` (unauthenticated single-host mode)."""
    env = os.environ if environ is None else environ
    raw = env.get(SECRET_ENV)
    path = env.get(SECRET_FILE_ENV)
    if raw and path:
        raise ValueError(f"set either {SECRET_ENV} or {SECRET_FILE_ENV}, not both")
    if path:
        try:
            raw = Path(path).read_text().strip()
        except OSError as exc:
            raise ValueError(f"{SECRET_FILE_ENV}={path}: cannot read the cluster secret ({exc.strerror})") from None
    if not raw:
        return None
    secret = raw.encode()
    if len(secret) < MIN_SECRET_BYTES:
        raise ValueError(f"the cluster secret must be at least {MIN_SECRET_BYTES} bytes "
                         f"(e.g. `python -c 'import secrets; print(secrets.token_hex(32))'`)")
    return secret


def _canonical(d: Mapping[str, Any]) -> bytes:
    return json.dumps(d, sort_keys=True, separators=(",", ":")).encode()


class ClusterAuth:
    """HMAC signing and checking with the cluster secret (a no-op verifier when there is none)."""

    def __init__(self, secret: bytes | None, clock: Callable[[], float] = time.time,
                 replay_capacity: int = REPLAY_CAPACITY):
        self._secret = secret
        self._clock = clock
        self._seen: collections.OrderedDict[str, float] = collections.OrderedDict()  # nonce -> expiry
        self._capacity = replay_capacity

    @property
    def enabled(self) -> bool:
        return self._secret is not None

    def _mac(self, domain: str, payload: bytes) -> str:
        assert self._secret is not None
        return hmac.new(self._secret, domain.encode() + b"\0" + payload, hashlib.sha256).hexdigest()

    # ------------------------------------------------------------------------------- descriptors
    def sign_source(self, src: SourceDescriptor) -> SourceDescriptor:
        """``src`` with ``sig`` set (unchanged without a secret)."""
        if not self.enabled:
            return src
        body = src.to_dict()
        body.pop("sig", None)
        return SourceDescriptor.from_dict({**body, "sig": self._mac("source", _canonical(body))})

    def verify_source(self, src: SourceDescriptor) -> None:
        """Raise `AuthError` unless ``src`` was signed with our secret (accepts anything without a secret)."""
        if not self.enabled:
            return
        if not src.sig:
            raise AuthError("the source descriptor is unsigned but this cluster requires signed descriptors")
        body = src.to_dict()
        body.pop("sig", None)
        if not hmac.compare_digest(src.sig, self._mac("source", _canonical(body))):
            raise AuthError("the source descriptor's signature is invalid (forged or altered)")

    # ------------------------------------------------------------------------------ export calls
    def export_token(self, xfer: str, token_ids: list[int]) -> dict[str, Any] | None:
        """Proof for a history export request that the caller holds the secret (``None`` without one)."""
        if not self.enabled:
            return None
        exp = round(self._clock() + EXPORT_TOKEN_TTL_S, 3)
        return {"exp": exp, "mac": self._mac("export", _canonical([xfer, prompt_fingerprint(token_ids), exp]))}

    def verify_export(self, token: Any, xfer: str, token_ids: list[int]) -> None:
        """Raise `AuthError` unless ``token`` proves an authenticated, fresh, first-time export of this prompt."""
        if not self.enabled:
            return
        if not isinstance(token, Mapping) or not isinstance(token.get("mac"), str) or \
                not isinstance(token.get("exp"), (int, float)):
            raise AuthError("export refused: the request is not authenticated (no cluster-secret token)")
        expected = self._mac("export", _canonical([xfer, prompt_fingerprint(token_ids), token["exp"]]))
        if not hmac.compare_digest(token["mac"], expected):
            raise AuthError("export refused: invalid authentication token")
        self._check_fresh(f"export:{xfer}", float(token["exp"]), EXPORT_TOKEN_TTL_S)

    # ----------------------------------------------------------------------------------- notices
    def notice(self, kind: str, xfer: str, rank: int = 0, of: int = 1) -> bytes:
        """A "done"/"renew" notice for the holder of ``xfer``; signed and single-use with a secret. A reader
        with tensor parallelism sends one "done" per rank (``rank`` of ``of``): the holder unpins after all."""
        body = {"k": kind, "xfer": xfer, "n": secrets.token_hex(12), "exp": round(self._clock() + NOTICE_TTL_S, 3)}
        if of != 1 or rank != 0:
            body.update(r=rank, of=of)
        if self.enabled:
            body["mac"] = self._mac("notice", _canonical(body))
        return json.dumps(body).encode()

    def check_notice(self, raw: bytes) -> tuple[str, str]:
        """(kind, xfer) of a notice, or `AuthError` (malformed, unsigned, forged, expired or replayed)."""
        kind, xfer, _, _ = self.read_notice(raw)
        return kind, xfer

    def read_notice(self, raw: bytes) -> tuple[str, str, int, int]:
        """(kind, xfer, rank, of) of a notice, or `AuthError` (as `check_notice`)."""
        try:
            body = json.loads(raw)
            kind, xfer, nonce, exp = body["k"], body["xfer"], body["n"], body["exp"]
            rank, of = body.get("r", 0), body.get("of", 1)
        except (ValueError, KeyError, TypeError, AttributeError):
            raise AuthError("malformed notice") from None
        if kind not in ("done", "renew") or not isinstance(xfer, str) or not isinstance(nonce, str) \
                or not isinstance(exp, (int, float)):
            raise AuthError("malformed notice")
        if isinstance(rank, bool) or isinstance(of, bool) or not isinstance(rank, int) or not isinstance(of, int) \
                or not 0 <= rank < of <= MAX_NOTICE_RANKS:
            raise AuthError("malformed notice (rank)")
        if self.enabled:
            mac = body.pop("mac", None)
            if not isinstance(mac, str):
                raise AuthError("unsigned notice refused")
            if not hmac.compare_digest(mac, self._mac("notice", _canonical(body))):
                raise AuthError("notice with an invalid signature refused")
        self._check_fresh(nonce, float(exp), NOTICE_TTL_S)
        return kind, xfer, rank, of

    def _check_fresh(self, nonce: str, exp: float, ttl_s: float) -> None:
        now = self._clock()
        if exp < now:
            raise AuthError("expired notice/token refused")
        if exp > now + ttl_s + 5.0:
            raise AuthError("notice/token valid too far into the future refused")
        while self._seen:  # expiries are added in about increasing order
            oldest, oldest_exp = next(iter(self._seen.items()))
            if oldest_exp >= now:
                break
            del self._seen[oldest]
        if nonce in self._seen:
            raise AuthError("replayed notice/token refused")
        if len(self._seen) >= self._capacity:
            raise AuthError("too many recent notices; refused (the holder's TTL still releases its pins)")
        self._seen[nonce] = exp

    def replay_entries(self) -> int:
        return len(self._seen)


class PeerAllowList:
    """Which ``history.from`` URLs this engine may call (it POSTs prompt token ids there)."""

    def __init__(self, peers: Iterable[str] = (), own_hosts: Iterable[str] = ()):
        self.peers = frozenset(WorkerAddress.parse(p).format() for p in peers)
        self.own_hosts = frozenset({"127.0.0.1", "localhost", "::1", *own_hosts})

    def check(self, addr: WorkerAddress) -> None:
        """Raise `AuthError` unless ``addr`` is a known peer."""
        if self.peers:
            if addr.format() not in self.peers:
                raise AuthError(f"{addr} is not a known peer (kv_connector_extra_config.peers lists "
                                f"{len(self.peers)} URLs)")
        elif addr.host not in self.own_hosts:
            raise AuthError(f"{addr} is not on this host; list remote peers in kv_connector_extra_config.peers")

"""The one schema of `kv_transfer_params` between the AMPD router and the `ampd` KV connector.

vLLM copies the request field `kv_transfer_params` into the engine request, and whatever the connector
returns from `request_finished` comes back as the response's top-level `kv_transfer_params`. Our part of
that dict lives under the single key ``"ampd"`` so it can sit next to other connectors' keys.

Every transfer is a **READ by the worker that needs the KV** from a worker that holds it (Mooncake
`batch_transfer_sync_read` into the reader's own blocks). One primitive serves every flow:

=====================  ==========================================  =========================================
flow                   request to the prefill worker P             request to the decode worker D
=====================  ==========================================  =========================================
a  round-1 remote      ``remote_prefill_params(xfer)``,            ``decode_params(P's response params)``,
   prefill             ``max_tokens=1``; P holds its blocks and    streamed; D reads the blocks it lacks from
                       answers with a *source* descriptor          P, then decodes
a' partial remote      same, but the prompt cut to its first k     same; D reads P's k tokens and computes the
   prefill             tokens (token ids)                          rest itself
b  local incremental   —                                           ``local_params(session=...)`` (or nothing):
                                                                   D's prefix cache holds the history
c  remote incremental  ``remote_prefill_params(xfer,               ``decode_params(P's response params)``:
                       history_from=D.url, history_tokens=l)``:    D keeps its own history blocks and reads
                       P asks D to *export* the history blocks,    only the increment from P
                       reads them, computes only the new tokens
migrate                —                                           to the new decode worker D2:
                                                                   ``migrate_params(xfer, history_from=D1.url,
                                                                   history_tokens=l)``; D2 reads the history
                                                                   from D1, computes the rest, decodes
=====================  ==========================================  =========================================

**Worker addresses.** A worker is named by its OpenAI HTTP base URL, e.g. ``http://127.0.0.1:8010`` —
the same string the router is given with ``--prefill``/``--decode``. Its transfer side channel (the
Mooncake RPC port and the ZMQ port that receives "done reading" notices) is chosen at run time and is
never configured in the router: it travels inside the *source descriptor* that a holding worker returns
in its response. For a history read, the reading worker itself calls the holder's
``POST /v1/completions`` with ``export_params`` (the exact history token ids, ``max_tokens=1``) and gets
the descriptor back; so the router only needs the holder's URL (``WorkerAddress``).

**Retention.** A decode request that names a ``session`` keeps its blocks pinned after it finishes (TTL
from the connector config), so the next round's prefix is still there; the pin is released by the next
request of the same session, by ``retain=False`` (session end), by the TTL or under memory pressure.

Responses: a worker answers with ``{"ampd": {"source": {...}?, "stats": {...}, "error": "..."?}}`` —
read them with ``response_source``, ``response_stats`` and ``response_error``.

Malformed ``ampd`` params never crash an engine: the connector computes the request locally (always
correct) and reports the ``ParamsError`` text as ``response_error``.
"""

from __future__ import annotations

import dataclasses
import uuid
from typing import Any, Mapping
from urllib.parse import urlsplit

KEY = "ampd"
"""The key of our sub-dict inside ``kv_transfer_params``."""

VERSION = 1
"""Schema version carried as ``"v"``; bump on incompatible changes."""

ROLES = ("prefill", "decode", "local", "export")
"""``prefill``: compute the prompt (reading ``history`` first if given), hold the blocks, answer with a
source descriptor (``max_tokens=1``). ``decode``: read what ``source``/``history`` holds beyond the local
prefix-cache hit, compute the rest, decode. ``local``: no transfer. ``export``: internal — hold the
prompt's blocks (which the prefix cache already has) and answer with a source descriptor."""


class ParamsError(ValueError):
    """Malformed ``kv_transfer_params``; the message names the offending field."""


# --------------------------------------------------------------------------------------------- addresses
@dataclasses.dataclass(frozen=True)
class WorkerAddress:
    """An engine as the router and the connector name it: its HTTP base URL (scheme, host, port).

    ``parse("http://127.0.0.1:8010")`` and ``parse("127.0.0.1:8010")`` give the same address;
    ``format()`` gives the canonical ``http://host:port`` used in params.
    """

    host: str
    port: int
    scheme: str = "http"

    @classmethod
    def parse(cls, text: str) -> "WorkerAddress":
        if not isinstance(text, str) or not text.strip():
            raise ParamsError(f"worker address must be a non-empty string like http://127.0.0.1:8010, got {text!r}")
        raw = text.strip()
        if "://" not in raw:
            raw = "http://" + raw
        parts = urlsplit(raw)
        if parts.scheme not in ("http", "https"):
            raise ParamsError(f"worker address {text!r}: scheme must be http or https")
        if not parts.hostname:
            raise ParamsError(f"worker address {text!r}: no host")
        try:
            port = parts.port
        except ValueError as exc:
            raise ParamsError(f"worker address {text!r}: bad port") from exc
        if port is None:
            raise ParamsError(f"worker address {text!r}: a port is required, e.g. http://127.0.0.1:8010")
        if parts.path not in ("", "/") or parts.query or parts.fragment:
            raise ParamsError(f"worker address {text!r}: give only scheme://host:port (no path)")
        return cls(host=parts.hostname, port=port, scheme=parts.scheme)

    def format(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.scheme}://{host}:{self.port}"

    def __str__(self) -> str:
        return self.format()


def parse_worker_address(text: str) -> WorkerAddress:
    """Parse a worker address (``http://host:port`` or ``host:port``); raise ``ParamsError``."""
    return WorkerAddress.parse(text)


def format_worker_address(address: WorkerAddress | str) -> str:
    """Canonical ``http://host:port`` form of a worker address."""
    return (address if isinstance(address, WorkerAddress) else WorkerAddress.parse(address)).format()


# ------------------------------------------------------------------------------------ source descriptor
@dataclasses.dataclass(frozen=True)
class SourceDescriptor:
    """Where a holding worker keeps a request's KV, enough for any peer to READ it.

    Produced by the holder's connector (``request_finished``), consumed by a reader's connector.
    ``blocks[i]`` holds token positions ``[i*block_size, (i+1)*block_size)``; KV is valid for the first
    ``tokens`` positions. Addresses: for layer ``l`` and block ``b`` the bytes are
    ``bases[l] + b*block_bytes`` ... ``+block_bytes`` in the holder's registered memory.

    Tensor parallelism: ``te``/``bases`` are the holder's rank 0; ``ranks`` lists ranks 1..``tp``-1 the same
    way (each rank registers its own KV memory). ``kv_heads`` (the model's KV heads) and ``head_bytes`` (one
    head of one block in one layer; a rank's ``block_bytes`` is its local heads times that) let a reader with
    a different TP read per-head slices (`topology.py`). Without them only a same-TP, whole-block read works.
    """

    engine: str          # holder's vLLM engine id (for logs and stats)
    te: str              # Mooncake session "host:rpc_port" of the holder's worker
    notify: str          # ZMQ "tcp://host:port" where the reader reports "done reading <xfer>"
    xfer: str            # transfer id; the holder releases its pin when the reader reports it done
    blocks: tuple[int, ...]
    tokens: int          # positions with valid KV, from 0
    block_size: int      # tokens per block (must equal the reader's)
    block_bytes: int     # bytes of one block in one layer (must equal the reader's)
    bases: tuple[int, ...]  # per-layer base address of the holder's KV memory, in layer order
    fingerprint: str | None = None  # prompt_fingerprint() of the first `tokens` token ids (optional)
    expires: float | None = None    # holder's wall clock (epoch s) when its lease on `blocks` lapses unless renewed
    lease_s: float | None = None    # how far one "renew" notice extends the lease
    tp: int | None = None           # holder's tensor-parallel size (None: 1)
    kv_heads: int | None = None     # the model's KV heads (all ranks together)
    head_bytes: int | None = None   # bytes of one KV head of one block in one layer
    ranks: tuple[tuple[str, tuple[int, ...]], ...] = ()  # (te, bases) of holder ranks 1..tp-1
    sig: str | None = None          # HMAC of the other fields with the cluster secret (auth.py)

    @property
    def tp_size(self) -> int:
        return self.tp or 1

    def rank_memory(self, rank: int) -> tuple[str, tuple[int, ...]]:
        """(Mooncake session, per-layer bases) of holder rank ``rank``."""
        return (self.te, self.bases) if rank == 0 else self.ranks[rank - 1]

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        for name in _OPTIONAL_SOURCE_FIELDS:
            if d[name] is None:
                del d[name]
        d["blocks"] = list(self.blocks)
        d["bases"] = list(self.bases)
        if self.ranks:
            d["ranks"] = [{"te": te, "bases": list(bases)} for te, bases in self.ranks]
        else:
            del d["ranks"]
        return d

    @classmethod
    def from_dict(cls, d: Any, where: str = "source") -> "SourceDescriptor":
        if not isinstance(d, Mapping):
            raise ParamsError(f"{where} must be an object, got {type(d).__name__}")
        missing = [f.name for f in dataclasses.fields(cls) if f.name not in d and f.name not in _OPTIONAL_SOURCE_FIELDS
                   and f.name != "ranks"]
        if missing:
            raise ParamsError(f"{where} lacks {', '.join(missing)}")
        for name in ("engine", "te", "notify", "xfer"):
            if not isinstance(d[name], str) or not d[name]:
                raise ParamsError(f"{where}.{name} must be a non-empty string")
        _check_host_port(d["te"], f"{where}.te")
        if not d["notify"].startswith("tcp://"):
            raise ParamsError(f"{where}.notify must look like tcp://host:port, got {d['notify']!r}")
        _check_host_port(d["notify"][len("tcp://"):], f"{where}.notify")
        blocks = _int_list(d["blocks"], f"{where}.blocks")
        bases = _int_list(d["bases"], f"{where}.bases")
        tokens = _nonneg_int(d["tokens"], f"{where}.tokens")
        block_size = _nonneg_int(d["block_size"], f"{where}.block_size")
        block_bytes = _nonneg_int(d["block_bytes"], f"{where}.block_bytes")
        if block_size <= 0 or block_bytes <= 0 or not bases:
            raise ParamsError(f"{where}: block_size, block_bytes and bases must be positive / non-empty")
        if tokens > len(blocks) * block_size:
            raise ParamsError(f"{where}.tokens={tokens} exceeds {len(blocks)} blocks of {block_size}")
        fingerprint = d.get("fingerprint")
        if fingerprint is not None and not isinstance(fingerprint, str):
            raise ParamsError(f"{where}.fingerprint must be a string")
        sig = d.get("sig")
        if sig is not None and not isinstance(sig, str):
            raise ParamsError(f"{where}.sig must be a string")
        expires, lease_s = (_opt_number(d.get(k), f"{where}.{k}") for k in ("expires", "lease_s"))
        tp, kv_heads, head_bytes, ranks = _tp_layout(d, len(bases), block_bytes, where)
        unknown = set(d) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ParamsError(f"{where}: unknown field(s) {sorted(unknown)}")
        return cls(engine=d["engine"], te=d["te"], notify=d["notify"], xfer=d["xfer"], blocks=tuple(blocks),
                   tokens=tokens, block_size=block_size, block_bytes=block_bytes, bases=tuple(bases),
                   fingerprint=fingerprint, expires=expires, lease_s=lease_s, tp=tp, kv_heads=kv_heads,
                   head_bytes=head_bytes, ranks=ranks, sig=sig)


_OPTIONAL_SOURCE_FIELDS = ("fingerprint", "expires", "lease_s", "tp", "kv_heads", "head_bytes", "sig")
MAX_TP = 256
"""Largest holder TP a descriptor may name (bounds what a reader plans)."""


def _tp_layout(d: Mapping[str, Any], layers: int, block_bytes: int, where: str):
    """(tp, kv_heads, head_bytes, ranks) of a descriptor, checked against each other."""
    tp = d.get("tp")
    if tp is not None and (_nonneg_int(tp, f"{where}.tp") < 1 or tp > MAX_TP):
        raise ParamsError(f"{where}.tp must be in 1..{MAX_TP}, got {tp}")
    kv_heads = d.get("kv_heads")
    head_bytes = d.get("head_bytes")
    if (kv_heads is None) != (head_bytes is None):
        raise ParamsError(f"{where}: kv_heads and head_bytes go together")
    if kv_heads is not None:
        if _nonneg_int(kv_heads, f"{where}.kv_heads") < 1 or _nonneg_int(head_bytes, f"{where}.head_bytes") < 1:
            raise ParamsError(f"{where}: kv_heads and head_bytes must be positive")
        local = max(1, kv_heads // (tp or 1))
        if local * head_bytes != block_bytes:
            raise ParamsError(f"{where}: block_bytes {block_bytes} is not {local} local heads x {head_bytes} B")
    raw = d.get("ranks") or []
    if not isinstance(raw, (list, tuple)) or len(raw) != (tp or 1) - 1:
        raise ParamsError(f"{where}.ranks must list the holder's ranks 1..tp-1 ({(tp or 1) - 1} entries)")
    ranks = []
    for i, r in enumerate(raw, 1):
        if not isinstance(r, Mapping) or set(r) != {"te", "bases"} or not isinstance(r["te"], str):
            raise ParamsError(f"{where}.ranks[{i - 1}] must be {{'te': 'host:port', 'bases': [...]}}")
        _check_host_port(r["te"], f"{where}.ranks[{i - 1}].te")
        bases = _int_list(r["bases"], f"{where}.ranks[{i - 1}].bases")
        if len(bases) != layers:
            raise ParamsError(f"{where}.ranks[{i - 1}] has {len(bases)} layers, rank 0 has {layers}")
        ranks.append((r["te"], tuple(bases)))
    return tp, kv_heads, head_bytes, tuple(ranks)


def prompt_fingerprint(token_ids) -> str:
    """A short hash of token ids: a reader checks that the holder's KV belongs to *its* prompt prefix, so a
    mis-paired request (a router bug) is computed locally instead of poisoning the reader's prefix cache."""
    import array
    import hashlib

    return hashlib.blake2b(array.array("q", token_ids).tobytes(), digest_size=12).hexdigest()


# ------------------------------------------------------------------------------------------ the request
@dataclasses.dataclass(frozen=True)
class History:
    """Read the first ``tokens`` positions of this prompt from the worker at ``source`` (its URL)."""

    source: WorkerAddress
    tokens: int

    def to_dict(self) -> dict[str, Any]:
        return {"from": self.source.format(), "tokens": self.tokens}


@dataclasses.dataclass(frozen=True)
class AMPDParams:
    """The parsed ``kv_transfer_params["ampd"]`` of one request.

    Fields (wire name in brackets):
      role [role]        one of ``ROLES``.
      xfer [xfer]        transfer id chosen by the router, unique per round (``new_xfer_id()``); required for
                         prefill/export/migrate, optional otherwise. Appears in logs, stats and descriptors.
      session [session]  the conversation id; lets the decode worker retain (and later release) its blocks.
      history [history]  ``{"from": URL, "tokens": l_hist}``: read that many leading positions from the worker
                         holding them (prefill: the decode worker; migrate: the old decode worker).
      source [source]    a ``SourceDescriptor`` (decode after remote prefill: from P's response).
      retain [retain]    decode/local: keep this request's blocks after it finishes (default: when a session is
                         given). ``False`` also releases the session's earlier pins — send it on the last round.
      auth [auth]        export (internal): proof that the calling engine holds the cluster secret.
    """

    role: str
    xfer: str | None = None
    session: str | None = None
    history: History | None = None
    source: SourceDescriptor | None = None
    retain: bool | None = None
    auth: Mapping[str, Any] | None = None

    @property
    def wants_retention(self) -> bool:
        if self.role not in ("decode", "local"):
            return False
        return self.retain if self.retain is not None else self.session is not None

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"v": VERSION, "role": self.role}
        if self.xfer is not None:
            d["xfer"] = self.xfer
        if self.session is not None:
            d["session"] = self.session
        if self.history is not None:
            d["history"] = self.history.to_dict()
        if self.source is not None:
            d["source"] = self.source.to_dict()
        if self.retain is not None:
            d["retain"] = self.retain
        if self.auth is not None:
            d["auth"] = dict(self.auth)
        return d

    def wire(self) -> dict[str, Any]:
        """The full ``kv_transfer_params`` value to put into a request body."""
        return {KEY: self.to_dict()}


_ALLOWED = {"v", "role", "xfer", "session", "history", "source", "retain", "auth"}


def parse(kv_transfer_params: Any) -> AMPDParams | None:
    """Validate and parse a request's ``kv_transfer_params``. ``None``/no ``ampd`` key → ``None`` (plain
    request). Raises ``ParamsError`` naming the bad field."""
    if kv_transfer_params is None:
        return None
    if not isinstance(kv_transfer_params, Mapping):
        raise ParamsError(f"kv_transfer_params must be an object, got {type(kv_transfer_params).__name__}")
    raw = kv_transfer_params.get(KEY)
    if raw is None:
        return None
    if not isinstance(raw, Mapping):
        raise ParamsError(f"kv_transfer_params.{KEY} must be an object, got {type(raw).__name__}")
    unknown = set(raw) - _ALLOWED
    if unknown:
        raise ParamsError(f"kv_transfer_params.{KEY}: unknown field(s) {sorted(unknown)}; allowed {sorted(_ALLOWED)}")
    version = raw.get("v", VERSION)
    if version != VERSION:
        raise ParamsError(f"kv_transfer_params.{KEY}.v={version!r}: this connector speaks version {VERSION}")
    role = raw.get("role")
    if role not in ROLES:
        raise ParamsError(f"kv_transfer_params.{KEY}.role={role!r}: must be one of {list(ROLES)}")
    xfer = _opt_str(raw.get("xfer"), "xfer")
    session = _opt_str(raw.get("session"), "session")
    history = None
    if raw.get("history") is not None:
        h = raw["history"]
        if not isinstance(h, Mapping) or set(h) != {"from", "tokens"}:
            raise ParamsError(f"kv_transfer_params.{KEY}.history must be {{'from': URL, 'tokens': int}}, got {h!r}")
        history = History(source=WorkerAddress.parse(h["from"]), tokens=_nonneg_int(h["tokens"], "history.tokens"))
    source = None
    if raw.get("source") is not None:
        source = SourceDescriptor.from_dict(raw["source"], f"kv_transfer_params.{KEY}.source")
    retain = raw.get("retain")
    if retain is not None and not isinstance(retain, bool):
        raise ParamsError(f"kv_transfer_params.{KEY}.retain must be true/false, got {retain!r}")

    if role in ("prefill", "export") and not xfer:
        raise ParamsError(f"role {role!r} needs an 'xfer' id")
    if role == "decode" and source is None and history is None:
        raise ParamsError("role 'decode' needs a 'source' (P's response) or a 'history' to read")
    if role in ("local", "export") and (source is not None or history is not None):
        raise ParamsError(f"role {role!r} takes no 'source' or 'history'")
    if role == "prefill" and source is not None:
        raise ParamsError("role 'prefill' takes a 'history', not a 'source'")
    if history is not None and source is not None:
        raise ParamsError("give either 'history' or 'source', not both")
    auth = raw.get("auth")
    if auth is not None and (role != "export" or not isinstance(auth, Mapping)):
        raise ParamsError(f"kv_transfer_params.{KEY}.auth is an object and only for role 'export'")
    return AMPDParams(role=role, xfer=xfer, session=session, history=history, source=source, retain=retain,
                      auth=auth)


# ---------------------------------------------------------------------------------------------- builders
def new_xfer_id() -> str:
    """A fresh transfer id."""
    return "xfer-" + uuid.uuid4().hex


def remote_prefill_params(xfer: str | None = None, *, history_from: WorkerAddress | str | None = None,
                          history_tokens: int = 0, session: str | None = None) -> dict[str, Any]:
    """For the prefill worker P (send with ``max_tokens=1``, non-streaming).

    With ``history_from``/``history_tokens`` (flow c) P reads that many leading tokens from the decode worker
    that holds the session instead of recomputing them. ``history_tokens`` is the session's previous prompt
    plus output length as the router counts it; the connector rounds it down to whole cached blocks.
    """
    history = None
    if history_from is not None and history_tokens > 0:
        history = History(_addr(history_from), _nonneg_int(history_tokens, "history_tokens"))
    return AMPDParams(role="prefill", xfer=xfer or new_xfer_id(), session=session, history=history).wire()


def decode_params(prefill_response_params: Mapping[str, Any], *, session: str | None = None,
                  retain: bool | None = None) -> dict[str, Any]:
    """For the decode worker D after a remote prefill: pass P's response ``kv_transfer_params`` unchanged."""
    source = response_source(prefill_response_params)
    if source is None:
        err = response_error(prefill_response_params)
        raise ParamsError("the prefill response carries no ampd source descriptor"
                          + (f" (prefill reported: {err})" if err else ""))
    return AMPDParams(role="decode", xfer=source.xfer, session=session, source=source, retain=retain).wire()


def local_params(*, session: str | None = None, retain: bool | None = None) -> dict[str, Any]:
    """For the decode worker D computing the prompt itself (flow b); no transfer, only retention."""
    return AMPDParams(role="local", session=session, retain=retain).wire()


def migrate_params(xfer: str | None = None, *, history_from: WorkerAddress | str, history_tokens: int,
                   session: str | None = None, retain: bool | None = None) -> dict[str, Any]:
    """For a new decode worker D2 taking over a session from D1: read the history from D1, then decode."""
    history = History(_addr(history_from), _nonneg_int(history_tokens, "history_tokens"))
    return AMPDParams(role="decode", xfer=xfer or new_xfer_id(), session=session, history=history,
                      retain=retain).wire()


def export_params(xfer: str, auth: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Internal (connector → holder): hold this prompt's cached blocks and answer with a source descriptor
    (``auth``: the caller's proof that it holds the cluster secret, `auth.ClusterAuth.export_token`)."""
    return AMPDParams(role="export", xfer=xfer, auth=auth).wire()


def response_params(*, source: SourceDescriptor | None = None, stats: Mapping[str, Any] | None = None,
                    error: str | None = None) -> dict[str, Any]:
    """What a connector returns from ``request_finished`` (becomes the response's ``kv_transfer_params``)."""
    body: dict[str, Any] = {"v": VERSION}
    if source is not None:
        body["source"] = source.to_dict()
    if stats:
        body["stats"] = dict(stats)
    if error:
        body["error"] = error
    return {KEY: body}


def _response_body(params: Mapping[str, Any] | None) -> Mapping[str, Any]:
    if not isinstance(params, Mapping):
        return {}
    body = params.get(KEY)
    return body if isinstance(body, Mapping) else {}


def response_source(params: Mapping[str, Any] | None) -> SourceDescriptor | None:
    """The source descriptor in a response's ``kv_transfer_params`` (validated), or ``None``."""
    raw = _response_body(params).get("source")
    return None if raw is None else SourceDescriptor.from_dict(raw, "response source")


def response_stats(params: Mapping[str, Any] | None) -> dict[str, Any]:
    """Transfer counters of one request as the connector reports them: ``read_bytes``, ``read_blocks``,
    ``read_tokens``, ``read_ms``, ``held_blocks``, ``external_tokens``, ``lease_renewals`` (see
    docs/connector.md), and — for the router's cost model — ``history_recomputed_tokens`` in a prefill
    response: the holder of the history did not cache (all of) it and recomputed that many tokens for the
    export, stalling its own batch (``export_recomputed_tokens`` is the same figure in the holder's own
    export response). ``tables`` is a snapshot of the connector's table sizes (leak checks)."""
    raw = _response_body(params).get("stats")
    return dict(raw) if isinstance(raw, Mapping) else {}


def response_error(params: Mapping[str, Any] | None) -> str | None:
    """The connector's error text for this request (e.g. a ParamsError or a failed read), or ``None``."""
    err = _response_body(params).get("error")
    return err if isinstance(err, str) else None


# ----------------------------------------------------------------------------------------------- helpers
def _addr(a: WorkerAddress | str) -> WorkerAddress:
    return a if isinstance(a, WorkerAddress) else WorkerAddress.parse(a)


def _opt_str(v: Any, name: str) -> str | None:
    if v is None:
        return None
    if not isinstance(v, str) or not v or len(v) > 256:
        raise ParamsError(f"kv_transfer_params.{KEY}.{name} must be a non-empty string (≤256 chars), got {v!r}")
    return v


def _opt_number(v: Any, name: str) -> float | None:
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, (int, float)) or v < 0:
        raise ParamsError(f"{name} must be a non-negative number, got {v!r}")
    return float(v)


def _nonneg_int(v: Any, name: str) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or v < 0:
        raise ParamsError(f"{name} must be a non-negative integer, got {v!r}")
    return v


def _int_list(v: Any, name: str) -> list[int]:
    if not isinstance(v, (list, tuple)):
        raise ParamsError(f"{name} must be a list of integers")
    return [_nonneg_int(x, f"{name}[{i}]") for i, x in enumerate(v)]


def _check_host_port(text: str, name: str) -> None:
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ParamsError(f"{name} must look like host:port, got {text!r}")

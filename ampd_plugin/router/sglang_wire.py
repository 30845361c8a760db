"""SGLang's prefill/decode wire: the request bodies a router sends for one routing decision.

SGLang PD has no per-request transfer parameters like vLLM's `kv_transfer_params`. Instead the router
puts three fields into the *same* JSON body that it sends, concurrently, to the prefill server and the
decode server (SGLang 0.5.23 `GenerateReqInput` / OpenAI `PDRoutingFields`):

- `bootstrap_host`: the prefill server's host (what the decode's receiver dials),
- `bootstrap_port`: the prefill server's `--disaggregation-bootstrap-port` (default 8998),
- `bootstrap_room`: a random id in [0, 2**63-1] that pairs the prefill's sender with the decode's receiver.

The client-facing answer is the decode server's. AMPD adds one route SGLang lacks: a *local* prefill
on the decode worker that already holds the session's history. A decode server rejects any request
without a `bootstrap_room`, so a local request still carries a room, plus the sentinel host
`AMPD_LOCAL_BOOTSTRAP_HOST` (`ampd_plugin.connector.sglang.wire`, the engine side of this wire); the `ampd`
SGLang plugin on the decode worker sees the sentinel and runs the prefill itself (its radix cache covers
the history) instead of waiting for a transfer.

Pure functions, no I/O: the router calls them and does the HTTP.
"""

from __future__ import annotations

import copy
import random
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from ampd_plugin.connector.params import parse_worker_address
from ampd_plugin.connector.sglang.wire import (AMPD_LOCAL_BOOTSTRAP_HOST, MAX_BOOTSTRAP_ROOM,
                                              SGLANG_DEFAULT_BOOTSTRAP_PORT)
from ampd_plugin.router_policy.state import Route


@dataclass(frozen=True)
class SGLangPrefillEndpoint:
    """How a router reaches one SGLang prefill worker: its HTTP URL and its bootstrap port."""

    url: str
    bootstrap_port: int = SGLANG_DEFAULT_BOOTSTRAP_PORT

    @property
    def bootstrap_host(self) -> str:
        return bootstrap_host_of(self.url)


@dataclass(frozen=True)
class SGLangRequestPlan:
    """What to send for one round: `prefill_body` is None for a local prefill (decode only)."""

    decode_body: dict[str, Any]
    prefill_body: dict[str, Any] | None
    bootstrap_room: int
    prefill_url: str | None = None

    @property
    def is_local(self) -> bool:
        return self.prefill_body is None


def bootstrap_host_of(url: str) -> str:
    """Host part of a worker URL the way SGLang's routers send it (IPv6 literals bracketed).

    Worker URLs are parsed by the one parser the router uses for every engine (`connector.params`), so a
    malformed URL fails here with the same `ParamsError` (a ValueError) as anywhere else.
    """
    host = parse_worker_address(url).host
    return f"[{host}]" if ":" in host else host


def new_bootstrap_room(rng: random.Random | None = None) -> int:
    """A fresh room id in SGLang's range; pass a seeded `rng` for reproducible tests."""
    return (rng or random).randint(0, MAX_BOOTSTRAP_ROOM)


def _batch_size(body: Mapping[str, Any]) -> int | None:
    """Number of prompts of a batched native `/generate` body, or None for a single prompt."""
    for key in ("text", "input_ids"):
        value = body.get(key)
        if isinstance(value, list) and value and (key == "text" or isinstance(value[0], list)):
            return len(value)
    return None


def _with_bootstrap(body: Mapping[str, Any], host: str, port: int, room: int) -> dict[str, Any]:
    out = copy.deepcopy(dict(body))
    n = _batch_size(out)
    if n is None:
        out.update(bootstrap_host=host, bootstrap_port=port, bootstrap_room=room)
    else:
        # Batched /generate: SGLang wants one value per prompt, rooms distinct.
        out.update(
            bootstrap_host=[host] * n,
            bootstrap_port=[port] * n,
            bootstrap_room=[(room + i) % (MAX_BOOTSTRAP_ROOM + 1) for i in range(n)],
        )
    return out


def remote_prefill_bodies(
    body: Mapping[str, Any],
    prefill: SGLangPrefillEndpoint,
    *,
    room: int | None = None,
    rng: random.Random | None = None,
) -> SGLangRequestPlan:
    """Bodies for a remote prefill on `prefill`: identical bootstrap fields to P and to D."""
    room = new_bootstrap_room(rng) if room is None else _checked_room(room)
    with_fields = _with_bootstrap(body, prefill.bootstrap_host, prefill.bootstrap_port, room)
    return SGLangRequestPlan(
        decode_body=with_fields,
        prefill_body=copy.deepcopy(with_fields),
        bootstrap_room=room,
        prefill_url=prefill.url,
    )


def local_prefill_body(
    body: Mapping[str, Any], *, room: int | None = None, rng: random.Random | None = None
) -> SGLangRequestPlan:
    """Body for a local prefill: decode only, sentinel host, a room so SGLang accepts it."""
    room = new_bootstrap_room(rng) if room is None else _checked_room(room)
    return SGLangRequestPlan(
        decode_body=_with_bootstrap(body, AMPD_LOCAL_BOOTSTRAP_HOST, SGLANG_DEFAULT_BOOTSTRAP_PORT, room),
        prefill_body=None,
        bootstrap_room=room,
    )


def bodies_for_route(
    route: Route,
    body: Mapping[str, Any],
    prefill_endpoints: Mapping[str, SGLangPrefillEndpoint],
    *,
    room: int | None = None,
    rng: random.Random | None = None,
) -> SGLangRequestPlan:
    """Turn a policy's `Route` into the SGLang request bodies (the router POSTs them)."""
    if route.kind == "local":
        return local_prefill_body(body, room=room, rng=rng)
    if route.kind == "remote":
        try:
            endpoint = prefill_endpoints[route.worker]
        except KeyError:
            known = ", ".join(sorted(prefill_endpoints)) or "none"
            raise ValueError(f"route names unknown prefill worker {route.worker!r} (known: {known})") from None
        return remote_prefill_bodies(body, endpoint, room=room, rng=rng)
    raise ValueError(f"unknown route kind {route.kind!r}; expected 'local' or 'remote'")


def _checked_room(room: int) -> int:
    if not isinstance(room, int) or isinstance(room, bool) or not 0 <= room <= MAX_BOOTSTRAP_ROOM:
        raise ValueError(f"bootstrap_room must be an int in [0, 2**63-1], got {room!r}")
    return room

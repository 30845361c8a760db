"""A thin wrapper over `mooncake.engine.TransferEngine` (shared by the vLLM and SGLang connectors).

Why a wrapper: the binding reports failures as negative integers and has no notion of a deadline. Here
every failure becomes an exception that names the peer and the operation, descriptors are coalesced
(`coalesce`), Mooncake's own transfer deadline is set (`MC_TRANSFER_TIMEOUT`), and a caller may bound a
call's wait (`timeout_s`). Mooncake is imported lazily so importing the plugin never needs it.

Metadata is exchanged peer-to-peer (``P2PHANDSHAKE``, no etcd); a peer is addressed by its session string
``host:rpc_port`` (``TransferEngineWrapper.session``).

Note: Mooncake's handshake listener and TCP transport bind all interfaces (hard-coded upstream); firewall
the RPC/transfer ports or run inside a network namespace (docs/connector.md, "Exposure").
"""

from __future__ import annotations

import concurrent.futures
import logging
import os
import time
from typing import Iterable, Sequence

log = logging.getLogger(__name__)

PROTOCOLS = ("tcp", "rdma")


class TransferError(RuntimeError):
    """A Mooncake operation failed; ``peer`` and ``op`` say which."""

    def __init__(self, op: str, peer: str, detail: str):
        super().__init__(f"mooncake {op} with peer {peer} failed: {detail}")
        self.op, self.peer, self.detail = op, peer, detail


class TransferTimeout(TransferError):
    """A Mooncake operation did not finish within its timeout."""


def import_transfer_engine():
    """Return the `TransferEngine` class or raise an ImportError that says what to install."""
    try:
        from mooncake.engine import TransferEngine  # type: ignore
    except ImportError as exc:  # pragma: no cover - depends on the host
        raise ImportError(
            "the ampd connector needs the Mooncake transfer engine: pip install 'ampd-plugin[mooncake]' "
            "(CUDA 12; mooncake-transfer-engine-cuda13 for CUDA 13) or 'ampd-plugin[mooncake-cpu]' on hosts "
            "without CUDA (then also: apt-get install libcurl4 libibverbs1 rdma-core librdmacm1 libnuma1 "
            f"liburing2). Import error: {exc}"
        ) from exc
    return TransferEngine


def widen_thread_affinity() -> None:
    """Let the calling thread (and the threads it starts) run on every CPU of this host.

    vLLM's CPU backend pins each worker process to its OMP core(s); Mooncake's handshake and TCP threads
    started from there would inherit that single core and queue behind the model's compute (and everything
    else sharing it), so one read of many head slices waits for dozens of wake-ups. Best effort."""
    if not hasattr(os, "sched_setaffinity"):
        return
    try:
        os.sched_setaffinity(0, range(os.cpu_count() or 1))
    except OSError:  # pragma: no cover - a cpuset that forbids it: keep the inherited mask
        log.debug("could not widen the thread's CPU affinity", exc_info=True)


def start_unpinned(factory):
    """Run ``factory()`` on a fresh thread with `widen_thread_affinity` and return its result (or raise):
    threads it creates (Mooncake's) inherit the wide mask, while the caller keeps its own pinning."""
    out: dict = {}

    def run():
        widen_thread_affinity()
        try:
            out["value"] = factory()
        except BaseException as exc:  # noqa: BLE001 - re-raised in the caller
            out["error"] = exc

    import threading

    t = threading.Thread(target=run, name="ampd-te-init")
    t.start()
    t.join()
    if "error" in out:
        raise out["error"]
    return out["value"]


def coalesce(local: Sequence[int], remote: Sequence[int], length: int) -> list[tuple[int, int, int]]:
    """Merge equal-length (local, remote) address pairs that are contiguous on both sides into
    ``(local, remote, length)`` runs — fewer, larger transfer descriptors."""
    runs: list[tuple[int, int, int]] = []
    for lo, re in zip(local, remote):
        if runs:
            l0, r0, n = runs[-1]
            if l0 + n == lo and r0 + n == re:
                runs[-1] = (l0, r0, n + length)
                continue
        runs.append((lo, re, length))
    return runs


class TransferEngineWrapper:
    """One Mooncake engine per process: initialize, register memory, batched synchronous reads/writes."""

    def __init__(self, hostname: str, protocol: str = "tcp", device: str = "", timeout_s: float = 10.0):
        if protocol not in PROTOCOLS:
            raise ValueError(f"mooncake protocol must be one of {PROTOCOLS}, got {protocol!r}")
        # Mooncake's own per-transfer deadline, so a stuck peer cannot hold our thread forever.
        os.environ.setdefault("MC_TRANSFER_TIMEOUT", str(max(1, int(timeout_s))))
        engine_cls = import_transfer_engine()
        self._engine = engine_cls()
        self.hostname = hostname
        self.protocol = protocol
        self.timeout_s = timeout_s
        rc = self._engine.initialize(hostname, "P2PHANDSHAKE", protocol, device)
        if rc != 0:
            raise TransferError("initialize", hostname, f"rc={rc} (protocol={protocol}, device={device!r})")
        self.rpc_port = int(self._engine.get_rpc_port())
        self._registered: list[int] = []
        # Runs calls that were given a timeout, so the caller can give up on them.
        self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=4, thread_name_prefix="ampd-te")
        log.info("mooncake transfer engine up: session %s, protocol %s", self.session, protocol)

    @property
    def session(self) -> str:
        """This engine's peer name, ``host:rpc_port``."""
        return f"{self.hostname}:{self.rpc_port}"

    def register(self, regions: Iterable[tuple[int, int]]) -> None:
        """Register ``(address, length)`` regions so peers may read/write them."""
        regions = list(regions)
        addrs = [a for a, _ in regions]
        rc = self._engine.batch_register_memory(addrs, [n for _, n in regions])
        if rc != 0:
            raise TransferError("register_memory", self.session, f"rc={rc} for {len(regions)} regions")
        self._registered.extend(addrs)

    def read(self, peer: str, local: Sequence[int], remote: Sequence[int], lengths: Sequence[int],
             timeout_s: float | None = None) -> int:
        """Copy ``remote[i]`` of ``peer`` into our ``local[i]`` (``lengths[i]`` bytes each); return bytes.

        Without ``timeout_s`` the call returns when Mooncake does (its own deadlines: ``MC_TRANSFER_TIMEOUT``
        for data, about 60 s for a handshake with a peer that accepts but never answers); that is the safe
        choice when ``local`` will be reused, because an abandoned call might still write into it. With
        ``timeout_s`` the caller gets ``TransferTimeout`` after that long while the call finishes in the
        background."""
        return self._batch("read", peer, local, remote, lengths, timeout_s)

    def write(self, peer: str, local: Sequence[int], remote: Sequence[int], lengths: Sequence[int],
              timeout_s: float | None = None) -> int:
        """Copy our ``local[i]`` into ``remote[i]`` of ``peer``; return bytes (timeouts as in ``read``)."""
        return self._batch("write", peer, local, remote, lengths, timeout_s)

    def _batch(self, op, peer, local, remote, lengths, timeout_s) -> int:
        if not (len(local) == len(remote) == len(lengths)):
            raise ValueError("local, remote and lengths must have equal length")
        if not local:
            return 0
        fn = self._engine.batch_transfer_sync_read if op == "read" else self._engine.batch_transfer_sync_write
        args = (peer, list(local), list(remote), list(lengths))
        start = time.monotonic()
        try:
            if timeout_s is None:
                rc = fn(*args)
            else:
                rc = self._pool.submit(fn, *args).result(timeout=timeout_s)
        except concurrent.futures.TimeoutError as exc:
            raise TransferTimeout(op, peer, f"no completion within {timeout_s:.1f}s") from exc
        except Exception as exc:  # the binding raises on malformed arguments
            raise TransferError(op, peer, repr(exc)) from exc
        elapsed = time.monotonic() - start
        if rc != 0:
            raise TransferError(op, peer, f"rc={rc} after {elapsed:.3f}s (peer gone, unreachable, wrong address, "
                                          "unregistered memory or Mooncake timeout)")
        return int(sum(lengths))

    def close(self) -> None:
        """Unregister memory and stop the helper thread (the engine itself lives until process exit)."""
        if self._registered:
            try:
                self._engine.batch_unregister_memory(self._registered)
            except Exception:  # pragma: no cover - best effort at shutdown
                log.debug("unregister failed", exc_info=True)
            self._registered = []
        self._pool.shutdown(wait=False, cancel_futures=True)

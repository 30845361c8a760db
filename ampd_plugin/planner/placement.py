"""Bandwidth-aware placement of replicas on nodes (DistServe's low node-affinity case, made simple).

KV moves between a prefill replica and a decode replica on every remote prefill. Inside a node it crosses
NVLink; between nodes, the (much slower) network. With prefill workers chosen among all of them, the share
of transfers that stay inside a node is, for a decode replica, the share of prefill replicas on its node;
so the placement mixes prefill and decode replicas on every node in the pools' GPU ratio (each node is a
small P+D "segment"), keeps every replica (its TP group) inside one node, and hands out contiguous device
indices so `CUDA_VISIBLE_DEVICES` slices are simple. The resulting intra-node share prices the transfers.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class Replica:
    kind: str  # "prefill" or "decode" (co-located replicas are "decode")
    degree: int
    index: int  # within its pool
    node: int = -1
    devices: tuple[int, ...] = ()

    @property
    def name(self) -> str:
        return f"{self.kind}{self.index}"

    def to_dict(self) -> dict:
        return {"name": self.name, "kind": self.kind, "tp": self.degree, "node": self.node,
                "devices": list(self.devices)}


@dataclass
class Placement:
    nodes: int
    gpus_per_node: int
    replicas: list[Replica] = field(default_factory=list)
    intra_node_fraction: float = 1.0  # share of remote-prefill KV transfers that stay inside a node

    def on_node(self, node: int) -> list[Replica]:
        return [r for r in self.replicas if r.node == node]

    def to_dict(self) -> dict:
        return {"nodes": self.nodes, "gpus_per_node": self.gpus_per_node,
                "intra_node_fraction": round(self.intra_node_fraction, 4),
                "replicas": [r.to_dict() for r in self.replicas]}


class PlacementError(ValueError):
    pass


def _replicas(candidate) -> list[Replica]:
    out: list[Replica] = []
    for kind, counts in (("prefill", candidate.prefill), ("decode", candidate.decode)):
        i = 0
        for n in sorted(counts, reverse=True):
            for _ in range(counts[n]):
                out.append(Replica(kind, n, i))
                i += 1
    return out


def place(candidate, gpus: int, gpus_per_node: int) -> Placement:
    """Assign every replica a node and contiguous devices; deterministic for a given candidate."""
    nodes = max(1, -(-gpus // gpus_per_node))
    sizes = [min(gpus_per_node, gpus - k * gpus_per_node) for k in range(nodes)]
    replicas = _replicas(candidate)
    total = {k: sum(r.degree for r in replicas if r.kind == k) for k in ("prefill", "decode")}
    used_total = max(1, sum(total.values()))
    share = {k: v / used_total for k, v in total.items()}
    used = [0] * nodes
    by_kind = [{"prefill": 0, "decode": 0} for _ in range(nodes)]
    # Widest first (keeps power-of-two packing gap-free); within a width alternate the pools.
    order = sorted(replicas, key=lambda r: (-r.degree, r.index, r.kind))
    for r in order:
        fitting = [k for k in range(nodes) if sizes[k] - used[k] >= r.degree]
        if r.degree > gpus_per_node or not fitting:
            raise PlacementError(
                f"cannot place {r.kind} replica TP{r.degree}: free GPUs per node are {[s - u for s, u in zip(sizes, used)]}"
            )

        def deficit(k: int) -> tuple:
            # How far this node is below the pool's share of its GPUs after placing r (larger = better).
            after = (by_kind[k][r.kind] + r.degree) / sizes[k]
            return (share[r.kind] - after, -used[k] / sizes[k], -k)

        k = max(fitting, key=deficit)
        r.node = k
        r.devices = tuple(range(used[k], used[k] + r.degree))
        used[k] += r.degree
        by_kind[k][r.kind] += r.degree
    replicas.sort(key=lambda r: (r.kind != "prefill", r.index))
    return Placement(nodes, gpus_per_node, replicas, _intra_fraction(replicas))


def _intra_fraction(replicas: list[Replica]) -> float:
    prefill = [r for r in replicas if r.kind == "prefill"]
    decode = [r for r in replicas if r.kind == "decode"]
    if not prefill or not decode:
        return 1.0
    weight = sum(d.degree for d in decode)
    same = sum(d.degree * sum(1 for p in prefill if p.node == d.node) / len(prefill) for d in decode)
    return same / weight

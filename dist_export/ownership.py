"""Stage 1 (plan), every rank: who writes what, at the item level (pure functions on costs; no I/O, no collectives).

Two levels (issue 17). Shards are assigned to nodes, balanced by cost per local rank (a shard never has writers
on two nodes: network file systems do not promise safe concurrent writes to one file from several clients).
Within a node, the items of the node's shards go to its local ranks, balanced by cost: longest processing time
first, then a pass that moves or swaps single items from the most loaded rank while that lowers the maximum.
Several ranks of one node then write into the same shard file at the offsets the plan already fixed (the layout
comes from metadata alone, so the bytes never depend on the world size).

Items that must stay on one rank (a `bundle` key, e.g. the slices of one stacked-expert tensor) move together.
Every function is deterministic: ties are broken by index, so every rank computes the same assignment.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Balance:
    """Per-rank loads of an assignment and its imbalance (max / mean; 1.0 is perfect)."""

    loads: tuple[float, ...]

    @property
    def imbalance(self) -> float:
        mean = sum(self.loads) / len(self.loads) if self.loads else 0.0
        return max(self.loads) / mean if mean > 0 else 1.0


def check_world(nnodes: int, ranks_per_node: int) -> None:
    if nnodes < 1 or ranks_per_node < 1:
        raise ValueError(f"nnodes={nnodes}, ranks_per_node={ranks_per_node}: both must be >= 1 "
                         f"(world_size = nnodes * ranks_per_node)")


def assign_shards_to_nodes(shard_costs: list[float], nnodes: int) -> list[int]:
    """LPT over nodes (nodes have equal rank counts): the costliest shard goes to the least loaded node."""
    return lpt(shard_costs, nnodes)


def lpt(costs: list[float], bins: int) -> list[int]:
    """Longest-processing-time-first: biggest cost to the least loaded bin; ties broken by index."""
    if bins < 1:
        raise ValueError(f"cannot assign work to {bins} bins; need at least 1")
    load = [0.0] * bins
    owner = [0] * len(costs)
    for idx in sorted(range(len(costs)), key=lambda i: (-costs[i], i)):
        b = min(range(bins), key=lambda r: (load[r], r))
        owner[idx] = b
        load[b] += costs[idx]
    return owner


def _bundle(costs: list[float], bundles: list[str] | None) -> tuple[list[float], list[list[int]]]:
    """Merge items with one bundle key into one unit; returns (unit costs, item indices of each unit)."""
    if bundles is None:
        return list(costs), [[i] for i in range(len(costs))]
    units: dict[str, list[int]] = {}
    for i, key in enumerate(bundles):
        units.setdefault(key if key is not None else f"\0{i}", []).append(i)
    members = list(units.values())
    return [sum(costs[i] for i in m) for m in members], members


def improve(costs: list[float], owner: list[int], bins: int, rounds: int = 200) -> list[int]:
    """Move or swap one unit off the most loaded bin while that lowers the max load (deterministic)."""
    owner = list(owner)
    load = [0.0] * bins
    for i, b in enumerate(owner):
        load[b] += costs[i]
    for _ in range(rounds):
        top = max(range(bins), key=lambda r: (load[r], -r))
        best = None  # (new max of the pair, unit on top, unit elsewhere or None, other bin)
        on_top = [i for i, b in enumerate(owner) if b == top]
        for other in range(bins):
            if other == top:
                continue
            others = [None] + [j for j, b in enumerate(owner) if b == other]
            for i in on_top:
                for j in others:
                    delta = costs[i] - (costs[j] if j is not None else 0.0)
                    if delta <= 0:
                        continue
                    pair_max = max(load[top] - delta, load[other] + delta)
                    if pair_max < load[top] - 1e-9 and (best is None or pair_max < best[0]):
                        best = (pair_max, i, j, other)
        if best is None:
            break
        _, i, j, other = best
        delta = costs[i] - (costs[j] if j is not None else 0.0)
        owner[i] = other
        if j is not None:
            owner[j] = top
        load[top] -= delta
        load[other] += delta
    return owner


def assign_items_to_ranks(item_costs: list[float], ranks: int, bundles: list[str] | None = None) -> list[int]:
    """Local rank of every item of one node: LPT over units (bundled items), then `improve`."""
    unit_costs, members = _bundle(item_costs, bundles)
    unit_owner = improve(unit_costs, lpt(unit_costs, ranks), ranks)
    owner = [0] * len(item_costs)
    for u, items in enumerate(members):
        for i in items:
            owner[i] = unit_owner[u]
    return owner


def assign_items(shard_items: list[list[float]], nnodes: int, ranks_per_node: int,
                 bundles: list[list[str]] | None = None) -> tuple[list[int], list[list[int]]]:
    """Both levels: (node of each shard, global rank of each item of each shard).

    Global rank = node * ranks_per_node + local rank (torchrun's numbering)."""
    check_world(nnodes, ranks_per_node)
    nodes = assign_shards_to_nodes([sum(c) for c in shard_items], nnodes)
    ranks: list[list[int]] = [[0] * len(c) for c in shard_items]
    for node in range(nnodes):
        mine = [k for k, n in enumerate(nodes) if n == node]
        flat = [(k, i) for k in mine for i in range(len(shard_items[k]))]
        costs = [shard_items[k][i] for k, i in flat]
        keys = None if bundles is None else [f"{k}:{bundles[k][i]}" if bundles[k][i] is not None else None
                                              for k, i in flat]
        local = assign_items_to_ranks(costs, ranks_per_node, keys)
        for (k, i), r in zip(flat, local):
            ranks[k][i] = node * ranks_per_node + r
    return nodes, ranks


def rank_balance(shard_items: list[list[float]], ranks: list[list[int]], world_size: int) -> Balance:
    loads = [0.0] * world_size
    for costs, owners in zip(shard_items, ranks):
        for c, r in zip(costs, owners):
            loads[r] += c
    return Balance(tuple(loads))


def rank_summary(entries: list[tuple[int, float, int, int]], world_size: int, node_size: int | None = None) -> dict:
    """`plan --json` / run summary body from per-item (rank, cost, bytes_in, bytes_out).

    Returns {"ranks": [{"rank", "node", "items", "cost", "bytes_in", "bytes_out"}], "imbalance": max/mean cost,
    "idle_ranks": [...]}. Ranks with no item are listed as idle, never dropped."""
    node_size = node_size or world_size
    ranks = [{"rank": r, "node": r // node_size, "items": 0, "cost": 0.0, "bytes_in": 0, "bytes_out": 0}
             for r in range(world_size)]
    for rank, cost, bytes_in, bytes_out in entries:
        if not 0 <= rank < world_size:
            raise ValueError(f"item assigned to rank {rank}, outside world size {world_size}")
        d = ranks[rank]
        d["items"] += 1
        d["cost"] += cost
        d["bytes_in"] += bytes_in
        d["bytes_out"] += bytes_out
    return {"ranks": ranks, "imbalance": Balance(tuple(d["cost"] for d in ranks)).imbalance,
            "idle_ranks": [d["rank"] for d in ranks if d["items"] == 0]}


def measured_summary(seconds: list[float]) -> dict:
    """Run summary from each rank's measured seconds: per rank, max/mean, and the slowest rank."""
    if not seconds:
        raise ValueError("no rank reported its time; expected one entry per rank")
    return {"seconds": list(seconds), "imbalance": Balance(tuple(seconds)).imbalance,
            "slowest_rank": max(range(len(seconds)), key=lambda r: (seconds[r], -r))}

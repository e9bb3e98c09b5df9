"""Stage 2 (execute), every rank: shared weight amax of fused groups (q/k/v, gate/up, the experts of a layer).

Groups split over ranks (or with a member in a reused shard) are measured before the pipeline and merged with
a max over every rank's part; every other group is measured inside the pipeline as its members pass
(`PipelineGroups`), so no member is read twice.
"""
from __future__ import annotations

import torch

from .numerics import compute_amax
from .plan import ExportPlan, Item
from .runtime.progress import NO_PROGRESS


class PipelineGroups:
    """Shared weight amax measured as the members pass through the pipeline, so no member is read twice.

    A group whose members are all in this rank's pending shards is measured here: each member is uploaded as
    it arrives and waits on the device until the last member has arrived; the items behind it wait too,
    so tensors still reach the writer in layout order (the wait spans a few neighbouring tensors: q, k, v or
    gate, up of one layer). Groups split over ranks, or with a member in a reused shard, come measured in
    `known` (the "shared amax" step before the pipeline)."""

    def __init__(self, plan: ExportPlan, shards, known: dict[str, torch.Tensor]):  # shards: this rank's parts
        self.known = dict(known)
        here: dict[str, int] = {}
        for shard in shards:
            for name in shard.items:
                g = plan.items[name].group
                if g is not None and g not in self.known:
                    here[g] = here.get(g, 0) + 1
        for g, count in here.items():
            if count != len(plan.groups[g]):
                raise RuntimeError(f"shared-amax group {g!r}: {count} of {len(plan.groups[g])} members on rank, "
                                   f"and no amax measured before the pipeline")
        self.left = here
        self.amax: dict[str, torch.Tensor] = {}

    def needs(self, item: Item) -> bool:
        return item.quantized and item.group is not None and item.group in self.left

    def add(self, item: Item, w: torch.Tensor) -> None:
        """Fold one member's amax in (the same float32 max over members as `merge_group_amax`), kept on the
        member's device: no host sync per member."""
        g = item.group
        a = compute_amax(w, item.weight, item.name).float()
        self.amax[g] = a if g not in self.amax else torch.maximum(self.amax[g], a)
        self.left[g] -= 1
        if self.left[g] == 0:
            del self.left[g]
            self.known[g] = self.amax.pop(g)

    def ready(self, item: Item) -> bool:
        return not item.quantized or item.group is None or item.group in self.known


def split_groups(plan: ExportPlan) -> set[str]:
    """Shared-amax groups whose members are owned by more than one rank."""
    owner = plan.owners()
    return {g for g, members in plan.groups.items() if len({owner[m] for m in members}) > 1}


def groups_to_measure_first(plan: ExportPlan, rank: int, reused: dict[str, dict]) -> set[str]:
    """Groups this rank measures before its pipeline: those split over ranks, and its own groups with a member
    in a reused shard (not read again by the pipeline). Every other group is measured in the pipeline."""
    first = split_groups(plan)
    for part in plan.parts(rank):
        if part.filename in reused:
            first |= {plan.items[n].group for n in part.items if plan.items[n].group is not None}
    return first


def measure_group_amax(ctx, plan: ExportPlan, source, groups: set[str] | None = None,
                       progress=NO_PROGRESS) -> dict[str, float]:
    """This rank's part of the shared amax: max|W| over the members of `groups` (default: all) that it owns (each member read ticks `progress`)."""
    local: dict[str, float] = {}
    for name in plan.owned_items(ctx.rank):
        item = plan.items[name]
        if item.group is None or (groups is not None and item.group not in groups):
            continue
        amax = float(compute_amax(source.read(item.meta).to(ctx.device), item.weight, item.name))
        local[item.group] = max(local.get(item.group, 0.0), amax)
        progress.tick()
    return local


def merge_group_amax(plan: ExportPlan, parts: list[dict[str, float]], required=None) -> dict[str, torch.Tensor]:
    """Shared amax per group = max over every rank's part (order-independent: equals a single-process run).
    `required` (default: every group) must all have been measured."""
    merged: dict[str, float] = {}
    for part in parts:
        for g, v in part.items():
            merged[g] = max(merged.get(g, 0.0), v)
    missing = sorted(set(plan.groups if required is None else required) - set(merged))
    if missing:
        raise RuntimeError(f"no rank measured the shared amax of {missing[:3]}")
    return {g: torch.tensor(v, dtype=torch.float32) for g, v in merged.items()}

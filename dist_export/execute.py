"""Stage 2 (execute), every rank: write this rank's items into the shard files of its node, reusing the shards a
killed run finished.

`prepare_shards` (each shard's creator, one of its writers by turns) decides under `--resume` whether the finished shard
on disk is kept (its header and every tensor's bytes match the manifest record, and its source tensors
still have the crc32 recorded when it was written) or creates the shard's shared
temporary (`storage/shared_shard.py`); the step gathers every rank's answer, so all writers of a shard know it.
`execute_rank` hands this rank's parts of the pending shards to the thread pipeline (`pipeline.py`).
"""
from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field

import torch

from .groups import PipelineGroups
from .layout import staged_path
from .pipeline import run_pipeline
from .plan import ExportPlan
from .runtime.progress import NO_PROGRESS
from .storage.manifest import Manifest
from .tensor_checksums import SOURCE_CRC_KEY, tensor_crc
from .storage.shared_shard import create_shared

log = logging.getLogger(__name__)


@dataclass
class RankResult:
    rank: int
    shards: dict[str, dict] = field(default_factory=dict)  # filename -> {"tensors": {name: sha256}, "reused"}
    completed: dict[str, dict] = field(default_factory=dict)  # filename -> shard record, shards this rank finished
    bytes_read: int = 0
    bytes_written: int = 0
    items: int = 0
    seconds: float = 0.0
    peak_rss: int = 0
    peak_gpu: int = 0


def peak_rss_bytes() -> int:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _specs(shard) -> list[tuple[str, str, tuple[int, ...]]]:
    return [(t.name, t.dtype, t.shape) for t in shard.tensors]


def prepare_shards(ctx, plan: ExportPlan, out_dir: str, manifest: Manifest, source=None,
                   progress=NO_PROGRESS) -> dict[str, dict]:
    """For each shard this rank creates: {"reused": record} (--resume: the file's header and tensors verified
    against its record and, with `source`, every source tensor it came from read again and its crc32 compared
    with the one recorded when the shard was written) or {"handle": SharedHandle} of its new temporary (part
    records of earlier temporaries dropped first). The monitor ticks per shard, per chunk of a shard hashed and
    per item read, so a rank busy checking many or large shards is never called hung (`progress`)."""
    out = {}
    tick = progress.tick
    for shard in plan.shards:
        if shard.creator != ctx.rank:
            continue
        info = manifest.reusable(shard.filename, staged_path(out_dir, plan, shard.filename), tick)
        tick()
        if info is not None and source is not None and not _same_source(plan, source, shard, info, tick):
            log.warning("resume: the source tensors of %s changed since it was written; writing it again",
                        shard.filename)
            info = None
        if info is not None:
            out[shard.filename] = {"reused": info}
            continue
        manifest.clear_parts(shard.filename)
        out[shard.filename] = {"handle": create_shared(os.path.join(out_dir, shard.filename), _specs(shard),
                                                       tmp_dir=manifest.tmp)}
    return out


def merge_prepared(plan: ExportPlan, per_rank: list[dict[str, dict]]) -> dict[str, dict]:
    """Every rank's `prepare_shards` answers in one dict; each planned shard must have exactly one."""
    merged: dict[str, dict] = {}
    for part in per_rank:
        merged.update(part)
    missing = [s.filename for s in plan.shards if s.filename not in merged]
    if missing:
        raise RuntimeError(f"no rank prepared shard(s) {missing[:3]}")
    return merged


def reused_shards(prepared: dict[str, dict]) -> dict[str, dict]:
    return {f: e["reused"] for f, e in prepared.items() if "reused" in e}


def _same_source(plan: ExportPlan, source, shard, info: dict, tick) -> bool:
    recorded = info.get(SOURCE_CRC_KEY)
    if not isinstance(recorded, dict) or set(recorded) != set(shard.items):
        return False  # a record that binds no source bytes (an older run's) is not trusted
    for name in shard.items:
        if tensor_crc(source.read(plan.items[name].meta)) != recorded[name]:
            return False
        tick()
    return True


def execute_rank(ctx, plan: ExportPlan, source, output_format, out_dir: str, calib: dict,
                 group_amax: dict[str, torch.Tensor], manifest: Manifest, fault=None, *,
                 prepared: dict[str, dict], progress=NO_PROGRESS, allow_nonfinite: bool = False) -> RankResult:
    """Write this rank's items of every pending shard (the reused ones are reported by their creator); return
    its result. Shared-amax groups missing from `group_amax` are measured in the pipeline (`PipelineGroups`)."""
    start = time.monotonic()
    result = RankResult(ctx.rank)
    todo = []
    for part in plan.parts(ctx.rank):
        entry = prepared[part.filename]
        if "reused" in entry:
            if part.shard.creator == ctx.rank:
                info = entry["reused"]
                result.shards[part.filename] = {"tensors": info["tensors"], "reused": True}
                result.completed[part.filename] = info
                log.info("resume: reusing %s (checksums verified)", part.filename)
                progress.advance(len(part.shard.items), part.shard.nbytes)
        else:
            todo.append((part, entry["handle"]))
    if todo:
        groups = PipelineGroups(plan, [p for p, _ in todo], group_amax)
        run_pipeline(ctx, plan, source, output_format, out_dir, calib, groups, manifest, todo, result, fault,
                     progress, allow_nonfinite)
    result.seconds = time.monotonic() - start
    result.peak_rss = peak_rss_bytes()
    if ctx.device.type == "cuda":
        result.peak_gpu = torch.cuda.max_memory_allocated(ctx.device)
    return result

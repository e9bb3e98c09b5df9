"""Stage 2 (execute), every rank: write every shard this rank owns, reusing the ones a killed run finished.

`execute_rank` hands the pending shards to the thread pipeline (`pipeline.py`); `reusable_shards` decides,
under `--resume`, which finished shards are kept (checksums verified against the manifest, source bytes
compared with the crc32 recorded when each shard was written).
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import torch

from .groups import PipelineGroups
from .layout import staged_path
from .pipeline import run_pipeline
from .plan import ExportPlan
from .runtime.progress import NO_PROGRESS
from .storage.manifest import SOURCE_CRC_KEY, Manifest, tensor_crc

log = logging.getLogger(__name__)


@dataclass
class RankResult:
    rank: int
    shards: dict[str, dict] = field(default_factory=dict)  # filename -> {"sha256", "size", "reused"}
    bytes_read: int = 0
    bytes_written: int = 0
    items: int = 0
    seconds: float = 0.0
    peak_rss: int = 0
    peak_gpu: int = 0


def peak_rss_bytes() -> int:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def reusable_shards(ctx, plan: ExportPlan, out_dir: str, manifest: Manifest, source=None,
                    progress=NO_PROGRESS) -> dict[str, dict]:
    """This rank's shards that --resume keeps, by filename: each file's checksum verified against its record and,
    with `source`, every source tensor it came from read again and its crc32 compared with the one the reader
    took when the shard was written (a source rewritten in place is caught; the shard is written again).
    `progress` ticks per shard and per item read, so a rank busy checking many shards is never called hung."""
    reused = {}
    tick = progress.tick
    for shard in plan.owned_shards(ctx.rank):
        info = manifest.reusable(shard.filename, staged_path(out_dir, plan, shard.filename))
        tick()
        if info is not None and source is not None and not _same_source(plan, source, shard, info, tick):
            log.warning("resume: the source tensors of %s changed since it was written; writing it again",
                        shard.filename)
            info = None
        if info is not None:
            reused[shard.filename] = info
    return reused


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
                 reused: dict[str, dict], progress=NO_PROGRESS) -> RankResult:
    """Write every shard this rank owns except the `reused` ones (finished by an earlier run); return its result.
    Shared-amax groups missing from `group_amax` are measured in the pipeline (see `PipelineGroups`)."""
    start = time.monotonic()
    result = RankResult(ctx.rank)
    todo = []
    for shard in plan.owned_shards(ctx.rank):
        if shard.filename in reused:
            result.shards[shard.filename] = {**reused[shard.filename], "reused": True}
            log.info("resume: reusing %s (checksum verified)", shard.filename)
            progress.advance(len(shard.items), shard.nbytes)
        else:
            todo.append(shard)
    if todo:
        groups = PipelineGroups(plan, todo, group_amax)
        run_pipeline(ctx, plan, source, output_format, out_dir, calib, groups, manifest, todo, result, fault,
                     progress)
    result.seconds = time.monotonic() - start
    result.peak_rss = peak_rss_bytes()
    if ctx.device.type == "cuda":
        result.peak_gpu = torch.cuda.max_memory_allocated(ctx.device)
    return result

"""Stage 2, every rank: read the owned items, quantize them on this rank's device, write the owned shards.

Threads overlap the work of one rank: a reader prefetches the next items' bytes (positioned reads,
bounded queue), the main thread quantizes on the device, and a writer hands finished tensors to the open
shard, whose pool writes them at their planned offsets (file writes release the GIL). Host memory is bounded by the two queues, the
pinned rings and `WRITE_IN_FLIGHT` bytes per open shard; a shard never sits whole in memory. Each finished shard is fsynced, renamed and recorded in the resume manifest.
"""
from __future__ import annotations

import logging
import os
import queue
import threading
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import torch

from .io.writer import ShardWriter
from .manifest import Manifest
from .numerics import compute_amax
from .plan import ExportPlan, Item
from .ring import HostRing, ring_size_for

log = logging.getLogger(__name__)
_DONE = object()
WRITE_THREADS = 4  # positioned writes per rank at once (see io/writer.py)
WRITE_IN_FLIGHT = 512 * 1024 * 1024  # bytes a shard writer may have queued before the writer thread waits


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


def staged_path(out_dir: str, plan: ExportPlan, filename: str) -> str:
    """Where a finished shard waits for the commit. A single `model.safetensors` keeps a staging name until
    rank 0 commits, since its final name alone would make a partial export look complete."""
    if plan.single_file:
        return os.path.join(out_dir, filename + ".staged")
    return os.path.join(out_dir, filename)


def peak_rss_bytes() -> int:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class _Worker(threading.Thread):
    """A thread whose exception is re-raised in the main thread."""

    def __init__(self, name, fn):
        super().__init__(name=name, daemon=True)
        self.fn, self.error = fn, None

    def run(self):
        try:
            self.fn()
        except BaseException as e:  # noqa: BLE001 - handed to the main thread
            self.error = e


def input_amax_for(item: Item, calib: dict) -> torch.Tensor | None:
    if item.input is None or item.input.dynamic:
        return None
    from .writers.modelopt import fused_input_amax

    return fused_input_amax(item.module, calib)


def reusable_shards(ctx, plan: ExportPlan, out_dir: str, manifest: Manifest) -> dict[str, dict]:
    """This rank's shards that --resume keeps (each file's checksum verified against its record), by filename."""
    reused = {}
    for shard in plan.owned_shards(ctx.rank):
        info = manifest.reusable(shard.filename, staged_path(out_dir, plan, shard.filename))
        if info is not None:
            reused[shard.filename] = info
    return reused


def execute_rank(ctx, plan: ExportPlan, source, output_format, out_dir: str, calib: dict,
                 group_amax: dict[str, torch.Tensor], manifest: Manifest, fault=None, *,
                 reused: dict[str, dict]) -> RankResult:
    """Write every shard this rank owns except the `reused` ones (finished by an earlier run); return its result.
    Shared-amax groups missing from `group_amax` are measured in the pipeline (see `PipelineGroups`)."""
    start = time.monotonic()
    result = RankResult(ctx.rank)
    todo = []
    for shard in plan.owned_shards(ctx.rank):
        if shard.filename in reused:
            result.shards[shard.filename] = {**reused[shard.filename], "reused": True}
            log.info("resume: reusing %s (checksum verified)", shard.filename)
            if ctx.monitor:
                ctx.monitor.advance(len(shard.items), shard.nbytes)
        else:
            todo.append(shard)
    if todo:
        groups = PipelineGroups(plan, todo, group_amax)
        _run_pipeline(ctx, plan, source, output_format, out_dir, calib, groups, manifest, todo, result, fault)
    result.seconds = time.monotonic() - start
    result.peak_rss = peak_rss_bytes()
    if ctx.device.type == "cuda":
        result.peak_gpu = torch.cuda.max_memory_allocated(ctx.device)
    return result


class PipelineGroups:
    """Shared weight amax measured as the members pass through the pipeline, so no member is read twice.

    A group whose members are all in this rank's pending shards is measured here: each member is uploaded as
    it arrives and waits on the device until the last member has arrived; the items behind it wait too,
    so tensors still reach the writer in layout order (the wait spans a few neighbouring tensors: q, k, v or
    gate, up of one layer). Groups split over ranks, or with a member in a reused shard, come measured in
    `known` (the "shared amax" step before the pipeline)."""

    def __init__(self, plan: ExportPlan, shards, known: dict[str, torch.Tensor]):
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
        self.amax: dict[str, float] = {}

    def needs(self, item: Item) -> bool:
        return item.quantized and item.group is not None and item.group in self.left

    def add(self, item: Item, w: torch.Tensor) -> None:
        """Fold one member's amax in (same max over members, as floats, as `merge_group_amax`)."""
        g = item.group
        self.amax[g] = max(self.amax.get(g, 0.0), float(compute_amax(w, item.weight, item.name)))
        self.left[g] -= 1
        if self.left[g] == 0:
            del self.left[g]
            self.known[g] = torch.tensor(self.amax.pop(g), dtype=torch.float32)

    def ready(self, item: Item) -> bool:
        return not item.quantized or item.group is None or item.group in self.known


class _Job:
    """One tensor on its way to the writer; `ready` (CUDA event) must complete before its bytes are read,
    `release` runs after the write (returns a ring buffer)."""

    __slots__ = ("name", "tensor", "ready", "release")

    def __init__(self, name, tensor, ready=None, release=None):
        self.name, self.tensor, self.ready, self.release = name, tensor, ready, release


def _run_pipeline(ctx, plan, source, output_format, out_dir, calib, groups, manifest, shards, result, fault):
    """Reader thread -> device compute (main thread) -> copy stream -> writer thread, all bounded."""
    cuda = ctx.device.type == "cuda"
    max_in = max(plan.items[n].meta.nbytes for s in shards for n in s.items)
    in_ring = HostRing(3, ring_size_for(max_in), pinned=cuda) if cuda else None
    read_q: queue.Queue = queue.Queue(maxsize=2)
    write_q: queue.Queue = queue.Queue(maxsize=4)
    stop = threading.Event()

    def reader():
        for shard in shards:
            for name in shard.items:
                if stop.is_set():
                    return
                meta = plan.items[name].meta
                idx = None
                if in_ring is not None and in_ring.fits(meta.nbytes):
                    # None once the pipeline is stopping, so a failed main thread never waits on the reader
                    idx = _retry(in_ring.acquire, stop.is_set)
                    if idx is None:
                        return
                    tensor = source.read(meta, out=in_ring.buffers[idx])
                else:
                    tensor = source.read(meta)
                _retry(lambda t, job=(shard, name, tensor, idx): read_q.put(job, timeout=t), stop.is_set)
                result.bytes_read += meta.nbytes
        _retry(lambda t: read_q.put(_DONE, timeout=t), stop.is_set)

    open_writer: dict = {}
    finisher = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"fsync-rank{ctx.rank}")
    write_pool = ThreadPoolExecutor(max_workers=WRITE_THREADS, thread_name_prefix=f"pwrite-rank{ctx.rank}")
    finishing: list = []

    def _finish_shard(w, shard):
        dest = staged_path(out_dir, plan, shard.filename)
        sha = w.finish(rename_to=dest)
        info = {"sha256": sha, "size": os.path.getsize(dest)}
        manifest.record_shard(shard.filename, info)
        result.shards[shard.filename] = {**info, "reused": False}

    def writer():
        while True:
            try:
                job = write_q.get(timeout=0.2)
            except queue.Empty:
                if stop.is_set():
                    return
                continue
            if job is _DONE:
                return
            if isinstance(job, _Job):
                if job.ready is not None:
                    job.ready.synchronize()
                # returns at once; the pool writes the pieces and `release` returns the buffer when done
                open_writer["w"].write_async(job.name, job.tensor, done=job.release)
                result.bytes_written += job.tensor.numel() * job.tensor.element_size()
            elif job[0] == "open":
                shard = job[1]
                path = os.path.join(out_dir, shard.filename)
                open_writer["w"] = ShardWriter(path, [(t.name, t.dtype, t.shape) for t in shard.tensors],
                                               {"format": "pt"}, pool=write_pool, max_in_flight=WRITE_IN_FLIGHT)
            elif job[0] == "close":
                # fsync + rename on the finisher thread: the next shard's writes start at once
                finishing.append(finisher.submit(_finish_shard, open_writer.pop("w"), job[1]))

    threads = [_Worker(f"reader-rank{ctx.rank}", reader), _Worker(f"writer-rank{ctx.rank}", writer)]
    out_ring = copy_stream = current = None

    def emit(arrival: _Arrival) -> None:
        nonlocal current
        if arrival.shard is not current:
            if current is not None:
                _put_checked(write_q, ("close", current), threads)
            _put_checked(write_q, ("open", arrival.shard), threads)
            current = arrival.shard
        # a failed writer never returns its buffers: its error is raised instead of waiting
        acquire_out = lambda: _retry(out_ring.acquire, _raising(threads))  # noqa: E731
        for out in _item_jobs(ctx, arrival, in_ring, out_ring, acquire_out, copy_stream, output_format, calib,
                              groups.known):
            _put_checked(write_q, out, threads)
        result.items += 1
        if ctx.monitor:
            ctx.monitor.advance(1, sum(t.nbytes for t in output_format.outputs(arrival.item)))

    try:
        threads[0].start()  # the reader fills the first buffers while the output side is set up
        out_ring = HostRing(3, ring_size_for(max_in), pinned=True) if cuda else None
        copy_stream = torch.cuda.Stream(ctx.device) if cuda else None
        threads[1].start()
        waiting: deque[_Arrival] = deque()
        while True:
            job = _get(read_q, threads)
            if job is _DONE:
                break
            shard, name, cpu_tensor, in_idx = job
            item = plan.items[name]
            if fault is not None:
                fault.maybe_fire(ctx.rank, name)
            arrival = _arrive(ctx, shard, item, cpu_tensor, in_idx, in_ring, must_wait=bool(waiting))
            if groups.needs(item):
                groups.add(item, arrival.tensor)
            waiting.append(arrival)
            while waiting and groups.ready(waiting[0].item):
                emit(waiting.popleft())
        if waiting:
            raise RuntimeError(f"shared-amax groups {sorted(groups.left)[:3]} never completed; "
                               f"{len(waiting)} tensors were not written")
        if current is not None:
            _put_checked(write_q, ("close", current), threads)
        _put_checked(write_q, _DONE, threads)
        threads[1].join()
        if threads[1].error:
            raise threads[1].error
        for f in finishing:
            f.result()
    except BaseException:
        stop.set()
        for t in threads:
            if t.is_alive():
                t.join(timeout=10)
        if "w" in open_writer:
            open_writer["w"].abort()
        raise
    finally:
        finisher.shutdown(wait=True)
        write_pool.shutdown(wait=True)


def _retry(op, abort):
    """`op(timeout)` until it returns (a queue or ring that is not full/empty), checking `abort()` before each
    try: it may raise (a pipeline thread failed) or return True (stop: give up and return None)."""
    while not abort():
        try:
            return op(0.2)
        except (queue.Empty, queue.Full):
            continue
    return None


def _raise_errors(threads) -> None:
    for t in threads:
        if t.error is not None:
            raise t.error


def _get(q, threads):
    while True:
        try:
            return q.get(timeout=0.2)
        except queue.Empty:
            _raise_errors(threads)
            if not threads[0].is_alive() and q.empty():  # the reader ended without its _DONE
                return _DONE


def _raising(threads):
    """An `abort` for `_retry` that raises a failed thread's error and otherwise keeps waiting."""
    return lambda: _raise_errors(threads) or False


def _put_checked(q, obj, threads):
    _retry(lambda t: q.put(obj, timeout=t), _raising(threads))


class _Arrival:
    """An item taken from the reader: its tensor is on the device (quantized items, uploaded at once so the
    host buffer goes back to the reader) or on the host (copied items; `in_idx` holds its ring buffer)."""

    __slots__ = ("shard", "item", "tensor", "in_idx")

    def __init__(self, shard, item, tensor, in_idx):
        self.shard, self.item, self.tensor, self.in_idx = shard, item, tensor, in_idx


def _arrive(ctx, shard, item, cpu_tensor, in_idx, in_ring, must_wait: bool) -> _Arrival:
    """Upload a quantized item (releasing its pinned buffer once the copy is done); a copied item that must
    wait behind others leaves the ring too (a private copy), so the reader never starves."""
    if item.quantized:
        w = cpu_tensor.to(ctx.device, non_blocking=in_idx is not None)
        if in_idx is not None:  # the reader may refill this buffer once the upload has completed
            uploaded = torch.cuda.Event()
            uploaded.record()
            in_ring.release(in_idx, uploaded)
        return _Arrival(shard, item, w, None)
    if must_wait and in_idx is not None:
        private = cpu_tensor.clone()
        in_ring.release(in_idx)
        return _Arrival(shard, item, private, None)
    return _Arrival(shard, item, cpu_tensor, in_idx)


def _item_jobs(ctx, arrival: _Arrival, in_ring, out_ring, acquire_out, copy_stream, output_format, calib,
               group_amax):
    """Jobs for the writer: copies go straight through; quantized items run on the device and come back
    through pinned buffers on the copy stream (the main thread goes on with the next item meanwhile)."""
    item, in_idx = arrival.item, arrival.in_idx
    if not item.quantized:
        release = (lambda: in_ring.release(in_idx)) if in_idx is not None else None
        return [_Job(item.name, arrival.tensor, release=release)]
    outs = _device_outputs(ctx, item, arrival.tensor, output_format, calib, group_amax)
    if copy_stream is None:
        return [_Job(n, t.to("cpu")) for n, t in outs]
    jobs = []
    copy_stream.wait_stream(torch.cuda.current_stream(ctx.device))
    for n, t in outs:
        nbytes = t.numel() * t.element_size()
        if not out_ring.fits(nbytes):
            jobs.append(_Job(n, t.to("cpu")))
            continue
        idx = acquire_out()
        host = out_ring.view(idx, t.dtype, t.shape)
        with torch.cuda.stream(copy_stream):
            host.copy_(t, non_blocking=True)
            t.record_stream(copy_stream)
            done = torch.cuda.Event()
            done.record(copy_stream)
        jobs.append(_Job(n, host, ready=done, release=lambda i=idx: out_ring.release(i)))
    return jobs


def _device_outputs(ctx, item: Item, w: torch.Tensor, output_format, calib, group_amax):
    """Quantize one weight on its device; returns the format's output tensors (still on the device)."""
    if item.stacked:
        return [(item.name, _fold_stack(ctx, item, w))]
    amax = group_amax[item.group].to(w.device) if item.group else compute_amax(w, item.weight, item.name)
    block_amax = None
    if item.weight.scale_search == "mse":
        from .numerics.mse import search_block_amax

        amax, block_amax = search_block_amax(w, item.weight, amax, tick=ctx.monitor.tick if ctx.monitor else None)
    return output_format.produce(item, w, amax, block_amax, input_amax_for(item, calib))


def _fold_stack(ctx, item: Item, w: torch.Tensor) -> torch.Tensor:
    """Fake-quant every expert of a 3-D stack as its own [out, in] matrix (shared amax if the recipe says)."""
    from .numerics import fake_quant

    def matrix(e):
        return w[e].t() if item.stacked == "in_out" else w[e]

    shared = compute_amax(w.reshape(-1, w.shape[-1]), item.weight, item.name).amax() if item.share_stack else None
    out = torch.empty_like(w)
    for e in range(w.shape[0]):
        m = matrix(e)
        amax = shared if shared is not None else compute_amax(m, item.weight, f"{item.name}[{e}]")
        block_amax = None
        if item.weight.scale_search == "mse":
            from .numerics.mse import search_block_amax

            amax, block_amax = search_block_amax(m, item.weight, amax)
        y = fake_quant(m, item.weight, amax, block_amax)
        out[e] = y.t() if item.stacked == "in_out" else y
        if ctx.monitor:
            ctx.monitor.tick()
    return out


def _quantize_item(ctx, item: Item, cpu_tensor: torch.Tensor, output_format, calib, group_amax):
    """The outputs of one item on the host, in `outputs(item)` order (synchronous; used by verify)."""
    if not item.quantized:
        return [(item.name, cpu_tensor)]
    outs = _device_outputs(ctx, item, cpu_tensor.to(ctx.device), output_format, calib, group_amax)
    return [(n, t.to("cpu")) for n, t in outs]


def split_groups(plan: ExportPlan) -> set[str]:
    """Shared-amax groups whose members are owned by more than one rank."""
    owner = {n: s.owner for s in plan.shards for n in s.items}
    return {g for g, members in plan.groups.items() if len({owner[m] for m in members}) > 1}


def groups_to_measure_first(plan: ExportPlan, rank: int, reused: dict[str, dict]) -> set[str]:
    """Groups this rank measures before its pipeline: those split over ranks, and its own groups with a member
    in a reused shard (not read again by the pipeline). Every other group is measured in the pipeline."""
    first = split_groups(plan)
    for shard in plan.owned_shards(rank):
        if shard.filename in reused:
            first |= {plan.items[n].group for n in shard.items if plan.items[n].group is not None}
    return first


def measure_group_amax(ctx, plan: ExportPlan, source, groups: set[str] | None = None) -> dict[str, float]:
    """This rank's part of the shared amax: max|W| over the members of `groups` (default: all) in the shards it
    owns."""
    local: dict[str, float] = {}
    for shard in plan.owned_shards(ctx.rank):
        for name in shard.items:
            item = plan.items[name]
            if item.group is None or (groups is not None and item.group not in groups):
                continue
            amax = float(compute_amax(source.read(item.meta).to(ctx.device), item.weight, item.name))
            local[item.group] = max(local.get(item.group, 0.0), amax)
            if ctx.monitor:
                ctx.monitor.tick()
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

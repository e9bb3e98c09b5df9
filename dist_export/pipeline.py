"""Stage 2 (execute), every rank: the thread pipeline that moves one rank's items from disk into its shard files.

A reader thread prefetches the next items' bytes (positioned reads, bounded queue), the main thread quantizes
on the device, a copy stream brings results back through pinned buffers, and a writer thread hands finished
tensors to this rank's part of the open shard, whose pool writes them at their planned offsets (file writes
release the GIL; other ranks of the node write their own tensors into the same file, `storage/shared_shard.py`).
Host memory is bounded by the two queues, the pinned rings (`HostRing`) and `WRITE_IN_FLIGHT` bytes per open
shard; a shard never sits whole in memory. Each finished part is fsynced and recorded in the resume manifest; the
rank whose part completes a shard records and renames it. Host buffers are allocated once per rank, not per item:
a buffer goes back to its ring with an optional CUDA event, and the next user waits for that event before
overwriting it.

The main thread never waits for the GPU per item: uploads run on their own stream (the kernels of item N
overlap the upload of item N+1 and the download of item N-1), shared amax stay on the device, and the
NaN/inf refusal of an item is counted on the device and checked by the writer thread, which waits for the
item's download anyway, before any byte of that item is written.
"""
from __future__ import annotations

import math
import queue
import threading
from collections import deque
from concurrent.futures import ThreadPoolExecutor

import torch

from .layout import staged_path
from .numerics.blocks import check_finite_copy, deferred_finite_checks, raise_if_nonfinite
from .plan import item_outputs
from .quantize import device_outputs
from .runtime.progress import NO_PROGRESS
from .sources.quantized import EncodedTensor
from .tensor_checksums import tensor_crc
from .storage.shared_shard import PartWriter, complete_part

_DONE = object()
WRITE_THREADS = 4  # positioned writes per rank at once (see storage/shard_file.py)
WRITE_IN_FLIGHT = 512 * 1024 * 1024  # bytes a shard writer may have queued before the writer thread waits


class HostRing:
    def __init__(self, count: int, nbytes: int, pinned: bool):
        self.nbytes = nbytes
        self.buffers = [torch.empty(nbytes, dtype=torch.uint8, pin_memory=pinned) for _ in range(count)]
        self._free: queue.Queue = queue.Queue()
        for i in range(count):
            self._free.put((i, None))

    def fits(self, nbytes: int) -> bool:
        return nbytes <= self.nbytes

    def acquire(self, timeout: float | None = None) -> int:
        """Index of a free buffer (blocks); waits for the event its last user attached."""
        idx, event = self._free.get(timeout=timeout)
        if event is not None:
            event.synchronize()
        return idx

    def release(self, idx: int, event=None) -> None:
        self._free.put((idx, event))

    def view(self, idx: int, dtype: torch.dtype, shape) -> torch.Tensor:
        nbytes = math.prod(shape) * torch.tensor([], dtype=dtype).element_size()
        return self.buffers[idx][:nbytes].view(dtype).reshape(shape)


def ring_size_for(max_item_bytes: int, cap: int = 256 * 1024 * 1024) -> int:
    return max(1, min(max_item_bytes, cap))


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


class _Job:
    """One tensor on its way to the writer; `ready` (CUDA event) must complete before its bytes are read,
    `release` runs after the write (returns a ring buffer); `check` (names, host NaN/inf counts, CUDA event
    after which the counts are on the host) refuses the item before its bytes are written."""

    __slots__ = ("name", "tensor", "ready", "release", "check")

    def __init__(self, name, tensor, ready=None, release=None, check=None):
        self.name, self.tensor, self.ready, self.release, self.check = name, tensor, ready, release, check


def run_pipeline(ctx, plan, source, output_format, out_dir, calib, groups, manifest, parts, result, fault,
                 progress=NO_PROGRESS, allow_nonfinite=False):
    """Reader thread -> device compute (main thread) -> copy stream -> writer thread, all bounded; every item
    written advances `progress`. `parts`: (ShardPart, SharedHandle) of this rank in file order. The reader
    refuses a copied float tensor with NaN/inf unless `allow_nonfinite` (quantized ones are refused on the
    device)."""
    cuda = ctx.device.type == "cuda"
    shards = [p for p, _ in parts]
    handles = {p.filename: h for p, h in parts}
    max_in = max(plan.items[n].meta.nbytes for s in shards for n in s.items)
    in_ring = HostRing(3, ring_size_for(max_in), pinned=cuda) if cuda else None
    read_q: queue.Queue = queue.Queue(maxsize=2)
    write_q: queue.Queue = queue.Queue(maxsize=4)
    stop = threading.Event()
    crcs: dict[str, dict[str, str]] = {}  # shard -> {item: crc32 of its source bytes}, filled by the reader

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
                if not allow_nonfinite and not plan.items[name].quantized and not isinstance(tensor, EncodedTensor):
                    check_finite_copy(tensor, name)  # (an encoded source weight: checked once decoded, _item_jobs)
                crcs.setdefault(shard.filename, {})[name] = tensor_crc(tensor)  # binds a resume to these bytes
                _retry(lambda t, job=(shard, name, tensor, idx): read_q.put(job, timeout=t), stop.is_set)
                result.bytes_read += meta.nbytes
        _retry(lambda t: read_q.put(_DONE, timeout=t), stop.is_set)

    open_writer: dict = {}
    finisher = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"fsync-rank{ctx.rank}")
    write_pool = ThreadPoolExecutor(max_workers=WRITE_THREADS, thread_name_prefix=f"pwrite-rank{ctx.rank}")
    finishing: list = []

    def _finish_part(w, part):
        # fsync, part record and, if this part completes the shard, the shard record then the rename (a shard in
        # --out is always named by a record of ours)
        sums = w.finish()
        tensors = [(t.name, t.dtype, t.shape) for t in part.shard.tensors]
        info = complete_part(manifest, ctx.rank, handles[part.filename], part.filename, tensors, sums,
                             staged_path(out_dir, plan, part.filename), crcs.get(part.filename, {}))
        result.shards[part.filename] = {"tensors": sums, "reused": False}
        if info is not None:
            result.completed[part.filename] = info

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
                if job.check is not None:
                    names, counts, copied = job.check
                    if copied is not None:
                        copied.synchronize()
                    raise_if_nonfinite(names, counts)
                # returns at once; the pool writes the pieces and `release` returns the buffer when done
                open_writer["w"].write_async(job.name, job.tensor, done=job.release)
                result.bytes_written += job.tensor.numel() * job.tensor.element_size()
            elif job[0] == "open":
                part = job[1]
                open_writer["w"] = PartWriter(handles[part.filename], part.filename,
                                              [(t.name, t.dtype, t.shape) for t in part.shard.tensors],
                                              list(part.tensors), pool=write_pool, max_in_flight=WRITE_IN_FLIGHT)
            elif job[0] == "close":
                # on the finisher thread: the next shard's writes start at once
                finishing.append(finisher.submit(_finish_part, open_writer.pop("w"), job[1]))

    threads = [_Worker(f"reader-rank{ctx.rank}", reader), _Worker(f"writer-rank{ctx.rank}", writer)]
    out_ring = copy_stream = upload_stream = current = None

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
                              groups.known, progress, check_decoded=not allow_nonfinite):
            _put_checked(write_q, out, threads)
        result.items += 1
        progress.advance(1, sum(t.nbytes for t in item_outputs(output_format, arrival.item)))

    try:
        threads[0].start()  # the reader fills the first buffers while the output side is set up
        out_ring = HostRing(3, ring_size_for(max_in), pinned=True) if cuda else None
        copy_stream = torch.cuda.Stream(ctx.device) if cuda else None
        upload_stream = torch.cuda.Stream(ctx.device) if cuda else None
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
            arrival = _arrive(ctx, shard, item, cpu_tensor, in_idx, in_ring, upload_stream,
                              must_wait=bool(waiting))
            if groups.needs(item):
                with deferred_finite_checks(arrival.checks):
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

    __slots__ = ("shard", "item", "tensor", "in_idx", "checks", "decoded")

    def __init__(self, shard, item, tensor, in_idx, decoded: bool = False):
        self.shard, self.item, self.tensor, self.in_idx = shard, item, tensor, in_idx
        self.checks: list = []  # deferred NaN/inf counts (name, device tensor) of this item
        self.decoded = decoded  # an encoded source weight, decoded here (the reader could not check it)


def _upload(ctx, cpu_tensor, in_idx, in_ring, upload_stream) -> torch.Tensor:
    """Copy a pinned ring buffer to the device on the upload stream; the compute stream waits for it on the
    GPU (not the host), and the reader may refill the buffer once the copy has completed. An encoded source
    weight is decoded on the compute stream, as before."""
    if in_idx is None or upload_stream is None or isinstance(cpu_tensor, EncodedTensor):
        w = cpu_tensor.to(ctx.device, non_blocking=in_idx is not None)
        if in_idx is not None:  # the reader may refill this buffer once the upload has completed
            uploaded = torch.cuda.Event()
            uploaded.record()
            in_ring.release(in_idx, uploaded)
        return w
    compute = torch.cuda.current_stream(ctx.device)
    with torch.cuda.stream(upload_stream):
        w = cpu_tensor.to(ctx.device, non_blocking=True)
        uploaded = torch.cuda.Event()
        uploaded.record(upload_stream)
    compute.wait_event(uploaded)
    w.record_stream(compute)  # allocated on the upload stream, used and freed on the compute stream
    in_ring.release(in_idx, uploaded)
    return w


def _arrive(ctx, shard, item, cpu_tensor, in_idx, in_ring, upload_stream, must_wait: bool) -> _Arrival:
    """Upload a quantized item or an encoded source weight (decoded on the device; the pinned buffer is released
    once the copy is done); a copied item that must wait behind others leaves the ring too (a private copy), so
    the reader never starves."""
    if item.quantized or isinstance(cpu_tensor, EncodedTensor):
        return _Arrival(shard, item, _upload(ctx, cpu_tensor, in_idx, in_ring, upload_stream), None,
                        decoded=isinstance(cpu_tensor, EncodedTensor))
    if must_wait and in_idx is not None:
        private = cpu_tensor.clone()
        in_ring.release(in_idx)
        return _Arrival(shard, item, private, None)
    return _Arrival(shard, item, cpu_tensor, in_idx)


def _item_jobs(ctx, arrival: _Arrival, in_ring, out_ring, acquire_out, copy_stream, output_format, calib,
               group_amax, progress=NO_PROGRESS, check_decoded: bool = True):
    """Jobs for the writer: copies go straight through; quantized items run on the device and come back
    through pinned buffers on the copy stream (the main thread goes on with the next item meanwhile). A copied
    item decoded from an encoded source weight is checked for NaN/inf here (`check_decoded`: no
    --allow-nonfinite), at once on the host, deferred on a GPU."""
    item, in_idx = arrival.item, arrival.in_idx
    if check_decoded and arrival.decoded and not item.quantized:
        with deferred_finite_checks(arrival.checks):
            check_finite_copy(arrival.tensor, item.name)
    if not item.quantized and arrival.tensor.device.type == "cpu":
        release = (lambda: in_ring.release(in_idx)) if in_idx is not None else None
        return [_Job(item.name, arrival.tensor, release=release)]
    # a copied item whose source weight was decoded on the device comes back like a quantized output
    with deferred_finite_checks(arrival.checks) as checks:
        outs = (device_outputs(ctx, item, arrival.tensor, output_format, calib, group_amax, progress) if item.quantized
                else [(item.name, arrival.tensor)])
    if copy_stream is None:
        check = _host_check(checks, _stacked(checks), None)
        return [_Job(n, t.to("cpu"), check=check) for n, t in outs]
    jobs = []
    counts = _stacked(checks)  # on the compute stream, before the copy stream's wait below
    copy_stream.wait_stream(torch.cuda.current_stream(ctx.device))
    check = _host_check(checks, counts, copy_stream)
    for n, t in outs:
        nbytes = t.numel() * t.element_size()
        if not out_ring.fits(nbytes):
            jobs.append(_Job(n, t.to("cpu"), check=check))
            continue
        idx = acquire_out()
        host = out_ring.view(idx, t.dtype, t.shape)
        with torch.cuda.stream(copy_stream):
            host.copy_(t, non_blocking=True)
            t.record_stream(copy_stream)
            done = torch.cuda.Event()
            done.record(copy_stream)
        jobs.append(_Job(n, host, ready=done, release=lambda i=idx: out_ring.release(i), check=check))
    return jobs


def _stacked(checks):
    return torch.stack([c for _, c in checks]) if checks else None


def _host_check(checks, counts, copy_stream):
    """(names, NaN/inf counts on the host, event) of an item's deferred checks (`counts`: `_stacked`, queued on
    the compute stream before the copy stream waited for it): downloaded into pinned memory on the copy
    stream (complete once the event is), or at once without one."""
    if not checks:
        return None
    names = [n for n, _ in checks]
    if copy_stream is None:
        return names, counts.cpu(), None
    host = torch.empty(counts.shape, dtype=counts.dtype, pin_memory=True)
    with torch.cuda.stream(copy_stream):
        host.copy_(counts, non_blocking=True)
        counts.record_stream(copy_stream)
        copied = torch.cuda.Event()
        copied.record(copy_stream)
    return names, host, copied

"""Real gloo ranks for tests: spawned processes meeting in a FileStore under tmp_path (no ports, so tests
under pytest-xdist never collide)."""
from __future__ import annotations

import multiprocessing as mp
import os
import traceback


def _entry(rank, world_size, store_path, fn, args, results, env):
    os.environ.update(env)
    os.environ["OMP_NUM_THREADS"] = "1"
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    from dist_export.runtime.dist import init_distributed

    try:
        store = dist.FileStore(store_path, world_size)
        ctx = init_distributed(device="cpu", store=store, rank=rank, world_size=world_size, timeout_s=120)
        try:
            results[rank] = ("ok", fn(ctx, *args))
        finally:
            ctx.close()
    except BaseException as e:  # noqa: BLE001
        results[rank] = ("error", f"{type(e).__name__}: {e}\n{traceback.format_exc()}")


def run_ranks(world_size: int, fn, *args, tmp_path, timeout: float = 240.0, env=None) -> list:
    """Run fn(ctx, *args) on `world_size` spawned gloo ranks; returns each rank's ("ok"|"error", value)."""
    ctx = mp.get_context("spawn")
    manager = ctx.Manager()
    results = manager.dict()
    store_path = str(tmp_path / f"store-{os.getpid()}-{id(fn)}-{world_size}")
    env = {"DIST_EXPORT_CACHE": os.environ.get("DIST_EXPORT_CACHE", ""), **(env or {})}
    procs = [ctx.Process(target=_entry, args=(r, world_size, store_path, fn, args, results, env))
             for r in range(world_size)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout)
    for p in procs:
        if p.is_alive():
            p.kill()
    out = [results.get(r, ("error", f"rank {r} exited with code {procs[r].exitcode}")) for r in range(world_size)]
    manager.shutdown()
    return out

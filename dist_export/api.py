"""Python API: `export(...)` runs plan -> execute -> commit on every rank of the current launch.

    import dist_export
    dist_export.export("synthetic:llama-tiny", "out/", recipe="fp8-block", format="vllm-fq")

Under torchrun each process calls the same function; the ranks find each other from the environment.
"""
from __future__ import annotations

import logging
import os
import time
from dataclasses import asdict

from . import __version__
from .calibration.file import load_calibration, model_signature, required_input_quantizers
from .commit import commit_export
from .runtime.dist import DistContext, ExportError, init_distributed
from .execute import execute_rank, reusable_shards
from .groups import groups_to_measure_first, measure_group_amax, merge_group_amax
from .layout import staged_path
from .sources.checkpoint import SourceCheckpoint
from .storage.manifest import Manifest, file_sha256, run_fingerprint
from .runtime.monitor import start_monitor
from .storage.outdir import check_output_dir, prepare_output_dir, remove_temporaries
from .ownership import measured_summary
from .plan import build_plan, rank_loads
from .recipe import Recipe, load_recipe
from .sources.synthetic import ensure_synthetic
from .output_formats import get_output_format

log = logging.getLogger(__name__)
DEFAULT_MODEL = "synthetic:llama-tiny"


def parse_size(text) -> int:
    if isinstance(text, int):
        return text
    units = {"KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}
    t = str(text).strip().upper()
    for u in sorted(units, key=len, reverse=True):
        if t.endswith(u):
            return int(float(t[: -len(u)]) * units[u])
    if t.endswith("B"):
        t = t[:-1]
    try:
        return int(t)
    except ValueError:
        raise ValueError(f"cannot parse size {text!r}; use e.g. 500MB, 2GB or a byte count") from None


def resolve_model(model: str | None, revision: str | None = None) -> str:
    """The local folder of `model`: a folder, a Hub id (HF cache first, `revision`, offline mode respected),
    `synthetic:<arch>-<preset>`, or, for None, the demo model announced with a warning (sources/hub.py)."""
    from .sources.hub import resolve_model as resolve

    return resolve(model, revision).path


def export(model=None, out_dir: str = "out", recipe: str | Recipe = "fp8-block", format: str = "vllm-fq",
           calib: str | None = None, overwrite: bool = False, resume: bool = False, device: str | None = None,
           max_shard_size="1GB", ctx: DistContext | None = None, fault=None, hang_timeout: float = 45.0,
           dead_timeout: float = 20.0, verify: bool = True) -> dict:
    """Export `model` (a folder, `synthetic:<arch>-<preset>`, or an in-memory transformers model) to `out_dir`.

    Returns a summary dict (on every rank; rank 0's includes every rank's numbers).
    """
    if model is not None and not isinstance(model, str):
        from .sources.memory import in_memory_source

        with in_memory_source(model, recipe, calib) as (source, side, calib):
            return run_export(source, side, out_dir, recipe=recipe, format=format, calib=calib, overwrite=overwrite,
                              device=device, max_shard_size=max_shard_size, ctx=ctx, verify=verify, fault=fault)

    def open_source():
        src_dir = resolve_model(model)
        return src_dir, SourceCheckpoint(src_dir)

    open_source.display_name = model or DEFAULT_MODEL
    return run_export(open_source, None, out_dir, recipe, format, calib, overwrite, resume, device, max_shard_size,
                      ctx, fault, hang_timeout, dead_timeout, verify)


def run_export(source, side_dir, out_dir, recipe="fp8-block", format="vllm-fq", calib=None, overwrite=False,
               resume=False, device=None, max_shard_size="1GB", ctx=None, fault=None, hang_timeout=45.0,
               dead_timeout=20.0, verify=True) -> dict:
    """Run the stages for `source`: a callable returning (side-file folder, source), or an object with
    `.tensors`, `.read(meta)` and `.load_config()` whose side files (generation config, tokenizer) are in
    `side_dir`."""
    model = source if callable(source) else (lambda: (side_dir, source))
    own_ctx = ctx is None
    ctx = ctx or init_distributed(device)
    if fault is None:
        from .runtime.faults import fault_from_env

        fault = fault_from_env()
    try:
        monitor = start_monitor(ctx, hang_after=hang_timeout, dead_after=dead_timeout,
                                on_fail=lambda: remove_temporaries(out_dir))
        try:
            summary = _export(ctx, model, out_dir, recipe, format, calib, overwrite, resume, max_shard_size, fault,
                              verify)
            monitor.finish()
            return summary
        finally:
            monitor.stop()
            ctx.monitor = None
    finally:
        if own_ctx:
            ctx.close()


def _export(ctx, model, out_dir, recipe, format, calib_path, overwrite, resume, max_shard_size, fault, verify):
    t0 = time.monotonic()
    # 1. Validate inputs and plan, on every rank, before any write.
    def plan_step():
        src_dir, source = model()
        rec = recipe if isinstance(recipe, Recipe) else load_recipe(recipe)
        fmt = get_output_format(format)
        check_output_dir(out_dir, overwrite, resume)
        plan = build_plan(source.tensors, rec, fmt, ctx.world_size, parse_size(max_shard_size))
        required = required_input_quantizers(plan)
        if required and calib_path is None:
            raise ValueError(f"recipe {rec.name!r} has static activation quantizers: calibrate first with "
                             f"`dist-export calibrate --model {getattr(model, 'display_name', '<model>')} "
                             f"--recipe {rec.name} "
                             f"--out calib.safetensors`, then pass --calib calib.safetensors")
        calib = load_calibration(calib_path, rec, model_signature(source.tensors), required) if calib_path else {}
        local.update(src_dir=src_dir, rec=rec, fmt=fmt, source=source, plan=plan, calib=calib)
        return plan.digest()

    local: dict = {}
    digests = ctx.step("plan", plan_step)
    if len(set(digests)) != 1:
        raise ExportError(f"ranks computed different plans (digests {sorted(set(digests))}); check that every "
                          f"rank sees the same source, recipe and dist_export version")
    src_dir, rec, fmt, source, plan, calib = (local[k] for k in ("src_dir", "rec", "fmt", "source", "plan", "calib"))
    if ctx.monitor:
        ctx.monitor.set_totals(len(plan.items), plan.total_size)
    if ctx.is_rank0:
        loads = rank_loads(plan)
        log.info("plan: %d items, %d shards, %.2f GB out, %d groups; per-rank GB out: %s", len(plan.items),
                 len(plan.shards), plan.total_size / 1e9, len(plan.groups),
                 [round(d["bytes_out"] / 1e9, 3) for d in loads])
    calib_sha = file_sha256(calib_path) if calib_path else None
    manifest = Manifest(out_dir, run_fingerprint(source, rec, calib_sha, fmt.name, plan.layout_digest()), resume)

    # 2. Rank 0 prepares the folder (lock, stale index, manifest check); the others wait for it.
    lock = None

    def prepare():
        nonlocal lock
        if ctx.is_rank0:
            lock = prepare_output_dir(out_dir, overwrite, resume)
            manifest.check_and_write()

    try:
        ctx.step("prepare output folder", prepare)
        # 3. Shared amax of the groups split over ranks (or partly finished), then every rank executes its
        # shards; the pipeline measures every other group as its members pass through.
        def measure_first():
            local["reused"] = reusable_shards(ctx, plan, out_dir, manifest)
            local["first"] = groups_to_measure_first(plan, ctx.rank, local["reused"]) if plan.groups else set()
            return measure_group_amax(ctx, plan, source, local["first"])

        parts = ctx.step("resume check and shared amax", measure_first)
        group_amax = merge_group_amax(plan, parts, required=local["first"])
        reused = local["reused"]
        results = ctx.step("export", execute_rank, ctx, plan, source, fmt, out_dir, calib, group_amax, manifest,
                           fault, reused=reused)
        # 4. Rank 0 checks and publishes; the index comes last.
        # The record lets `verify --source` recompute everything; it names no path, so the same inputs give
        # the same bytes wherever (and from whatever source object) they come.
        record = {"dist_export": __version__, "recipe": rec.to_dict(), "format": fmt.name,
                  "calibration": {k: float(v) for k, v in sorted(calib.items())},
                  "source_signature": model_signature(source.tensors),
                  "shards": {f: {"sha256": i["sha256"], "size": i["size"]} for r in results for f, i in r.shards.items()}}
        ctx.step("commit", lambda: commit_export(plan, out_dir, src_dir, source.load_config(), rec, fmt, calib,
                                                record, staged_path) if ctx.is_rank0 else None)
    except BaseException:
        if ctx.is_rank0 and lock is not None:
            remove_temporaries(out_dir)
        raise
    finally:
        if lock is not None:
            lock.release()
    summary = _summary(results, time.monotonic() - t0, out_dir)
    summary["stage_seconds"] = dict(ctx.stage_seconds)  # start-up = interpreter and imports, then each stage
    if ctx.is_rank0:
        _log_summary(summary)
        if verify:
            from .verify import verify_export

            report = verify_export(out_dir, quick=True)  # structure, scales, checksums; --source recomputes
            if not report["ok"]:
                raise RuntimeError(f"verify found defects in {out_dir}: {report['defects'][:3]}")
            log.info("verify: %d tensors checked, no defects", report["tensors"])
    return summary


def _summary(results, wall: float, out_dir: str) -> dict:
    ranks = [asdict(r) for r in results]
    slowest = max(ranks, key=lambda r: r["seconds"])
    written = sum(r["bytes_written"] for r in ranks)
    return {"out_dir": out_dir, "wall_seconds": wall, "bytes_read": sum(r["bytes_read"] for r in ranks),
            "bytes_written": written, "gb_per_s": written / wall / 1e9 if wall > 0 else 0.0,
            "slowest_rank": slowest["rank"], "ranks": ranks,
            "seconds_balance": measured_summary([r["seconds"] for r in ranks])}  # max/mean of measured seconds


def _log_summary(s: dict) -> None:
    log.info("done in %.2f s: wrote %.3f GB (%.2f GB/s), read %.3f GB; slowest rank %d", s["wall_seconds"],
             s["bytes_written"] / 1e9, s["gb_per_s"], s["bytes_read"] / 1e9, s["slowest_rank"])
    log.info("  rank seconds max/mean %.3f", s["seconds_balance"]["imbalance"])
    log.info("  seconds: %s", ", ".join(f"{k} {v:.2f}" for k, v in s["stage_seconds"].items() if v is not None))
    for r in s["ranks"]:
        log.info("  rank %d: %d items, read %.3f GB, wrote %.3f GB in %.2f s, peak RSS %.2f GB, peak GPU %.2f GB",
                 r["rank"], r["items"], r["bytes_read"] / 1e9, r["bytes_written"] / 1e9, r["seconds"],
                 r["peak_rss"] / 1e9, r["peak_gpu"] / 1e9)

"""Python API and the one orchestrator: `export(...)` runs plan -> prepare -> execute -> commit -> verify on every
rank of the current launch.

    import dist_export
    dist_export.export("synthetic:llama-tiny", "out/", recipe="fp8-block", format="vllm-fq")

Under torchrun, Slurm or `--nproc-per-node` each process calls the same function; the ranks find each other from
the environment. Every cross-rank step goes through `DistContext` (`agree`, `local_step`, `on_rank0`), so a failure
on one rank is the same one-line error on all of them.
"""
from __future__ import annotations

import logging
import os
import socket
import time
from dataclasses import asdict, dataclass, replace

from .version import __version__
from .calibration.file import (calibration_data_record, load_calibration, required_input_quantizers,
                               save_calibration)
from .commit import publish_export, shard_records, stage_export
from .execute import RankResult, execute_rank, merge_prepared, prepare_shards, reused_shards
from .groups import groups_to_measure_first, measure_group_amax, merge_group_amax
from .layout import CONFIG_NAME, staged_path
from .options import DEFAULT_MODEL, DEFAULT_RECIPE, ExportOptions, parse_size
from .output_formats import format_file_names, get_output_format
from .plan import ExportPlan, build_plan, rank_loads
from .recipe import Recipe, load_recipe, recipe_args, with_kv_cache
from .runtime.dist import DistContext, init_distributed
from .runtime.faults import fire_point_fault
from .runtime.monitor import start_monitor
from .runtime.progress import Progress
from .sources.checkpoint import SourceCheckpoint
from .storage.header import model_signature
from .storage.manifest import Manifest, run_fingerprint
from .tensor_checksums import file_sha256
from .storage.atomic import remove_own_temporaries
from .storage.outdir import check_output_dir, prepare_output_dir
from .ownership import measured_summary
from .report import format_report, quantization_summary

__all__ = ["export", "ExportOptions", "OpenedSource", "plan_inputs", "resolve_model", "parse_size"]
log = logging.getLogger(__name__)


def resolve_model(model: str | None, revision: str | None = None) -> str:
    """The local folder of `model`: a folder, a Hub id (HF cache first, `revision`, offline mode respected),
    `synthetic:<arch>-<preset>`, or, for None, the demo model announced with a warning (sources/hub.py)."""
    from .sources.hub import resolve_model as resolve

    return resolve(model, revision).path


def export(model=None, out_dir: str = "out", *, revision: str | None = None, ctx: DistContext | None = None,
           **options) -> dict:
    """Export `model` to `out_dir` with the given options, on every rank of the launch.

    Args:
        model: a Hugging Face checkpoint folder, a Hub id `org/name` (HF cache first, offline mode respected),
            `synthetic:<arch>-<preset>`, or an in-memory transformers model (on CPU, GPUs or dispatched with
            offload; never changed). None exports the built-in synthetic model, with a warning.
        revision: branch, tag or commit of a Hub id (default: main).
        out_dir: the output folder (new, empty, or an earlier export with `overwrite`/`resume`).
        ctx: an existing `DistContext` (tests, embedding); by default one is made from the launcher's environment.
        **options: the fields of `ExportOptions` (recipe, format, calib or calibration, overwrite, resume,
            device, max_shard_size, hang_timeout, dead_timeout, verify, fault, quantizer_state, nproc_per_node,
            allow_nonfinite),
            keyword only. A ModelOpt-quantized model with recipe=None is exported with its own quantizers.

    Returns:
        The run summary (every rank; rank 0's includes every rank's numbers).
    """
    opts = ExportOptions.from_kwargs(options)
    live = model is not None and not isinstance(model, str)
    if live and revision is not None:
        raise ValueError("revision applies to a Hub id, not to an in-memory model")
    if opts.nproc_per_node is not None:
        if not live:
            raise ValueError("nproc_per_node is for in-memory ModelOpt-quantized models; for a folder run "
                             "`dist-export export --nproc-per-node N` (or torchrun) instead")
        from .sources.workers import export_in_workers

        return export_in_workers(model, out_dir, opts)
    if opts.calibration is not None:
        return _export_calibrated(model, out_dir, opts, ctx, options, revision)
    if live:
        from .sources.memory import in_memory_source

        with in_memory_source(model) as (source, side, state):
            opened = OpenedSource(side, source, "<in-memory model>")
            if state is not None:  # a ModelOpt-quantized model: its own quantizers are the recipe
                if opts.quantizer_state is not None:
                    raise ValueError("the in-memory model carries its own quantizers: do not pass quantizer_state")
                return run_export(lambda: opened, out_dir, replace(opts, quantizer_state=state), ctx)
            if opts.calib is None and source.calibration:  # calibrated in memory: use the model's input amax
                opts = replace(opts, calib=_save_model_calibration(source, side, opts.recipe, opts.kv_cache))
            return run_export(lambda: opened, out_dir, opts, ctx)

    def open_folder():
        src_dir = resolve_model(model, revision)
        return OpenedSource(src_dir, SourceCheckpoint(src_dir), model or DEFAULT_MODEL)

    return run_export(open_folder, out_dir, opts, ctx)


def export_recipe(recipe, kv_cache: str | None) -> Recipe:
    """The recipe an export without quantizer state uses: `recipe` (a name, path or Recipe; None: the default)
    with `kv_cache` (--kv-cache) applied."""
    rec = recipe if isinstance(recipe, Recipe) else load_recipe(recipe or DEFAULT_RECIPE)
    return with_kv_cache(rec, kv_cache)


def _save_model_calibration(source, folder: str, recipe, kv_cache: str | None) -> str:
    """Every rank: the input amax an in-memory model was calibrated with, as a calibration file in `folder`."""
    rec = export_recipe(recipe, kv_cache)
    path = os.path.join(folder, "calibration.safetensors")
    save_calibration(path, source.calibration, rec, model_signature(source.tensors))
    log.info("using %d input amax values calibrated in the model", len(source.calibration))
    return path


def _export_calibrated(model, out_dir: str, opts: ExportOptions, ctx: DistContext | None, options: dict,
                       revision: str | None) -> dict:
    """`calibration={...}`: calibrate `model` (a folder or a live model) on every rank, data-parallel, into a
    private file per rank, then export with it as `calib`; the file is removed afterwards."""
    import shutil
    import tempfile

    from .calibration.run import calibrate_for_export, calibration_options

    calibration_options(opts.calibration)  # a missing data choice or an unknown key: one line, before anything
    own = ctx is None
    ctx = ctx or init_distributed(opts.device, startup_timeout_s=opts.dead_timeout)
    tmp = tempfile.mkdtemp(prefix="dist_export_calib_")
    try:
        path = os.path.join(tmp, "calibration.safetensors")
        target = resolve_model(model, revision) if model is None or isinstance(model, str) else model
        calibrate_for_export(ctx, target, export_recipe(opts.recipe, opts.kv_cache), path, opts.calibration,
                             opts.hang_timeout, opts.dead_timeout)
        return export(model, out_dir, revision=revision, ctx=ctx, **{**options, "calibration": None, "calib": path})
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        if own:
            ctx.close()


@dataclass
class OpenedSource:
    side_dir: str | None  # where side files (config, tokenizer, generation config) come from
    source: object        # `.tensors`, `.read(meta)`, `.load_config()`
    display_name: str


@dataclass
class _Inputs:
    """What every rank agreed on in the plan step."""
    opened: OpenedSource
    recipe: Recipe
    output_format: object
    plan: ExportPlan
    calib: dict
    calib_data: dict | None = None  # how the calibration samples were chosen (the calibration file's record)


def run_export(open_source, out_dir: str, opts: ExportOptions, ctx: DistContext | None = None) -> dict:
    """Run the stages for the source that `open_source()` returns (called inside the plan step on every rank)."""
    own_ctx = ctx is None
    ctx = ctx or init_distributed(opts.device, startup_timeout_s=opts.dead_timeout)
    fault = opts.fault
    if fault is None:
        from .runtime.faults import fault_from_env

        fault = fault_from_env()
    try:
        progress = Progress()
        monitor = start_monitor(ctx, hang_after=opts.hang_timeout, dead_after=opts.dead_timeout,
                                on_fail=remove_own_temporaries, progress=progress)
        try:
            summary = _export(ctx, open_source, out_dir, opts, fault, progress)
            monitor.finish()
            return summary
        finally:
            monitor.stop()
            ctx.monitor = None
    finally:
        if own_ctx:
            ctx.close()


def plan_inputs(open_source, out_dir: str | None, opts: ExportOptions, world_size: int, nnodes: int = 1) -> _Inputs:
    """Validate every input and plan, before any write (every rank; `cli plan` runs it too, without a folder)."""
    opened = open_source()
    output_format = get_output_format(opts.format)
    values = None
    if opts.quantizer_state is not None:  # the model's own ModelOpt quantizers (sources/quantizer_state.py)
        from .sources.quantizer_state import recipe_from_quantizers

        rec, values, checked = recipe_from_quantizers(opts.quantizer_state, opts.recipe, opened.source, output_format,
                                                      opts.modelopt_kernels)
        opened = replace(opened, source=checked)
    else:
        if opts.modelopt_kernels:
            raise ValueError("modelopt_kernels runs a ModelOpt-quantized model's own quantizers; this export has "
                             "none (pass a ModelOpt-quantized model or --quantizer-state)")
        rec = export_recipe(opts.recipe, opts.kv_cache)
    if out_dir is not None:
        check_output_dir(out_dir, opts.overwrite, opts.resume, opts.allow_foreign_files, source_dirs(opened))
    plan = build_plan(opened.source.tensors, rec, output_format, world_size, opts.shard_bytes, nnodes)
    required = required_input_quantizers(plan)
    if out_dir is None:
        return _Inputs(opened, rec, output_format, plan, {})
    if values is not None:
        missing = [k for k in required if k not in values]
        if missing:
            raise ValueError(f"the model's input quantizer {missing[0]!r} is enabled and static but holds no amax; "
                             f"calibrate the model (mtq.quantize with a forward loop) first")
        return _Inputs(opened, rec, output_format, plan, values)
    if required and opts.calib is None:
        what = "has static activation quantizers" if rec.kv_cache is None else "quantizes the KV cache"
        raise ValueError(f"recipe {rec.name!r} {what}: calibrate first with "
                         f"`dist-export calibrate --model {opened.display_name} {recipe_args(rec)} "
                         f"--out calib.safetensors`, then pass --calib calib.safetensors")
    calib = (load_calibration(opts.calib, rec, model_signature(opened.source.tensors), required)
             if opts.calib else {})
    return _Inputs(opened, rec, output_format, plan, calib, calibration_data_record(opts.calib) if opts.calib else None)


def _export(ctx: DistContext, open_source, out_dir: str, opts: ExportOptions, fault, progress: Progress) -> dict:
    t0 = time.monotonic()
    # 1. Validate inputs and plan, on every rank, before any write; every rank must plan the same.
    inputs = ctx.agree("plan", lambda: plan_inputs(open_source, out_dir, opts, ctx.world_size, ctx.nnodes),
                       lambda i: i.plan.digest())
    plan, source, rec, output_format = inputs.plan, inputs.opened.source, inputs.recipe, inputs.output_format
    progress.set_totals(len(plan.items), plan.total_size)
    if plan.nnodes > 1:
        check_nodes(plan, ctx.step("node check", socket.gethostname))
    if ctx.is_rank0:
        _log_plan(plan, output_format)
    calib_sha = file_sha256(opts.calib) if opts.calib else None
    manifest = Manifest(out_dir, run_fingerprint(source, rec, calib_sha, output_format.name, plan.layout_digest(),
                                                 opts.allow_nonfinite), opts.resume)

    # 2. Rank 0 takes the folder over (lock, ownership, manifest check); the others wait for it.
    lock = None

    def prepare():
        nonlocal lock
        lock = prepare_output_dir(out_dir, opts.overwrite, opts.resume, opts.allow_foreign_files,
                                  will_write(inputs), source_dirs(inputs.opened), manifest.fingerprint)
        if not lock.published:
            manifest.check_and_write()
        return lock.published

    try:
        if ctx.step("prepare output folder", lambda: prepare() if ctx.is_rank0 else None)[0]:
            if ctx.is_rank0:
                progress.close(complete=True)
            log.info("--resume: %s already holds this export, finished (same inputs); nothing to do", out_dir)
            return _summary([RankResult(r) for r in range(ctx.world_size)], time.monotonic() - t0, out_dir, plan)
        # 3. Each shard's creator keeps the shard an earlier run finished or creates its shared temporary; then
        # the shared amax of groups split over ranks (or partly finished), then every rank writes its items into
        # its node's shards; the pipeline measures every other group as its members pass.
        prepared = merge_prepared(plan, ctx.step("create shards", prepare_shards, ctx, plan, out_dir, manifest,
                                                 source, progress))
        reused = reused_shards(prepared)
        first = groups_to_measure_first(plan, ctx.rank, reused) if plan.groups else set()
        parts = ctx.step("shared amax", measure_group_amax, ctx, plan, source, first, progress)
        group_amax = merge_group_amax(plan, parts, required=first)
        results = ctx.step("export", execute_rank, ctx, plan, source, output_format, out_dir, inputs.calib, group_amax,
                           manifest, fault, prepared=prepared, progress=progress,
                           allow_nonfinite=opts.allow_nonfinite)
        # 4. Rank 0 writes and checks everything but the index (inside the last step: a defect fails every
        # rank and publishes nothing); once every rank knows that outcome, no peer is watched any more and
        # rank 0 publishes: the index comes last.
        record = _record(inputs, results, manifest.fingerprint)
        fire_point_fault("commit", ctx.rank)  # drills: a rank killed while rank 0 stages and verifies
        staged = ctx.on_rank0("commit", stage_export, plan, out_dir, inputs.opened.side_dir, source.load_config(),
                              rec, output_format, inputs.calib, record, staged_path,
                              lock.foreign if lock else frozenset(), opts.verify, progress.tick)
        if ctx.is_rank0:
            progress.close(complete=True)  # every rank's items are on disk; nothing is drawn after this
        if ctx.monitor:
            ctx.monitor.finish()
        if ctx.is_rank0:
            publish_export(staged)
    except BaseException:
        remove_own_temporaries()  # this process's own unfinished files, nothing else
        raise
    finally:
        if lock is not None:
            lock.release()
    summary = _summary(results, time.monotonic() - t0, out_dir, plan)
    summary["stage_seconds"] = dict(ctx.stage_seconds)  # start-up = interpreter and imports, then each stage
    summary["quantization"] = quantization_summary(plan, rec)
    if ctx.is_rank0:
        _log_summary(summary)
        verified = staged.verify_line
        log.info("%s", format_report(summary, summary["quantization"], model=inputs.opened.display_name,
                                     recipe=rec.name, format_name=output_format.name,
                                     load_hint=output_format.load_hint(out_dir),
                                     world_size=ctx.world_size, verify_line=verified))
    return summary


def _record(inputs: _Inputs, results, fingerprint: dict) -> dict:
    """The record lets `verify --source` recompute everything; it names no path, so the same inputs give the same
    bytes wherever (and from whatever source object) they come."""
    record = {"dist_export": __version__, "recipe": inputs.recipe.to_dict(), "format": inputs.output_format.name,
              "calibration": {k: float(v) for k, v in sorted(inputs.calib.items())},
              "source_signature": model_signature(inputs.opened.source.tensors), "fingerprint": fingerprint,
              "shards": shard_records(inputs.plan, results)}
    if inputs.calib_data is not None:
        record["calibration_data"] = inputs.calib_data
    return record


def source_dirs(opened: OpenedSource) -> list[str]:
    """The folders the source is read from (side files, weights): --out may not be, lie in or contain one."""
    return [d for d in (opened.side_dir, getattr(opened.source, "folder", None)) if isinstance(d, str)]


def will_write(inputs: _Inputs) -> set[str]:
    """Every name the export may write into --out (relative paths), known before any write: a foreign file at one
    of them is refused even with --allow-foreign-files."""
    plan, output_format = inputs.plan, inputs.output_format
    names = {CONFIG_NAME, *output_format.file_names}
    names |= {s.filename for s in plan.shards}
    names |= {os.path.basename(staged_path("", plan, s.filename)) for s in plan.shards}
    if inputs.opened.side_dir is not None:
        from .sources.hub import source_root
        from .sources.side_files import list_side_files

        side = inputs.opened.side_dir
        names |= set(list_side_files(side, source_root(side), format_file_names()))
    return names


def check_nodes(plan: ExportPlan, hosts: list[str]) -> None:
    """The ranks the plan puts on one node must run on one host: a shard's writers share one file system client."""
    per_node = plan.world_size // plan.nnodes
    for node in range(plan.nnodes):
        names = sorted(set(hosts[node * per_node:(node + 1) * per_node]))
        if len(names) > 1:
            raise ValueError(f"ranks {node * per_node}-{(node + 1) * per_node - 1} form node {node} by their numbering "
                             f"but run on hosts {names[:3]}; launch ranks node by node (torchrun's numbering)")


def _log_plan(plan: ExportPlan, output_format) -> None:
    for warning in plan.warnings:  # rank 0, at plan time: before anything is written
        log.warning("%s", warning)
    loads = rank_loads(plan, output_format)
    mean = sum(d["cost"] for d in loads) / len(loads)
    log.info("plan: %d items, %d shards, %.2f GB out, %d groups, %d node(s); per-rank items %s, GB out %s, cost "
             "max/mean %.3f", len(plan.items), len(plan.shards), plan.total_size / 1e9, len(plan.groups), plan.nnodes,
             [d["items"] for d in loads], [round(d["bytes_out"] / 1e9, 3) for d in loads],
             max(d["cost"] for d in loads) / mean if mean > 0 else 1.0)


def _summary(results, wall: float, out_dir: str, plan: ExportPlan) -> dict:
    ranks = [asdict(r) for r in results]
    slowest = max(ranks, key=lambda r: r["seconds"])
    written = sum(r["bytes_written"] for r in ranks)
    shards = [info for r in ranks for info in r["completed"].values()]  # each shard once: its completer/creator
    reused = sum(1 for r in ranks for part in r["shards"].values() if part["reused"])  # reported by the creator
    return {"out_dir": out_dir, "wall_seconds": wall, "bytes_read": sum(r["bytes_read"] for r in ranks),
            "bytes_written": written, "gb_per_s": written / wall / 1e9 if wall > 0 else 0.0,
            "source_bytes": sum(i.meta.nbytes for i in plan.items.values()),
            "output_bytes": sum(i["size"] for i in shards), "reused_shards": reused,
            "slowest_rank": slowest["rank"], "ranks": ranks,
            "seconds_balance": measured_summary([r["seconds"] for r in ranks])}  # max/mean of measured seconds


def _log_summary(s: dict) -> None:
    """The measurements (benchmarks read them); the closing report follows."""
    log.info("done in %.2f s: wrote %.3f GB (%.2f GB/s), read %.3f GB; slowest rank %d", s["wall_seconds"],
             s["bytes_written"] / 1e9, s["gb_per_s"], s["bytes_read"] / 1e9, s["slowest_rank"])
    log.info("  rank seconds max/mean %.3f", s["seconds_balance"]["imbalance"])
    log.info("  seconds: %s", ", ".join(f"{k} {v:.2f}" for k, v in s["stage_seconds"].items() if v is not None))
    for r in s["ranks"]:
        log.info("  rank %d: %d items, read %.3f GB, wrote %.3f GB in %.2f s, peak RSS %.2f GB, peak GPU %.2f GB",
                 r["rank"], r["items"], r["bytes_read"] / 1e9, r["bytes_written"] / 1e9, r["seconds"],
                 r["peak_rss"] / 1e9, r["peak_gpu"] / 1e9)

"""`dist-export verify DIR [--source SRC]`: check an exported folder; never trusts what loaders would accept.

Structural checks (always): index <-> shard headers both ways, every header's byte layout, no duplicate keys,
no quantizer-state keys, index total_size, safetensors metadata, each output format's own checks
(`OutputFormat.check_folder`: the vllm-fq state file loadable with weights_only=True, real-quant scales with the
right dtypes and shapes, finite and positive); shard checksums against the export record. With `source_dir` and full=True: the plan is rebuilt from the recorded recipe, format and calibration and
every expected tensor is recomputed and compared bit for bit. For fp8-block, the report lists the
tensor-parallel sizes at which vLLM can serve the checkpoint (block divisibility of every partition).

One process, after rank 0's commit (`dist-export verify`) or inside the commit (the quick verify on staged files).
"""
from __future__ import annotations

import json
import logging
import os

import torch

from .layout import CONFIG_NAME, INDEX_NAME, MANIFEST_DIR, QUANTIZER_KEY, RECORD_NAME, SINGLE_NAME, STAGED_SUFFIX
from .output_formats import get_output_format, output_formats
from .sources.checkpoint import SourceCheckpoint
from .storage.reader import read_tensor
from .storage.header import CorruptFileError, file_tensor_metas, read_header

log = logging.getLogger(__name__)


class Report:
    def __init__(self):
        self.defects: list[str] = []
        self.warnings: list[str] = []
        self.tensors = 0
        self.extra: dict = {}

    def defect(self, msg: str) -> None:
        self.defects.append(msg)

    def as_dict(self) -> dict:
        return {"ok": not self.defects, "defects": self.defects, "warnings": self.warnings,
                "tensors": self.tensors, **self.extra}


def _shard_files(out_dir: str, rep: Report, pending: dict) -> dict[str, str] | None:
    """{tensor name: file} from the index, or from the single file's header."""
    index_path = os.path.join(out_dir, INDEX_NAME)
    if "index" in pending or os.path.isfile(index_path):
        if "index" in pending:
            index = pending["index"]
        else:
            with open(index_path) as f:
                index = json.load(f)
        rep.extra["index_total_size"] = index.get("metadata", {}).get("total_size")
        return index.get("weight_map", {})
    if "single" in pending or os.path.isfile(os.path.join(out_dir, SINGLE_NAME)):
        return None
    rep.defect(f"no {INDEX_NAME} and no {SINGLE_NAME}: the export is incomplete")
    return {}


def _check_structure(out_dir: str, rep: Report, pending: dict, tick) -> dict:
    weight_map = _shard_files(out_dir, rep, pending)
    files = sorted(set(weight_map.values())) if weight_map is not None else [SINGLE_NAME]
    metas = {}
    total = 0
    for file in files:
        tick()
        disk = pending.get("single", file) if file == SINGLE_NAME else file  # not yet under its final name
        path = os.path.join(out_dir, disk)
        if not os.path.isfile(path):
            rep.defect(f"{file}: named by the index but missing")
            continue
        try:
            file_meta, _ = read_header(path)
            entries = file_tensor_metas(out_dir, disk)
        except CorruptFileError as e:
            rep.defect(str(e))
            continue
        if file_meta.get("format") != "pt":
            rep.defect(f"{file}: safetensors metadata format is {file_meta.get('format')!r}, expected 'pt'")
        for m in entries:
            if m.name in metas:
                rep.defect(f"{m.name}: duplicated in {metas[m.name].file} and {file}")
            metas[m.name] = m
            total += m.nbytes
            if QUANTIZER_KEY.search(m.name):
                rep.defect(f"{m.name}: quantizer state must never be stored in safetensors")
            if weight_map is not None and weight_map.get(m.name) != file:
                rep.defect(f"{m.name}: in {file} but the index says {weight_map.get(m.name)!r}")
    if weight_map is not None:
        for name, file in weight_map.items():
            if name not in metas and os.path.isfile(os.path.join(out_dir, file)):
                rep.defect(f"{name}: listed in the index under {file} but absent from its header")
        if rep.extra.get("index_total_size") not in (None, total):
            rep.defect(f"index total_size {rep.extra['index_total_size']} != sum of tensor bytes {total}")
    rep.tensors = len(metas)
    return metas


def _check_formats(out_dir: str, metas: dict, config: dict, rep: Report) -> None:
    """Each output format checks its own part of the folder (its scales, its extra files)."""
    for output_format in output_formats():
        output_format.check_folder(out_dir, metas, config, rep)


def _check_checksums(out_dir: str, record: dict, rep: Report, pending: dict, tick) -> None:
    """Re-read every shard and compare the sha256 of its header and of every tensor with the record (they tile the
    file, so every byte is checked; records of earlier exports hold one whole-file sha256). Files are hashed in
    parallel threads: hashlib and file reads release the GIL, so this runs at disk or page-cache speed."""
    from concurrent.futures import ThreadPoolExecutor

    from .storage.shared_shard import check_shard

    def disk(f):
        return os.path.join(out_dir, pending.get("single", f) if f == SINGLE_NAME else f)

    def check(f, info):
        problem = check_shard(disk(f), info, f, tick=tick)
        tick()
        return problem

    files = [(f, i) for f, i in sorted(record.get("shards", {}).items()) if os.path.isfile(disk(f))]
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        problems = list(pool.map(lambda fi: check(*fi), files))
    for problem in problems:
        if problem is not None:
            rep.defect(problem)


def recompute_and_compare(out_dir: str, source_dir: str, record: dict, metas: dict, rep: Report) -> None:
    """Rebuild the plan from the record and compare every expected tensor with what is on disk, bit for bit."""
    from .groups import measure_group_amax, merge_group_amax
    from .quantize import quantize_item
    from .runtime.dist import DistContext
    from .plan import build_plan, item_outputs
    from .recipe import recipe_from_dict

    source = SourceCheckpoint(source_dir)
    if "quantizer_state" in record["recipe"]:
        raise ValueError(f"{out_dir} was exported with a model's own ModelOpt quantizers (quantizer state "
                         f"{record['recipe']['quantizer_state']}); --source cannot rebuild it without that state: "
                         f"run verify without --source (structure, scales and checksums)")
    recipe = recipe_from_dict(record["recipe"], source="export record")
    output_format = get_output_format(record["format"])
    calib = {k: torch.tensor(v, dtype=torch.float32) for k, v in record.get("calibration", {}).items()}
    plan = build_plan(source.tensors, recipe, output_format, 1, 1 << 62)
    expected = {o.name for item in plan.items.values() for o in item_outputs(output_format, item)}
    for name in sorted(set(metas) - expected):
        rep.defect(f"{name}: not expected from the source (extra tensor)")
    for name in sorted(expected - set(metas)):
        rep.defect(f"{name}: expected from the source but missing")
    if rep.defects:
        return  # values are compared only on a structurally sound export
    ctx = DistContext()
    group_amax = merge_group_amax(plan, [measure_group_amax(ctx, plan, source)]) if plan.groups else {}
    expected_names = set()
    for item in plan.items.values():
        for name, tensor in quantize_item(ctx, item, source.read(item.meta), output_format, calib, group_amax):
            expected_names.add(name)
            got = read_tensor(out_dir, metas[name])
            if got.dtype != tensor.dtype or tuple(got.shape) != tuple(tensor.shape):
                rep.defect(f"{name}: {got.dtype}{list(got.shape)}, expected {tensor.dtype}{list(tensor.shape)}")
            elif not torch.equal(got.reshape(-1).view(torch.uint8), tensor.contiguous().reshape(-1).view(torch.uint8)):
                rep.defect(f"{name}: values differ from the recomputed export")
    rep.extra["recomputed"] = len(expected_names)


def verify_export(out_dir: str, source_dir: str | None = None, pending: dict | None = None, tick=None) -> dict:
    """`pending`: what the commit has not published yet, checked as if it were (`{"index": the index}` or
    `{"single": the staged single file's name}`); `tick()` is called as files are read (the monitor's progress,
    so peers waiting on the commit never call this rank hung)."""
    rep = Report()
    pending = pending or {}
    tick = tick or (lambda: None)
    if not os.path.isdir(out_dir):
        rep.defect(f"{out_dir} does not exist")
        return rep.as_dict()
    metas = _check_structure(out_dir, rep, pending, tick)
    config = {}
    if os.path.isfile(os.path.join(out_dir, CONFIG_NAME)):
        with open(os.path.join(out_dir, CONFIG_NAME)) as f:
            config = json.load(f)
    else:
        rep.defect(f"{CONFIG_NAME} is missing")
    _check_formats(out_dir, metas, config, rep)
    record_path = os.path.join(out_dir, RECORD_NAME)
    record = {}
    if os.path.isfile(record_path):
        with open(record_path) as f:
            record = json.load(f)
        _check_checksums(out_dir, record, rep, pending, tick)
    # ours only: a foreign `notes.tmp` kept with --allow-foreign-files is no defect; temporaries live in MANIFEST_DIR
    leftovers = [f for f in os.listdir(out_dir) if (f.endswith(STAGED_SUFFIX) or f == MANIFEST_DIR)
                 and not pending]  # while the commit stages, both are where they belong
    if leftovers:
        rep.defect(f"temporary files left behind: {leftovers[:3]}")
    if source_dir is not None:
        if not record:
            rep.defect(f"--source needs {RECORD_NAME} (the recipe and calibration of the export)")
        else:
            recompute_and_compare(out_dir, source_dir, record, metas, rep)
    return rep.as_dict()


def format_report(report: dict) -> str:
    lines = [f"verify: {'OK' if report['ok'] else 'FAILED'}: {report['tensors']} tensors"]
    if "recomputed" in report:
        lines.append(f"  recomputed and compared {report['recomputed']} tensors bit for bit")
    if "vllm_tp_sizes" in report:
        lines.append(f"  vLLM tensor-parallel sizes servable: {report['vllm_tp_sizes']}")
    lines += [f"  DEFECT: {d}" for d in report["defects"]]
    lines += [f"  warning: {w}" for w in report["warnings"][:20]]
    return "\n".join(lines)

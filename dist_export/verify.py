"""`dist-export verify DIR [--source SRC]`: check an exported folder; never trusts what loaders would accept.

Structural checks (always): index <-> shard headers both ways, every header's byte layout, no duplicate keys,
no quantizer-state keys, index total_size, safetensors metadata, state file loadable with weights_only=True,
real-quant scales with the right dtypes and shapes, finite and positive; shard checksums against the export
record. With `source_dir` and full=True: the plan is rebuilt from the recorded recipe, format and calibration and
every expected tensor is recomputed and compared bit for bit. For fp8-block, the report lists the
tensor-parallel sizes at which vLLM can serve the checkpoint (block divisibility of every partition).
"""
from __future__ import annotations

import json
import logging
import os
import re

import torch

from .layout import (INDEX_NAME, QUANTIZER_KEY, RECORD_NAME, SINGLE_NAME, STAGED_SUFFIX, STATE_FILE_NAME,
                     TMP_SUFFIX)
from .sources.checkpoint import SourceCheckpoint
from .storage.reader import read_tensor
from .storage.header import CorruptFileError, file_tensor_metas, read_header
from .storage.manifest import file_sha256

log = logging.getLogger(__name__)
TP_CANDIDATES = (1, 2, 4, 8, 16)
ROW_PARALLEL = re.compile(r"\.(o_proj|down_proj|w2|out_proj)$")


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


def _shard_files(out_dir: str, rep: Report) -> dict[str, str] | None:
    """{tensor name: file} from the index, or from the single file's header."""
    index_path = os.path.join(out_dir, INDEX_NAME)
    if os.path.isfile(index_path):
        with open(index_path) as f:
            index = json.load(f)
        rep.extra["index_total_size"] = index.get("metadata", {}).get("total_size")
        return index.get("weight_map", {})
    if os.path.isfile(os.path.join(out_dir, SINGLE_NAME)):
        return None
    rep.defect(f"no {INDEX_NAME} and no {SINGLE_NAME}: the export is incomplete")
    return {}


def _check_structure(out_dir: str, rep: Report) -> dict:
    weight_map = _shard_files(out_dir, rep)
    files = sorted(set(weight_map.values())) if weight_map is not None else [SINGLE_NAME]
    metas = {}
    total = 0
    for file in files:
        path = os.path.join(out_dir, file)
        if not os.path.isfile(path):
            rep.defect(f"{file}: named by the index but missing")
            continue
        try:
            file_meta, _ = read_header(path)
            entries = file_tensor_metas(out_dir, file)
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


def _check_state_file(out_dir: str, rep: Report) -> None:
    path = os.path.join(out_dir, STATE_FILE_NAME)
    if not os.path.isfile(path):
        return
    try:
        state = torch.load(path, weights_only=True, map_location="cpu")
    except Exception as e:  # noqa: BLE001
        rep.defect(f"vllm_fq_modelopt_state.pth does not load with weights_only=True: {str(e).splitlines()[0]}")
        return
    for key in ("modelopt_state_dict", "modelopt_version", "modelopt_state_weights"):
        if key not in state:
            rep.defect(f"vllm_fq_modelopt_state.pth lacks {key!r}")
    for name, entry in state.get("modelopt_state_weights", {}).items():
        if "weight_quantizer" in name:
            rep.defect(f"state file holds weight quantizer {name}; its effect must be folded, not restored")
        amax = entry.get("_amax")
        if amax is not None and not torch.isfinite(amax.float()).all():
            rep.defect(f"state file: amax of {name} is not finite")


def _check_scales(out_dir: str, metas: dict, config: dict, rep: Report) -> None:
    qc = config.get("quantization_config") or {}
    method = qc.get("quant_method")
    if method == "fp8":
        b0, b1 = qc.get("weight_block_size", [128, 128])
        tp_ok = set(TP_CANDIDATES)
        ragged = []
        for name, m in metas.items():
            if not name.endswith(".weight_scale_inv"):
                continue
            module = name[: -len(".weight_scale_inv")]
            w = metas.get(module + ".weight")
            if w is None or w.dtype != "F8_E4M3":
                rep.defect(f"{name}: no float8_e4m3fn weight next to it")
                continue
            out, inp = w.shape
            want = (-(-out // b0), -(-inp // b1))
            if m.dtype != "F32" or m.shape != want:
                rep.defect(f"{name}: {m.dtype}{list(m.shape)}, expected F32{list(want)}")
            _positive_finite(out_dir, m, rep)
            dim, block = (inp, b1) if ROW_PARALLEL.search(module) else (out, b0)
            tp_ok &= {tp for tp in TP_CANDIDATES if dim % tp == 0 and (dim // tp) % block == 0}
            if out % b0 or inp % b1:
                ragged.append(f"{module} {[out, inp]}")
        if ragged:
            rep.warnings.append(f"{len(ragged)} quantized weights are not multiples of {b0}x{b1} (e.g. "
                                f"{', '.join(ragged[:3])}): transformers dequantizes them incorrectly; vLLM reads "
                                f"the ceil grid")
        rep.extra["vllm_tp_sizes"] = sorted(tp_ok)
    elif method == "modelopt":
        for name, m in metas.items():
            if name.endswith((".weight_scale", ".weight_scale_2", ".input_scale")):
                _positive_finite(out_dir, m, rep)
            if name.endswith(".weight_scale_2") or name.endswith(".input_scale"):
                if m.dtype != "F32" or m.shape != ():
                    rep.defect(f"{name}: {m.dtype}{list(m.shape)}, expected F32[]")
            if name.endswith(".weight_scale") and m.dtype == "F8_E4M3":
                w = metas.get(name[: -len("_scale")])
                if w is None or w.dtype != "U8" or m.shape != (w.shape[0], -(-(w.shape[1] * 2) // 16)):
                    rep.defect(f"{name}: shape {list(m.shape)} does not fit the packed NVFP4 weight")


def _positive_finite(out_dir: str, meta, rep: Report) -> None:
    t = read_tensor(out_dir, meta).float()
    if not torch.isfinite(t).all() or (t <= 0).any():
        rep.defect(f"{meta.name}: scales must be finite and positive")


def _check_checksums(out_dir: str, record: dict, rep: Report) -> None:
    """Re-read every shard and compare its sha256 with the record (files hashed in parallel threads:
    hashlib and file reads release the GIL, so this runs at disk or page-cache speed)."""
    from concurrent.futures import ThreadPoolExecutor

    files = [(f, i) for f, i in sorted(record.get("shards", {}).items()) if os.path.isfile(os.path.join(out_dir, f))]
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        digests = list(pool.map(lambda fi: file_sha256(os.path.join(out_dir, fi[0])), files))
    for (file, info), digest in zip(files, digests):
        if digest != info["sha256"]:
            rep.defect(f"{file}: sha256 differs from the export record (the file changed after export)")


def recompute_and_compare(out_dir: str, source_dir: str, record: dict, metas: dict, rep: Report) -> None:
    """Rebuild the plan from the record and compare every expected tensor with what is on disk, bit for bit."""
    from .groups import measure_group_amax, merge_group_amax
    from .quantize import quantize_item
    from .runtime.dist import DistContext
    from .plan import build_plan
    from .recipe import recipe_from_dict
    from .output_formats import get_output_format

    source = SourceCheckpoint(source_dir)
    recipe = recipe_from_dict(record["recipe"], source="export record")
    fmt = get_output_format(record["format"])
    calib = {k: torch.tensor(v, dtype=torch.float32) for k, v in record.get("calibration", {}).items()}
    plan = build_plan(source.tensors, recipe, fmt, 1, 1 << 62)
    expected = {o.name for item in plan.items.values() for o in fmt.outputs(item)}
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
        for name, tensor in quantize_item(ctx, item, source.read(item.meta), fmt, calib, group_amax):
            expected_names.add(name)
            got = read_tensor(out_dir, metas[name])
            if got.dtype != tensor.dtype or tuple(got.shape) != tuple(tensor.shape):
                rep.defect(f"{name}: {got.dtype}{list(got.shape)}, expected {tensor.dtype}{list(tensor.shape)}")
            elif not torch.equal(got.reshape(-1).view(torch.uint8), tensor.contiguous().reshape(-1).view(torch.uint8)):
                rep.defect(f"{name}: values differ from the recomputed export")
    rep.extra["recomputed"] = len(expected_names)


def verify_export(out_dir: str, source_dir: str | None = None) -> dict:
    rep = Report()
    if not os.path.isdir(out_dir):
        rep.defect(f"{out_dir} does not exist")
        return rep.as_dict()
    metas = _check_structure(out_dir, rep)
    _check_state_file(out_dir, rep)
    config = {}
    if os.path.isfile(os.path.join(out_dir, "config.json")):
        with open(os.path.join(out_dir, "config.json")) as f:
            config = json.load(f)
    else:
        rep.defect("config.json is missing")
    _check_scales(out_dir, metas, config, rep)
    record_path = os.path.join(out_dir, RECORD_NAME)
    record = {}
    if os.path.isfile(record_path):
        with open(record_path) as f:
            record = json.load(f)
        _check_checksums(out_dir, record, rep)
    leftovers = [f for f in os.listdir(out_dir) if f.endswith((TMP_SUFFIX, STAGED_SUFFIX))]
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

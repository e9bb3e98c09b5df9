"""Stage 3, rank 0 only, after every rank reported success: check what was written, stage, verify, publish.

Order matters: the shard records are combined from every rank's per-tensor checksums (`shard_records`: each
planned tensor exactly once) and the shards' sizes and header bytes are checked against the plan; every small
file is built in memory (config.json, the side files, the format's extra files, the index); the export record,
naming each of them with its sha256 and size and each shard with its size and the sha256 of its header and of
every tensor (the proof of ownership a later --overwrite or --resume relies on, see storage/outdir.py),
is written first, then the small files; the quick verify runs on that staged view (`stage_export`, inside the
last cross-rank step, so a defect is every rank's failure and nothing is published). Only after that step, when
every rank knows the outcome and no peer is watched any more, `publish_export` writes the index (private
temporary, fsync, rename) or renames the single file to `model.safetensors`. Until that final step no loader
can see a complete checkpoint, and a run that exits non-zero has published nothing. Every
temporary lives in `.dist_export/tmp/`; a link in --out is never written through (`atomic.py`).
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from dataclasses import dataclass

from .layout import CONFIG_NAME, INDEX_NAME, MANIFEST_DIR, RECORD_NAME, SINGLE_NAME
from .output_formats import format_file_names
from .sources.hub import source_root
from .sources.side_files import list_side_files, missing_auto_map_code, side_file_path
from .storage.atomic import read_regular, write_atomic
from .storage.header import read_header
from .storage.outdir import clashes, fsync_dir, refuse_clash, tmp_dir
from .storage.reader import safe_join
from .plan import ExportPlan
from .storage.shared_shard import header_sha256
from .tensor_checksums import combine_tensor_sums

log = logging.getLogger(__name__)



def shard_records(plan: ExportPlan, results) -> dict[str, dict]:
    """The export record's `shards` from every rank's result: each shard's record (size, header sha256, tensor
    sha256s) from the rank that completed or reused it, checked against the per-tensor checksums every writer
    reported: every planned tensor has exactly one, and they equal the record's (a shard completed on a record
    the writers do not confirm is refused)."""
    planned = {s.filename: [t.name for t in s.tensors] for s in plan.shards}
    sums = combine_tensor_sums(planned, [{f: e["tensors"] for f, e in r.shards.items()} for r in results])
    records: dict[str, dict] = {}
    for r in results:
        records.update(r.completed)
    for shard in plan.shards:
        rec = records.get(shard.filename)
        if rec is None:
            raise RuntimeError(f"commit: shard {shard.filename} was not completed by any rank; rerun with --resume")
        if rec["tensors"] != sums[shard.filename]:
            bad = [n for n in planned[shard.filename] if rec["tensors"].get(n) != sums[shard.filename][n]]
            raise RuntimeError(f"commit: shard {shard.filename}: the record's checksums of {bad[:3]} differ from "
                               f"what their writers reported; rerun with --resume")
    return {s.filename: {k: records[s.filename][k] for k in ("size", "header_sha256", "tensors")}
            for s in plan.shards}


def check_written_shards(plan: ExportPlan, out_dir: str, staged, records: dict[str, dict] | None = None) -> None:
    """Every planned shard exists (a regular file, not a link) with its recorded size and the planned header
    bytes, and its header lists exactly the planned tensors (names, dtypes, shapes). The tensor bytes were hashed
    where they were written; the verify step after the commit re-reads every range."""
    for shard in plan.shards:
        path = staged(out_dir, plan, shard.filename)
        if os.path.islink(path) or not os.path.isfile(path):
            raise RuntimeError(f"commit: shard {shard.filename} is missing; a rank did not write it")
        rec = (records or {}).get(shard.filename)
        if rec is not None:
            if os.path.getsize(path) != rec["size"]:
                raise RuntimeError(f"commit: shard {shard.filename} has {os.path.getsize(path)} bytes, planned "
                                   f"{rec['size']}")
            planned = header_sha256([(t.name, t.dtype, t.shape) for t in shard.tensors])
            if not planned == rec["header_sha256"] == _header_sha256_on_disk(path):
                raise RuntimeError(f"commit: shard {shard.filename}: its header is not the planned one")
        _, header = read_header(path)
        got = {k: (v["dtype"], tuple(v["shape"])) for k, v in header.items()}
        want = {t.name: (t.dtype, t.shape) for t in shard.tensors}
        if got != want:
            bad = sorted(set(got.items()) ^ set(want.items()))[:3]
            raise RuntimeError(f"commit: shard {shard.filename} does not match the plan, e.g. {bad}")


def _header_sha256_on_disk(path: str) -> str:
    import struct

    with open(path, "rb") as f:
        head = f.read(8)
        (n,) = struct.unpack("<Q", head)
        return hashlib.sha256(head + f.read(n)).hexdigest()


def _side_files(src: str, config: dict) -> tuple[dict, dict[str, bytes]]:
    """(config, {relative path: bytes}) of every side file of `src` (sources/side_files.py: tokenizer files of
    any kind, README, LICENSE, auto_map code, ...; each must resolve to a regular file inside the source root,
    read without following a further link). The config loses its `auto_map` when the code it names is missing:
    vLLM raises on a dangling one."""
    root = source_root(src)
    files = {rel: read_regular(side_file_path(src, rel, root), "side file")
             for rel in list_side_files(src, root, format_file_names())}
    missing = missing_auto_map_code(src)
    if missing.get(CONFIG_NAME) and "auto_map" in config:
        log.warning("config.json auto_map names %s, missing from the source: auto_map removed "
                    "(vLLM raises on a dangling auto_map)", missing[CONFIG_NAME])
        config = {k: v for k, v in config.items() if k != "auto_map"}
    for name, names in missing.items():
        if name != CONFIG_NAME:
            log.warning("%s auto_map names %s, missing from the source: loading it with trust_remote_code will "
                        "fail", name, names)
    return config, files


def _json(data: dict, indent: int) -> bytes:
    return (json.dumps(data, indent=indent, sort_keys=True) + "\n").encode()


def _out_path(out_dir: str, rel: str) -> str:
    """Where `rel` goes in --out: every folder on the way is created by us or is a real folder inside --out,
    never a link (a write never lands outside --out through a planted link)."""
    parts = rel.split("/")
    folder = out_dir
    for part in parts[:-1]:
        folder = os.path.join(folder, part)
        if os.path.islink(folder) or (os.path.lexists(folder) and not os.path.isdir(folder)):
            raise ValueError(f"{folder} in the output folder is a link or a file where the export needs a folder "
                             f"for {rel}; refusing to write through it: remove it")
        os.makedirs(folder, exist_ok=True)
    return safe_join(out_dir, os.path.join(*parts), "side file")


@dataclass
class Staged:
    """An export whose every file but the index (or the single file's final name) is in place and checked:
    what `publish_export` makes visible."""

    out_dir: str
    index: bytes | None  # the index's bytes (several shards), or None
    single: str | None  # the staged path of the single model.safetensors, or None
    verify_line: str | None = None


def stage_export(plan: ExportPlan, out_dir: str, source_dir: str | None, source_config: dict, recipe,
                 output_format, calib: dict, record: dict, staged, foreign=frozenset(), verify: bool = True,
                 tick=None) -> Staged:
    """Write and check everything but the index. Every file's bytes are known before the first write, so the
    record names all of them with their sha256 (what a later --overwrite may remove) and none of them lands on a
    `foreign` entry of --out (kept with --allow-foreign-files). With `verify`, the quick verify (structure,
    every format's own checks, checksums) runs on this staged view and any defect raises: nothing is published."""
    check_written_shards(plan, out_dir, staged, record.get("shards"))
    extras = output_format.extra_files(plan, recipe, calib)
    unlisted = sorted(set(extras) - set(output_format.file_names))
    if unlisted:  # a name not listed would be neither removed by --overwrite nor kept out of a later copy
        raise RuntimeError(f"--format {output_format.name} writes {unlisted}, which its file_names do not list")
    config = output_format.update_config(source_config, plan, recipe)
    side: dict[str, bytes] = {}
    if source_dir is not None:
        config, side = _side_files(source_dir, config)
    elif "auto_map" in config:
        config = {k: v for k, v in config.items() if k != "auto_map"}
    files = {**side, CONFIG_NAME: _json(config, 2), **extras}
    if not plan.single_file:
        weight_map = {t.name: s.filename for s in plan.shards for t in s.tensors}
        files[INDEX_NAME] = _json({"metadata": {"total_size": plan.total_size},
                                   "weight_map": dict(sorted(weight_map.items()))}, 2)
    clash = clashes(foreign, [*files, RECORD_NAME, *(SINGLE_NAME,) * plan.single_file])
    if clash:
        refuse_clash(out_dir, clash)
    record = {**record, "side_files": {rel: hashlib.sha256(b).hexdigest() for rel, b in sorted(side.items())},
              "files": {rel: {"sha256": hashlib.sha256(b).hexdigest(), "size": len(b)}
                        for rel, b in sorted(files.items())}}
    tmp = tmp_dir(out_dir)
    # the record first: a commit cut short leaves files that it names (ours to replace on the next run)
    write_atomic(os.path.join(out_dir, RECORD_NAME), _json(record, 1), tmp)
    for rel, data in files.items():
        if rel != INDEX_NAME:
            write_atomic(_out_path(out_dir, rel), data, tmp)
    result = Staged(out_dir, files.get(INDEX_NAME), staged(out_dir, plan, SINGLE_NAME) if plan.single_file else None)
    if verify:
        from .verify import verify_export

        pending = ({"index": json.loads(result.index)} if result.index is not None
                   else {"single": os.path.basename(result.single)})
        report = verify_export(out_dir, pending=pending, tick=tick)  # structure, scales, checksums
        if not report["ok"]:
            raise RuntimeError(f"verify found defects in the export, so nothing was published (no index): "
                               f"{report['defects'][:3]}")
        result.verify_line = f"verify: {report['tensors']} tensors checked, no defects"
    return result


def publish_export(st: Staged) -> None:
    """Rank 0, after every rank knows the commit succeeded: the index (or the single file's final name) last,
    then our private folder goes. Only a rename or an atomic write of checked bytes is left to fail here."""
    if st.single is not None:
        os.replace(st.single, os.path.join(st.out_dir, SINGLE_NAME))
    else:
        write_atomic(os.path.join(st.out_dir, INDEX_NAME), st.index, tmp_dir(st.out_dir))
    shutil.rmtree(os.path.join(st.out_dir, MANIFEST_DIR), ignore_errors=True)
    fsync_dir(st.out_dir)

"""Stage 3, rank 0 only, after every rank reported success: check what was written, then publish.

Order matters: shard headers are checked against the plan, then config.json, the extra files (state file,
hf_quant_config.json) and the export record are written, and last the index (temp file, fsync, rename) or,
for a single file, the rename to `model.safetensors`. Until that final step no loader can see a complete
checkpoint.
"""
from __future__ import annotations

import json
import logging
import os
import shutil

from .storage.atomic import write_atomic
from .layout import CONFIG_NAME, INDEX_NAME, MANIFEST_DIR, RECORD_NAME, SINGLE_NAME
from .output_formats import format_file_names
from .sources.hub import source_root
from .sources.side_files import list_side_files, missing_auto_map_code, side_file_path
from .storage.manifest import file_sha256
from .storage.reader import safe_join
from .storage.header import read_header
from .storage.outdir import fsync_dir
from .plan import ExportPlan

log = logging.getLogger(__name__)



def check_written_shards(plan: ExportPlan, out_dir: str, staged) -> None:
    """Every planned shard exists and its header lists exactly the planned tensors (names, dtypes, shapes)."""
    for shard in plan.shards:
        path = staged(out_dir, plan, shard.filename)
        if not os.path.isfile(path):
            raise RuntimeError(f"commit: shard {shard.filename} is missing; a rank did not write it")
        _, header = read_header(path)
        got = {k: (v["dtype"], tuple(v["shape"])) for k, v in header.items()}
        want = {t.name: (t.dtype, t.shape) for t in shard.tensors}
        if got != want:
            bad = sorted(set(got.items()) ^ set(want.items()))[:3]
            raise RuntimeError(f"commit: shard {shard.filename} does not match the plan, e.g. {bad}")


def _copy_side_files(src: str, out_dir: str, config: dict) -> tuple[dict, dict[str, str]]:
    """Copy every side file of `src` (sources/side_files.py: tokenizer files of any kind, README, LICENSE,
    auto_map code, ...; links must resolve inside the source root). Returns the config (its `auto_map` dropped
    when the code it names is missing: vLLM raises on a dangling one) and {relative path: sha256} of what was
    written, for the record (a later --overwrite removes exactly those files)."""
    root = source_root(src)
    written = {}
    for rel in list_side_files(src, root, format_file_names()):
        real = side_file_path(src, rel, root)
        dst = safe_join(out_dir, os.path.join(*rel.split("/")), "side file")
        os.makedirs(os.path.dirname(dst), exist_ok=True)
        if os.path.islink(dst):
            raise ValueError(f"{dst} is a link in the output folder; refusing to write through it: remove it")
        shutil.copyfile(real, dst)
        os.chmod(dst, 0o644)
        written[rel] = file_sha256(dst)
    missing = missing_auto_map_code(src)
    if missing.get(CONFIG_NAME) and "auto_map" in config:
        log.warning("config.json auto_map names %s, missing from the source: auto_map removed "
                    "(vLLM raises on a dangling auto_map)", missing[CONFIG_NAME])
        config = {k: v for k, v in config.items() if k != "auto_map"}
    for name, files in missing.items():
        if name != CONFIG_NAME:
            log.warning("%s auto_map names %s, missing from the source: loading it with trust_remote_code will "
                        "fail", name, files)
    return config, written


def commit_export(plan: ExportPlan, out_dir: str, source_dir: str | None, source_config: dict, recipe,
                  output_format, calib: dict, record: dict, staged) -> None:
    """Publish the export; the index (or the single file's final name) comes last."""
    check_written_shards(plan, out_dir, staged)
    extras = output_format.extra_files(plan, recipe, calib)
    unlisted = sorted(set(extras) - set(output_format.file_names))
    if unlisted:  # a name not listed would be neither removed by --overwrite nor kept out of a later copy
        raise RuntimeError(f"--format {output_format.name} writes {unlisted}, which its file_names do not list")
    config = output_format.update_config(source_config, plan, recipe)
    if source_dir is not None:
        config, record["side_files"] = _copy_side_files(source_dir, out_dir, config)
    elif "auto_map" in config:
        config = {k: v for k, v in config.items() if k != "auto_map"}
    write_atomic(os.path.join(out_dir, CONFIG_NAME), (json.dumps(config, indent=2, sort_keys=True) + "\n").encode())
    for name, data in extras.items():
        write_atomic(os.path.join(out_dir, name), data)
    write_atomic(os.path.join(out_dir, RECORD_NAME), (json.dumps(record, indent=1, sort_keys=True) + "\n").encode())
    if plan.single_file:
        os.replace(staged(out_dir, plan, SINGLE_NAME), os.path.join(out_dir, SINGLE_NAME))
    else:
        weight_map = {t.name: s.filename for s in plan.shards for t in s.tensors}
        index = {"metadata": {"total_size": plan.total_size}, "weight_map": dict(sorted(weight_map.items()))}
        write_atomic(os.path.join(out_dir, INDEX_NAME), (json.dumps(index, indent=2, sort_keys=True) + "\n").encode())
    shutil.rmtree(os.path.join(out_dir, MANIFEST_DIR), ignore_errors=True)
    fsync_dir(out_dir)

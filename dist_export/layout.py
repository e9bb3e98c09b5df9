"""Every on-disk name of an export and of a source checkpoint, in one place (all stages, every rank).

Names a format adds to the folder (the state file, `hf_quant_config.json`) are listed by that output format
(`OutputFormat.extra_files`); this module holds the names every export shares and the one rule for what a
quantizer-state key looks like.
"""
from __future__ import annotations

import os
import re

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
CONFIG_NAME = "config.json"
GENERATION_CONFIG_NAME = "generation_config.json"
RECORD_NAME = "dist_export.json"  # the export record: recipe, format, calibration, per-shard checksums
MANIFEST_DIR = ".dist_export"  # our private folder: resume manifest (fingerprint, finished shards), tmp/
LOCK_NAME = ".dist_export.lock"
TMP_SUFFIX = ".tmp"  # a file being written; renamed into place when complete
STAGED_SUFFIX = ".staged"  # a finished single-file shard waiting for the commit
STATE_FILE_NAME = "vllm_fq_modelopt_state.pth"
HF_QUANT_CONFIG_NAME = "hf_quant_config.json"

# A tensor or state-dict key that belongs to a quantizer (ModelOpt's `*_quantizer.*`, `_amax`,
# `_pre_quant_scale`): never written as a weight, never read as one.
QUANTIZER_KEY = re.compile(r"(_quantizer\.|_quantizer$|(^|\.)_amax$|_pre_quant_scale$)")

# In a quantizer-state file (plain data), a Python slice is stored as {SLICE_TAG: (start, stop, step)}.
SLICE_TAG = "__slice__"


def shard_filename(index: int, count: int) -> str:
    """`model.safetensors` for a single shard, else Hugging Face's `model-00001-of-00003.safetensors`."""
    return SINGLE_NAME if count == 1 else f"model-{index + 1:05d}-of-{count:05d}.safetensors"


def export_tmp_dir(out_dir: str) -> str:
    """Where every file of an export starts, before its rename into place: inside our private folder, so a
    killed run's leftovers are provably ours (storage/outdir.py)."""
    return os.path.join(out_dir, MANIFEST_DIR, "tmp")


def private_tmp_name(final_name: str, token: str) -> str:
    """The hidden temporary `.NAME.<token>.tmp` a file of an export starts as (storage/atomic.py)."""
    return f".{final_name}.{token}{TMP_SUFFIX}"


def staged_path(out_dir: str, plan, filename: str) -> str:
    """Where a finished shard waits for the commit. A single `model.safetensors` keeps a staging name until
    rank 0 commits, since its final name alone would make a partial export look complete."""
    if plan.single_file:
        return os.path.join(out_dir, filename + STAGED_SUFFIX)
    return os.path.join(out_dir, filename)

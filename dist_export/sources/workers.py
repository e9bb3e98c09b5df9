"""`export(model, out_dir, nproc_per_node=N)` for a ModelOpt-quantized in-memory model (user's process).

The model's quantizers go into a small quantizer-state file (`save_quantizer_state`'s content); N worker
processes (`python -m dist_export export --model <source folder> --quantizer-state FILE`, one rank each, as the
command line's `--nproc-per-node` starts them) read the weights from the folder the model was loaded from, so
no tensor crosses a process boundary. Before any worker starts, the folder is checked against the model
(signature and sampled fingerprints of every tensor): weights changed in place (AWQ, SmoothQuant) are refused.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile

import torch

from ..layout import CONFIG_NAME


def source_folder(model) -> str:
    """The local checkpoint folder a model was loaded from (`from_pretrained(folder)` records it)."""
    folder = getattr(model, "name_or_path", None) or getattr(getattr(model, "config", None), "_name_or_path", "")
    if not folder or not os.path.isfile(os.path.join(folder, CONFIG_NAME)):
        raise ValueError(f"nproc_per_node needs the checkpoint folder the model was loaded from; the model names "
                         f"{folder!r}, which is no local folder with {CONFIG_NAME}: load the model from a local "
                         f"folder (or save it with save_pretrained and load it from there)")
    return folder


def worker_argv(folder: str, state_path: str, out_dir: str, opts, summary_path: str) -> list[str]:
    """The `dist-export export` arguments that give the workers exactly `opts`."""
    from ..recipe import Recipe

    if isinstance(opts.recipe, Recipe):
        raise ValueError("nproc_per_node takes a recipe by name or .yaml path (the workers load it), not a Recipe "
                         "object")
    if opts.fault is not None:
        raise ValueError("nproc_per_node takes no fault object; set DIST_EXPORT_FAULT in the environment instead")
    argv = ["export", "--model", folder, "--quantizer-state", state_path, "--out", out_dir, "--format", opts.format,
            "--max-shard-size", str(opts.max_shard_size), "--hang-timeout", str(opts.hang_timeout),
            "--dead-timeout", str(opts.dead_timeout), "--summary-json", summary_path]
    argv += ["--recipe", str(opts.recipe)] if opts.recipe is not None else []
    argv += ["--device", opts.device] if opts.device else []
    argv += ["--overwrite"] if opts.overwrite else []
    argv += ["--resume"] if opts.resume else []
    argv += [] if opts.verify else ["--no-verify"]
    argv += ["--modelopt-kernels"] if opts.modelopt_kernels else []
    argv += ["--allow-nonfinite"] if opts.allow_nonfinite else []
    return argv


def export_in_workers(model, out_dir: str, opts) -> dict:
    """Save the model's quantizer state, check the source folder holds the same weights, run
    `opts.nproc_per_node` export workers on it; returns rank 0's summary."""
    from ..runtime.launch import launch_local
    from .checkpoint import SourceCheckpoint
    from .memory import MemorySource
    from .quantizer_state import check_fingerprints, check_signature, save_state
    from .quantizers import build_quantizer_state

    if opts.quantizer_state is not None or opts.calib is not None:
        raise ValueError("nproc_per_node takes the model's own quantizers: do not pass quantizer_state or calib")
    folder = source_folder(model)
    with torch.no_grad():
        source = MemorySource(model)
        if not source.modelopt:
            raise ValueError("nproc_per_node is for ModelOpt-quantized models (their quantizers travel in a small "
                             "file); export a plain model's folder with `dist-export export --nproc-per-node N`")
        state = build_quantizer_state(model, source)
    on_disk = SourceCheckpoint(folder)
    check_signature(state, on_disk.tensors, "the in-memory model's quantizer state", folder)
    check_fingerprints(state, folder, on_disk.tensors, "the in-memory model")
    side = tempfile.mkdtemp(prefix="dist_export_workers_")
    try:
        path = os.path.join(side, "quantizer_state.pt")
        save_state(state, path)
        summary_path = os.path.join(side, "summary.json")
        code = launch_local(worker_argv(folder, path, out_dir, opts, summary_path), opts.nproc_per_node)
        if code != 0:
            raise RuntimeError(f"the {opts.nproc_per_node} export workers failed (exit code {code}); their "
                               f"messages are above")
        with open(summary_path) as f:
            return json.load(f)
    finally:
        shutil.rmtree(side, ignore_errors=True)

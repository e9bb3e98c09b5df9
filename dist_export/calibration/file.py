"""Calibration files: activation amax per input quantizer, in checkpoint key space, as safetensors.

Keys are quantizer paths (`model.layers.0.self_attn.q_proj.input_quantizer`; with recipe.kv_cache also
`model.layers.0.self_attn.k_bmm_quantizer` / `.v_bmm_quantizer`, the key / value states after RoPE), values
0-d float32 amax.
Metadata binds the file to the model (names, dtypes and shapes of every tensor) and to the recipe, so a
calibration made for another model or recipe is refused instead of silently misapplied.

Written by `dist-export calibrate` (rank 0); read and checked by every rank at plan time.
"""
from __future__ import annotations

import os

import torch
from safetensors import safe_open
from safetensors.torch import save as save_bytes

from ..recipe import recipe_args
from ..storage.atomic import write_atomic


CALIB_FORMAT = "dist_export-calibration-1"
# vLLM fuses these projections into one module with one input quantizer: their input amax is shared
FUSED_INPUT_GROUPS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"), ("w1", "w3"))


def input_quantizer_name(module: str) -> str:
    return f"{module}.input_quantizer"


def save_calibration(path: str, amax: dict[str, torch.Tensor], recipe, signature: str,
                     data: dict | None = None) -> None:
    """`data`: how the samples were chosen (calibration/data.py's record), kept as JSON in the metadata."""
    tensors = {k: v.detach().float().reshape(()).cpu().contiguous() for k, v in sorted(amax.items())}
    meta = {"format": CALIB_FORMAT, "recipe": recipe.name, "recipe_fingerprint": recipe.fingerprint,
            "model_signature": signature}
    if data is not None:
        import json

        meta["data"] = json.dumps(data, sort_keys=True)
    # a private temporary, never through a link (atomic.py); the same amax give the same bytes in any process
    write_atomic(path, _canonical(save_bytes(tensors, metadata=meta)))


def _canonical(blob: bytes) -> bytes:
    """The safetensors bytes with the header's keys sorted: safetensors writes the metadata map in a per-process
    random order, so two processes (two ranks, or a rerun for --resume) would write the same calibration as
    different bytes and the export record's calibration checksum would differ."""
    import json

    n = int.from_bytes(blob[:8], "little")
    header = json.dumps(json.loads(blob[8:8 + n]), sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()
    header += b" " * (-len(header) % 8)  # the data section starts 8-byte aligned, as safetensors pads it
    return len(header).to_bytes(8, "little") + header + blob[8 + n:]


def load_calibration(path: str, recipe, signature: str, required: list[str]) -> dict[str, torch.Tensor]:
    """Read and check a calibration file; returns {quantizer path: 0-d float32 amax}."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"calibration file {path} does not exist; run `dist-export calibrate` first")
    try:
        with safe_open(path, "pt") as f:
            meta = f.metadata() or {}
            amax = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # noqa: BLE001 - any parse failure is a bad file
        raise ValueError(f"calibration file {path} is not a valid safetensors file ({e})") from None
    if meta.get("format") != CALIB_FORMAT:
        raise ValueError(f"{path} is not a dist_export calibration file (metadata format={meta.get('format')!r})")
    if meta.get("model_signature") != signature:
        raise ValueError(f"calibration file {path} was made for another model; calibrate this model first")
    if meta.get("recipe_fingerprint") != recipe.fingerprint:
        raise ValueError(f"calibration file {path} was made with recipe {meta.get('recipe')!r} "
                         f"(fingerprint {meta.get('recipe_fingerprint')}), not this {recipe.name!r} "
                         f"(fingerprint {recipe.fingerprint}{', with its KV cache' if recipe.kv_cache else ''}); "
                         f"calibrate again with {recipe_args(recipe)}")
    missing = [k for k in required if k not in amax]
    if missing:
        raise ValueError(f"calibration file {path} has no amax for {len(missing)} quantizers, e.g. {missing[0]!r}")
    for k, v in amax.items():
        if v.dim() != 0 or not v.is_floating_point():
            raise ValueError(f"calibration file {path}: amax of {k!r} is {v.dtype}{list(v.shape)}, not a 0-d float; "
                             f"calibrate again with `dist-export calibrate`")
        if not torch.isfinite(v) or v <= 0:
            raise ValueError(f"calibration file {path}: amax of {k!r} is {v.item()} (must be finite and positive: "
                             f"a zero amax gives a zero scale); calibrate again with more or other data")
    return amax


def calibration_data_record(path: str) -> dict | None:
    """How the samples of a calibration file were chosen (its `data` metadata: kind, name, sha256, samples,
    tokens), for the export record; None for a file written without one."""
    import json

    with safe_open(path, "pt") as f:
        text = (f.metadata() or {}).get("data")
    try:
        return json.loads(text) if text else None
    except ValueError:
        raise ValueError(f"calibration file {path}: its data record is not JSON") from None


def required_input_quantizers(plan) -> list[str]:
    """Every amax the export needs: static input quantizers, and the K/V quantizers of recipe.kv_cache."""
    return sorted([input_quantizer_name(i.module) for i in plan.items.values()
                   if i.quantized and i.input is not None and i.input.needs_calibration]
                  + [i.kv for i in plan.items.values() if i.kv])


def fused_input_amax(module: str, calib: dict[str, torch.Tensor]) -> torch.Tensor:
    """Max of the calibrated input amax over the module's fused group (q/k/v or gate/up)."""
    prefix, dot, proj = module.rpartition(".")
    group = next((g for g in FUSED_INPUT_GROUPS if proj in g), (proj,))
    found = [calib[n].float() for n in (input_quantizer_name(prefix + dot + p) for p in group) if n in calib]
    if not found:  # a top-level module (lm_head) has no prefix; a missing amax is named, never a stack error
        raise ValueError(f"{input_quantizer_name(module)}: the calibration holds no amax for this static input "
                         f"quantizer; calibrate again with the recipe the export uses")
    return torch.stack(found).amax()

"""Map a transformers model's in-memory tensor names to checkpoint key space (what `save_pretrained` writes).

transformers 5 renames some modules in memory (Mixtral's `block_sparse_moe` -> `mlp`) and fuses experts into
3-D tensors; its own `revert_weight_conversion` undoes both. Applied to one meta tensor at a time it tells,
for every in-memory key, the checkpoint keys it becomes, without touching any data.

Every rank, plan stage (in-memory models and calibration).
"""
from __future__ import annotations

import re

import torch

EXPERT_KEY = re.compile(r"^(.*\.experts)\.(\d+)\.(gate_proj|up_proj|w1|w3|down_proj|w2)\.weight$")
ROLE = {"gate_proj": "gate", "w1": "gate", "up_proj": "up", "w3": "up", "down_proj": "down", "w2": "down"}


def checkpoint_keys(model, meta_state: dict[str, torch.Tensor]) -> dict[str, list[str]]:
    """{in-memory key: [checkpoint keys]} (identity where transformers keeps names as they are)."""
    try:
        from transformers.core_model_loading import revert_weight_conversion
    except ImportError:  # older transformers keep checkpoint names in memory
        return {k: [k] for k in meta_state}
    out = {}
    for key, t in meta_state.items():
        out[key] = list(revert_weight_conversion(model, {key: t}))
    return out


def expert_slots(names: list[str]) -> dict[tuple[int, str], str]:
    """{(expert, role): checkpoint key} for the per-expert names a fused tensor becomes."""
    slots = {}
    for n in names:
        m = EXPERT_KEY.match(n)
        if m is None:
            raise ValueError(f"unexpected per-expert checkpoint name {n!r}")
        slots[(int(m.group(2)), ROLE[m.group(3)])] = n
    return slots

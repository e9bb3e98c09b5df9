"""What an export must contain, computed independently of dist_export's planner and numerics.

Which tensors are quantized, with which settings, and which share an amax are derived here from the recipe YAML
and the tensor names; the folded values come from tests/numerics_reference.py (written from formats.md).
"""
from __future__ import annotations

import fnmatch
import re

import torch
import yaml
from safetensors import safe_open

from numerics_reference import ref_compute_amax, ref_fake_quant

DEFAULT_EXCLUDE = ("lm_head", "*embed_tokens", "*norm", "*layernorm", "*.mlp.gate", "*.block_sparse_moe.gate",
                   "*.router")
STACK = re.compile(r"\.experts\.(gate_up_proj|down_proj)$")


def stack_layout(name: str, source: dict) -> str:
    """GPT-OSS stacks: bias [E, out] says whether a slice is [in, out] (x @ W[e]) or [out, in]."""
    t, b = source[name], source[name + "_bias"]
    if b.shape[1] == t.shape[2] != t.shape[1]:
        return "in_out"
    if b.shape[1] == t.shape[1] != t.shape[2]:
        return "out_in"
    return stack_layout(name.replace("down_proj", "gate_up_proj"), source)


def fold_stack(t: torch.Tensor, layout: str, settings, shared: bool) -> torch.Tensor:
    """Each expert's [out, in] matrix folded on its own (or with the stack's max amax)."""
    mats = [t[e].t() if layout == "in_out" else t[e] for e in range(t.shape[0])]
    amaxes = [ref_compute_amax(m, *settings) for m in mats]
    if shared:
        amaxes = [torch.stack(amaxes).amax()] * len(mats)
    folded = [ref_fake_quant(m, *settings, a) for m, a in zip(mats, amaxes)]
    return torch.stack([f.t() if layout == "in_out" else f for f in folded])


def load_recipe_yaml(name: str) -> dict:
    import os

    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    with open(os.path.join(here, "dist_export", "configs", f"{name}.yaml")) as f:
        return yaml.safe_load(f)


def weight_settings(recipe: dict, module: str):
    """(fmt, granularity, block) of the module's weight quantizer, or None if not quantized."""
    if any(fnmatch.fnmatchcase(module, p) for p in DEFAULT_EXCLUDE + tuple(recipe.get("exclude") or ())):
        return None
    for rule in recipe["rules"]:
        if any(fnmatch.fnmatchcase(module, p) for p in rule["match"]):
            w = rule["weight"]
            if w["format"] == "nvfp4":
                return ("nvfp4", "group", 16)
            return (w["format"], w.get("granularity", "tensor"), w.get("block_size"))
    raise AssertionError(f"no rule for {module}")


def share_key(module: str, kinds) -> str | None:
    """Name of the shared-amax group of `module` (formats.md: q/k/v, gate/up, experts of a layer)."""
    keys = []
    if "experts" in kinds:
        m = re.match(r"^(.*\.experts)\.\d+\.(gate_proj|up_proj|w1|w3)$", module)
        if m:
            keys.append(m.group(1) + ":gu")
        m = re.match(r"^(.*\.experts)\.\d+\.(down_proj|w2)$", module)
        if m:
            keys.append(m.group(1) + ":down")
    if "gate_up" in kinds:
        m = re.match(r"^(.*)\.(gate_proj|up_proj|w1|w3)$", module)
        if m and not keys:
            keys.append(m.group(1) + ":gate_up")
    if "qkv" in kinds:
        m = re.match(r"^(.*)\.(q_proj|k_proj|v_proj)$", module)
        if m:
            keys.append(m.group(1) + ":qkv")
    return keys[0] if keys else None


def read_all(folder: str) -> dict[str, torch.Tensor]:
    import json
    import os

    files = ["model.safetensors"]
    index = os.path.join(folder, "model.safetensors.index.json")
    if os.path.isfile(index):
        with open(index) as f:
            files = sorted(set(json.load(f)["weight_map"].values()))
    out = {}
    for file in files:
        with safe_open(os.path.join(folder, file), "pt") as f:
            for k in f.keys():
                assert k not in out, f"{k} appears twice"
                out[k] = f.get_tensor(k)
    return out


def expected_folds(source: dict[str, torch.Tensor], recipe_name) -> dict[str, torch.Tensor]:
    """{name: expected tensor} for every source tensor under the vllm-fq format (recipe: a name in configs/
    or the recipe's YAML data as a dict)."""
    recipe = recipe_name if isinstance(recipe_name, dict) else load_recipe_yaml(recipe_name)
    kinds = tuple(recipe.get("share_weight_amax") or ())
    settings, groups, stacks = {}, {}, {}
    for name, t in source.items():
        if t.dim() == 3 and STACK.search(name) and weight_settings(recipe, name) is not None:
            settings[name] = weight_settings(recipe, name)
            s = settings[name]
            stacks[name] = (stack_layout(name, source), "experts" in kinds and (s[0] == "nvfp4" or s[1] == "tensor"))
            continue
        if t.dim() != 2 or not name.endswith(".weight"):
            continue
        module = name[: -len(".weight")]
        s = weight_settings(recipe, module)
        if s is None:
            continue
        settings[name] = s
        per_tensor = s[0] == "nvfp4" or s[1] == "tensor"
        key = share_key(module, kinds) if per_tensor else None
        if key:
            groups.setdefault(key, []).append(name)
    amax = {n: ref_compute_amax(source[n], *settings[n]) for n in settings if n not in stacks}
    for members in groups.values():
        shared = torch.stack([amax[m] for m in members]).amax()
        for m in members:
            amax[m] = shared
    out = {}
    for name, t in source.items():
        if name in stacks:
            out[name] = fold_stack(t, *stacks[name][:1], settings[name], stacks[name][1])
        else:
            out[name] = ref_fake_quant(t, *settings[name], amax[name]) if name in settings else t
    return out, settings

"""The names other tools give our recipes (plan stage, every rank, when a recipe name is looked up; and
`dist-export recipes`).

`EQUIVALENTS` lists, per recipe of ours, the ModelOpt (`hf_ptq.py --qformat`, `mtq.*_CFG`, `quant_algo`) and
llm-compressor (compressed-tensors preset scheme) names whose quantization is the same: same element format,
same scale granularity, same static/dynamic activations. Those names are accepted as aliases (case-insensitive).
`NEAR_MISSES` are names that people reach for but whose semantics differ from every recipe of ours: looking one
up is an error that says what differs and names the closest recipe, instead of silently exporting something
else. Compared against ModelOpt 0.47 `modelopt/torch/quantization/config.py` and compressed-tensors
`quantization/quant_scheme.py` (PRESET_SCHEMES).
"""
from __future__ import annotations

from importlib import resources

EQUIVALENTS: dict[str, dict[str, tuple[str, ...]]] = {
    "fp8": {"modelopt": ("FP8_DEFAULT_CFG", "fp8", "FP8"), "llm-compressor": ("FP8",)},
    "fp8-pc-pt": {"modelopt": ("FP8_PER_CHANNEL_PER_TOKEN_CFG", "fp8_pc_pt", "FP8_PER_CHANNEL_PER_TOKEN"),
                  "llm-compressor": ("FP8_DYNAMIC",)},
    "fp8-block": {"modelopt": (), "llm-compressor": ("FP8_BLOCK",)},
    "nvfp4": {"modelopt": ("NVFP4_DEFAULT_CFG", "nvfp4", "NVFP4"), "llm-compressor": ("NVFP4",)},
    "nvfp4-w4a16": {"modelopt": ("W4A16_NVFP4",), "llm-compressor": ("NVFP4A16",)},
    "int4-w4a16": {"modelopt": ("INT4_BLOCKWISE_WEIGHT_ONLY_CFG",), "llm-compressor": ("W4A16",)},
    "int8-w8a16": {"modelopt": ("INT8_WEIGHT_ONLY_CFG", "int8_wo"), "llm-compressor": ()},
    "int8-w8a8": {"modelopt": (), "llm-compressor": ("W8A8",)},
    "mxfp8-w8a16": {"modelopt": (), "llm-compressor": ()},
    "mxfp4-w4a16": {"modelopt": (), "llm-compressor": ()},
    "mxfp8-w8a8": {"modelopt": (), "llm-compressor": ()},
    "mxfp4-w4a4": {"modelopt": (), "llm-compressor": ()},
}

# How each tool picks an MX block's E8M0 scale 2**k from the block's amax a (ours: OCP MX v1.0,
# k = floor(log2 a) - emax, numerics/mx.py). The same element format with another k is another quantization.
# Share of 32-blocks whose k differs from ours on a 4096x4096 N(0, 1) weight: ModelOpt's rule (emulated) 16.9%
# (MXFP8) / 29.6% (MXFP4); compressed-tensors 0.20.1's own generate_mx_scales 16.9% / 16.9%.
_MODELOPT_MX = ("ModelOpt 0.47 picks MX block scales as 2**ceil(log2(amax / max)) (tensor_quant_mx.cu); ours are "
                "OCP MX v1.0's 2**(floor(log2 amax) - emax): other scales for about 17-30% of blocks")
_LLMC_MX = ("llm-compressor (compressed-tensors 0.20) rounds a block's amax up to a power of two before its floor; "
            "ours are OCP MX v1.0's 2**(floor(log2 amax) - emax): other scales for about 17% of blocks")
_BOTH_MX = ("ModelOpt 0.47 (2**ceil(log2(amax / max))) and llm-compressor (amax rounded up to a power of two "
            "first) pick other MX block scales than ours (OCP MX v1.0: 2**(floor(log2 amax) - emax)) for about "
            "17-30% of blocks")

NEAR_MISSES: dict[str, tuple[str, str]] = {
    "nvfp4_mse": ("nvfp4-mse", "ModelOpt's nvfp4_mse is W4A4 (NVFP4 activations too); our nvfp4-mse is weight-only "
                               "(W4A16) with the same MSE weight-scale search"),
    "NVFP4_W4A4_WEIGHT_MSE_FP8_SWEEP_CFG": ("nvfp4-mse", "this ModelOpt config is W4A4; our nvfp4-mse is "
                                                         "weight-only (W4A16)"),
    "fp8_pb_wo": ("fp8-block", "ModelOpt's fp8_pb_wo is weight-only; our fp8-block also quantizes activations "
                               "dynamically in groups of 128 (as DeepSeek/Qwen FP8 checkpoints do)"),
    "FP8_2D_BLOCKWISE_WEIGHT_ONLY_CFG": ("fp8-block", "that ModelOpt config is weight-only; our fp8-block "
                                                      "quantizes activations dynamically in groups of 128"),
    "int8": ("int8-w8a8", "ModelOpt's int8 (INT8_DEFAULT_CFG) calibrates a static per-tensor activation scale; "
                          "our int8-w8a8 quantizes activations dynamically per token"),
    "INT8_DEFAULT_CFG": ("int8-w8a8", "INT8_DEFAULT_CFG uses static per-tensor activation scales; our int8-w8a8 "
                                      "quantizes activations dynamically per token"),
    "int8_sq": ("int8-w8a8", "SmoothQuant rescales weights and activations; dist_export does not (int8-w8a8 is "
                             "plain W8A8 with dynamic per-token activations)"),
    "INT8_SMOOTHQUANT_CFG": ("int8-w8a8", "SmoothQuant is not implemented; int8-w8a8 is plain W8A8"),
    "int4_awq": ("int4-w4a16", "AWQ is not implemented; int4-w4a16 (max scales) or int4-w4a16-mse (MSE scale "
                               "search) are plain group-128 INT4"),
    "INT4_AWQ_CFG": ("int4-w4a16", "AWQ is not implemented; use int4-w4a16 or int4-w4a16-mse"),
    "nvfp4_awq": ("nvfp4", "AWQ is not implemented; nvfp4 is NVFP4 W4A4 with max calibration"),
    "W8A16": ("int8-w8a16", "llm-compressor's W8A16 uses groups of 128; our int8-w8a16 is per output channel"),
    "W4A16_ASYM": ("int4-w4a16", "asymmetric (zero-point) INT4 is not implemented; int4-w4a16 is symmetric"),
    "MXFP8": ("mxfp8-w8a8", _BOTH_MX),
    "MXFP8_DEFAULT_CFG": ("mxfp8-w8a8", _MODELOPT_MX),
    "MXFP4": ("mxfp4-w4a4", _BOTH_MX),
    "MXFP4_DEFAULT_CFG": ("mxfp4-w4a4", _MODELOPT_MX),
    "MXFP8A16": ("mxfp8-w8a16", _LLMC_MX),
    "MXFP4A16": ("mxfp4-w4a16", _LLMC_MX),
}


def _key(name: str) -> str:
    return name.strip().lower().replace("-", "_")


def _alias_table() -> dict[str, tuple[str, str]]:
    table = {}
    for ours, tools in EQUIVALENTS.items():
        for tool, names in tools.items():
            for n in names:
                table[_key(n)] = (ours, tool)
    return table


def resolve_alias(name: str, known: list[str]) -> str | None:
    """Our recipe name for `name` (ours or an equivalent's), None if unknown; ValueError for a near miss."""
    if name in known:
        return name
    hit = _alias_table().get(_key(name))
    if hit is not None and hit[0] in known:
        return hit[0]
    miss = {_key(k): v for k, v in NEAR_MISSES.items()}.get(_key(name))
    if miss is not None and miss[0] in known:
        raise ValueError(f"recipe {name!r} has no exact equivalent here: {miss[1]}; pass --recipe {miss[0]} if "
                         f"that is what you want (`dist-export recipes` lists all)")
    return None


def equivalents_of(recipe: str) -> dict[str, tuple[str, ...]]:
    return EQUIVALENTS.get(recipe, {"modelopt": (), "llm-compressor": ()})


def recipes_listing(recipes: dict[str, str]) -> list[str]:
    """`dist-export recipes`: one block per recipe of ours (`{name: description}`): name, description, the
    ModelOpt and llm-compressor names it answers to; then the near misses and what to pass instead."""
    lines = []
    for name, description in sorted(recipes.items()):
        eq = equivalents_of(name)
        lines.append(f"{name}")
        lines.append(f"    {description}")
        lines.append(f"    ModelOpt: {', '.join(eq['modelopt']) or '-'}   llm-compressor: "
                     f"{', '.join(eq['llm-compressor']) or '-'}")
    near = [(k, v) for k, v in NEAR_MISSES.items() if v[0] in recipes]
    if near:
        lines.append("")
        lines.append("names of other tools with different semantics (refused; closest recipe here):")
        lines += [f"    {k:<36} -> {ours}" for k, (ours, _) in near]
    return lines


def packaged_recipes() -> dict:
    """{name: resource} of the recipes shipped inside the package (`dist_export/configs/*.yaml`), read through
    `importlib.resources` so they are found from a wheel as from a checkout (torch-free, for `--help`)."""
    folder = resources.files("dist_export") / "configs"
    return {p.name[:-5]: p for p in folder.iterdir() if p.name.endswith(".yaml")}


def available_recipes() -> list[str]:
    return sorted(packaged_recipes())

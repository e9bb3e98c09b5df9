"""`--format modelopt`: ModelOpt's Hugging Face real-quant layout, as ModelOpt 0.47 and current vLLM read it.

Stage and rank: `check_items`/`outputs` at planning on every rank (metadata only), `produce` on the rank that
owns the item, `update_config`/`extra_files` on rank 0 at commit.

| quant_algo                | recipes       | weight          | weight_scale              | others                       |
| FP8                       | fp8           | F8_E4M3 [N, K]  | F32 [] (exact fold `inv`) | input_scale F32 [] = act_amax / 448 |
| FP8_PER_CHANNEL_PER_TOKEN | fp8-pc-pt     | F8_E4M3 [N, K]  | F32 [N] (exact fold `inv`)| none (activations per token at run time) |
| NVFP4                     | nvfp4(-mse)   | U8 [N, K/2]     | F8_E4M3 [N, ceil(K/16)]   | weight_scale_2 F32 [] = amax/2688; input_scale F32 [] = act_amax/2688 |
| W4A16_NVFP4               | nvfp4-w4a16   | U8 [N, K/2]     | F8_E4M3 [N, ceil(K/16)]   | weight_scale_2 F32 []        |

Stored scales are exactly the multipliers of the fake-quant fold, so dequantization equals the `vllm-fq`
export bit for bit. vLLM fuses q/k/v and gate/up: their input scales are one value per fused group (max), and
NVFP4 `weight_scale_2` agree because the recipe shares the weight amax over those groups. KV cache (recipe
`kv_cache: fp8`): `<attention>.k_proj.k_scale` / `.v_proj.v_scale` F32 [] = calibrated K / V amax (after RoPE)
/ 448, `kv_cache_quant_algo: FP8` in hf_quant_config.json, `kv_cache_scheme` in config.json.

Config, in the two places ModelOpt writes it: `hf_quant_config.json` holds ModelOpt's own record
(`{"producer", "quantization": {"quant_algo", "kv_cache_quant_algo", "group_size", "exclude_modules",
["quantized_layers"]}}`); `config.json["quantization_config"]` holds the llm-compressor-aligned form ModelOpt
converts it to and vLLM reads (`quant_method: modelopt`, `quant_algo`, `config_groups`, `ignore`, `producer`,
`kv_cache_scheme` when the KV cache is quantized).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Callable

from ..version import __version__
from ..layout import HF_QUANT_CONFIG_NAME
from ..numerics import quantize
from ..numerics.constants import F8E4M3_MAX, NVFP4_GLOBAL_DIVISOR
from ..plan import OutSpec
from . import OutputFormat, positive_finite, refuse_expert_stacks, register_output_format, unquantized_linear_modules

NVFP4_GROUP = 16
_FP8_ARGS = {"dynamic": False, "num_bits": 8, "type": "float"}
_NVFP4_ARGS = {"dynamic": False, "num_bits": 4, "type": "float", "group_size": NVFP4_GROUP}


@dataclass(frozen=True)
class Algo:
    """One ModelOpt quant_algo: its tensors, their values and its config-group description."""

    name: str
    outputs: Callable  # (Item) -> list[OutSpec] (the weight's own entry excluded)
    scales: Callable  # (Item, quantize() result, input_amax, device) -> list[(suffix, tensor)]
    group: dict  # config_groups entry without targets
    group_size: int | None = None


def _fp8_input(input_amax, device):
    return (input_amax.float() / F8E4M3_MAX).reshape(()).to(device)


def _nvfp4_input(input_amax, device):
    return (input_amax.float() / NVFP4_GLOBAL_DIVISOR).reshape(()).to(device)


ALGOS = {
    # (weight fmt, weight granularity, input (fmt, granularity, dynamic) or None) -> algo
    ("fp8", "tensor", ("fp8", "tensor", False)): Algo(
        "FP8",
        lambda i: [("weight_scale", "F32", ()), ("input_scale", "F32", ())],
        lambda i, t, a, d: [("weight_scale", t["scale_inv"].reshape(())), ("input_scale", _fp8_input(a, d))],
        {"input_activations": _FP8_ARGS, "weights": _FP8_ARGS}),
    ("fp8", "channel", ("fp8", "token", True)): Algo(
        "FP8_PER_CHANNEL_PER_TOKEN",
        lambda i: [("weight_scale", "F32", (i.meta.shape[0],))],
        lambda i, t, a, d: [("weight_scale", t["scale_inv"].reshape(-1))],
        # ModelOpt 0.47's own config group for this algo (convert_hf_config), static flag included
        {"input_activations": _FP8_ARGS, "weights": {**_FP8_ARGS, "strategy": "channel"}}),
    ("nvfp4", "group", ("nvfp4", "group", False)): Algo(
        "NVFP4",
        lambda i: [("weight_scale", "F8_E4M3", (i.meta.shape[0], -(-i.meta.shape[1] // NVFP4_GROUP))),
                   ("weight_scale_2", "F32", ()), ("input_scale", "F32", ())],
        lambda i, t, a, d: [("weight_scale", t["weight_scale"]), ("weight_scale_2", t["weight_scale_2"]),
                            ("input_scale", _nvfp4_input(a, d))],
        {"input_activations": _NVFP4_ARGS, "weights": _NVFP4_ARGS}, NVFP4_GROUP),
    ("nvfp4", "group", None): Algo(
        "W4A16_NVFP4",
        lambda i: [("weight_scale", "F8_E4M3", (i.meta.shape[0], -(-i.meta.shape[1] // NVFP4_GROUP))),
                   ("weight_scale_2", "F32", ())],
        lambda i, t, a, d: [("weight_scale", t["weight_scale"]), ("weight_scale_2", t["weight_scale_2"])],
        {"weights": _NVFP4_ARGS}, NVFP4_GROUP),
}


def algo_for(item) -> Algo:
    w, i = item.weight, item.input
    algo = ALGOS.get((w.fmt, w.granularity, None if i is None else (i.fmt, i.granularity, i.dynamic)))
    if algo is None:
        raise ValueError(
            f"--format modelopt stores FP8 per tensor with static FP8 inputs, FP8 per channel with dynamic per-token "
            f"inputs, and NVFP4 weights with static NVFP4 or 16-bit inputs; {item.module} has weight "
            f"{w.fmt}/{w.granularity} and input {i}: use the fp8, fp8-pc-pt, nvfp4 or nvfp4-w4a16 recipe, "
            f"--format compressed-tensors or --format vllm-fq"
        )
    return algo


def quant_algo(item) -> str:
    return algo_for(item).name


class ModelOptHF(OutputFormat):
    name = "modelopt"
    file_names = (HF_QUANT_CONFIG_NAME,)
    carries_kv_cache = True

    # KV cache as ModelOpt exports it: `<attention>.k_proj.k_scale` / `.v_proj.v_scale` F32 [] = amax / 448
    # (its postprocess_state_dict of k_bmm_quantizer._amax); vLLM maps them onto the attention layer.
    def kv_outputs(self, item):
        return [OutSpec(f"{item.module}.{item.kv.rsplit('.', 1)[1][0]}_scale", "F32", ())]

    def kv_tensors(self, item, kv_amax):
        return [(f"{item.module}.{item.kv.rsplit('.', 1)[1][0]}_scale", (kv_amax / F8E4M3_MAX).reshape(()))]

    def load_hint(self, out_dir: str) -> str:
        return (f"vllm serve {out_dir} (vLLM reads quant_method modelopt from config.json), or TensorRT-LLM")

    def check_items(self, items, recipe):
        refuse_expert_stacks(items, self.name)
        for item in items:
            if item.quantized:
                algo_for(item)

    def outputs(self, item):
        if not item.quantized:
            return super().outputs(item)
        n, k = item.meta.shape
        weight = OutSpec(item.name, "F8_E4M3", (n, k)) if item.weight.fmt == "fp8" else \
            OutSpec(item.name, "U8", (n, k // 2))
        return [weight] + [OutSpec(f"{item.module}.{s}", dt, shape) for s, dt, shape in algo_for(item).outputs(item)]

    def produce(self, item, w, amax, block_amax, input_amax):
        if not item.quantized:
            return [(item.name, w)]
        t = quantize(w, item.weight, amax, block_amax, name=item.name)
        scales = algo_for(item).scales(item, t, input_amax, w.device)
        return [(item.name, t["qdata"])] + [(f"{item.module}.{s}", v) for s, v in scales]

    def _algos(self, plan) -> dict[str, Algo]:
        return {i.module: algo_for(i) for i in plan.items.values() if i.quantized}

    def _quantization(self, plan) -> dict:
        """ModelOpt's own record (hf_quant_config.json["quantization"])."""
        algos = self._algos(plan)
        kinds = {a.name: a for a in algos.values()}
        q: dict = {"quant_algo": next(iter(kinds)) if len(kinds) == 1 else "MIXED_PRECISION",
                   "kv_cache_quant_algo": "FP8" if plan_kv_cache(plan) else None}
        sizes = {a.group_size for a in kinds.values()} - {None}
        if len(sizes) == 1:
            q["group_size"] = sizes.pop()
        q["exclude_modules"] = unquantized_linear_modules(plan)
        if len(kinds) > 1:
            q["quantized_layers"] = {m: _layer_entry(a) for m, a in sorted(algos.items())}
        return q

    def _config_groups(self, plan) -> dict:
        algos = self._algos(plan)
        names = list(dict.fromkeys(a.name for a in algos.values()))
        if len(names) == 1:
            return {"group_0": {**next(iter(algos.values())).group, "targets": ["Linear"]}}
        by_name = {a.name: a for a in algos.values()}
        return {f"group_{k}": {**by_name[n].group, "targets": sorted(m for m, a in algos.items() if a.name == n)}
                for k, n in enumerate(names)}

    def update_config(self, config, plan, recipe):
        q = self._quantization(plan)
        qc = {"quant_method": "modelopt", "quant_algo": q["quant_algo"], "config_groups": self._config_groups(plan),
              "ignore": q["exclude_modules"], "producer": _producer()}
        if "group_size" in q:
            qc["group_size"] = q["group_size"]  # vLLM reads it from here for NVFP4
        if "quantized_layers" in q:
            qc["quantized_layers"] = q["quantized_layers"]
        if q["kv_cache_quant_algo"] == "FP8":  # ModelOpt 0.47's convert_hf_quant_config_format, as vLLM reads it
            qc["kv_cache_scheme"] = {"dynamic": False, "num_bits": 8, "type": "float"}
        config = dict(config)
        config["quantization_config"] = qc
        return config

    def extra_files(self, plan, recipe, calib):
        hf = {"producer": _producer(), "quantization": self._quantization(plan)}
        return {HF_QUANT_CONFIG_NAME: (json.dumps(hf, indent=2, sort_keys=True) + "\n").encode()}

    def check_folder(self, out_dir, metas, config, rep):
        """`quant_method: modelopt`: scales finite and positive, `weight_scale_2`/`input_scale` F32 scalars, an
        F8_E4M3 `weight_scale` on the group grid of its packed NVFP4 weight."""
        if (config.get("quantization_config") or {}).get("quant_method") != "modelopt":
            return
        for name, m in metas.items():
            if name.endswith((".weight_scale", ".weight_scale_2", ".input_scale")):
                positive_finite(out_dir, m, rep)
            if name.endswith(".weight_scale_2") or name.endswith(".input_scale"):
                if m.dtype != "F32" or m.shape != ():
                    rep.defect(f"{name}: {m.dtype}{list(m.shape)}, expected F32[]")
            if name.endswith(".weight_scale") and m.dtype == "F8_E4M3":
                w = metas.get(name[: -len("_scale")])
                if w is None or w.dtype != "U8" or m.shape != (w.shape[0], -(-(w.shape[1] * 2) // NVFP4_GROUP)):
                    rep.defect(f"{name}: shape {list(m.shape)} does not fit the packed NVFP4 weight")


def plan_kv_cache(plan) -> bool:
    return any(i.kv for i in plan.items.values())


def _layer_entry(algo: Algo) -> dict:
    return {"quant_algo": algo.name} if algo.group_size is None else {"quant_algo": algo.name,
                                                                      "group_size": algo.group_size}


def _producer() -> dict:
    return {"name": "dist_export", "version": __version__}


register_output_format(ModelOptHF())

"""The closing report of an export (rank 0, after commit and verify; pure functions of the plan and the summary).

What a user needs to read once the bar is gone: what was quantized (modules per weight/input quantizer), what was
kept in the source dtype and why (the recipe pattern that excluded it, or "not a weight" for norms, biases and
other tensors that are always copied), where the export went, how large it is against the source, how fast it
ran, and how to load it. `quantization_summary` is the JSON form (in the run summary, `--summary-json`);
`format_report` the text that rank 0 logs as the last thing of the run.
"""
from __future__ import annotations

from .recipe import DEFAULT_EXCLUDE


def describe_weight(spec) -> str:
    """`QuantSpec` -> e.g. "fp8 block 128x128", "int4 group 128 mse", "nvfp4 group 16"."""
    if spec.granularity == "block":
        text = f"{spec.fmt} block {spec.block_size}x{spec.block_size}"
    elif spec.granularity == "group":
        text = f"{spec.fmt} group {spec.block_size}"
    else:
        text = f"{spec.fmt} per {spec.granularity}"
    if spec.scale_search == "mse":
        text += f" mse({spec.mse_candidates})"
    return text


def describe_input(spec) -> str:
    """`InputSpec` or None -> e.g. "fp8 dynamic per token", "fp8 static per tensor", "16-bit"."""
    if spec is None:
        return "16-bit"
    kind = "dynamic" if spec.dynamic else "static"
    where = f"group {spec.block_size}" if spec.granularity == "group" else f"per {spec.granularity}"
    return f"{spec.fmt} {kind} {where}"


def quantization_summary(plan, recipe) -> dict:
    """{"quantized": [{"weights", "inputs", "modules", "tensors", "example"}], "excluded": [{"pattern", "why",
    "modules", "example"}], "copied_tensors": n, "kv_cache": {"format", "attention_layers"}}: every item of the
    plan is counted exactly once."""
    quantized: dict[tuple[str, str], list[str]] = {}
    for item in plan.items.values():
        if item.quantized:
            key = (describe_weight(item.weight), describe_input(item.input))
            quantized.setdefault(key, []).append(item.module)
    by_pattern: dict[str, list[str]] = {}
    for module, pattern in plan.excluded:
        by_pattern.setdefault(pattern, []).append(module)
    defaults = set(DEFAULT_EXCLUDE) if recipe.default_exclude else set()
    excluded = [{"pattern": p, "why": "default exclusion" if p in defaults else f"recipe {recipe.name!r} excludes it",
                 "modules": len(set(ms)), "example": ms[0]} for p, ms in sorted(by_pattern.items())]
    rows = [{"weights": w, "inputs": i, "modules": len(set(ms)), "tensors": len(ms), "example": ms[0]}
            for (w, i), ms in sorted(quantized.items())]
    excluded_weights = len(plan.excluded)
    copied = sum(1 for i in plan.items.values() if not i.quantized) - excluded_weights
    kv_layers = sum(1 for i in plan.items.values() if i.kv) // 2  # a K and a V quantizer per attention layer
    return {"quantized": rows, "excluded": excluded, "copied_tensors": copied,
            "kv_cache": {"format": recipe.kv_cache or "none", "attention_layers": kv_layers}}


def _size(n: float) -> str:
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1000.0
    return f"{n:.2f} TB"


def format_report(summary: dict, quant: dict, *, model: str, recipe: str, format_name: str, load_hint: str,
                  world_size: int, verify_line: str | None) -> str:
    """The closing report: a few lines, the table, and the load hint."""
    src, out = summary["source_bytes"], summary["output_bytes"]
    ratio = f"{out / src:.2f}x the source" if src else "source size unknown"
    lines = [f"exported {model} -> {summary['out_dir']}  (recipe {recipe}, --format {format_name})",
             f"  {summary['wall_seconds']:.1f} s on {world_size} rank{'s' if world_size != 1 else ''}, "
             f"{_size(summary['gb_per_s'] * 1e9)}/s written; {_size(out)} out from {_size(src)} in ({ratio})"]
    if summary.get("reused_shards"):
        lines.append(f"  {summary['reused_shards']} shard(s) reused from the interrupted run (--resume)")
    if verify_line:
        lines.append(f"  {verify_line}")
    n_quant = sum(r["modules"] for r in quant["quantized"])
    lines.append(f"  quantized: {n_quant} modules")
    width = max([len(f"{r['weights']} / {r['inputs']}") for r in quant["quantized"]] + [10])
    for r in quant["quantized"]:
        label = f"{r['weights']} / {r['inputs']}"
        lines.append(f"    {label:<{width}}  {r['modules']:>5}  e.g. {r['example']}")
    n_excl = sum(r["modules"] for r in quant["excluded"])
    lines.append(f"  kept in the source dtype: {n_excl} excluded weight(s), {quant['copied_tensors']} other tensors "
                 f"(norms, biases) copied")
    width = max([len(r["pattern"]) for r in quant["excluded"]] + [10])
    for r in quant["excluded"]:
        lines.append(f"    {r['pattern']:<{width}}  {r['modules']:>5}  {r['why']}; e.g. {r['example']}")
    kv = quant.get("kv_cache") or {}
    if kv.get("format", "none") != "none":
        lines.append(f"  KV cache: {kv['format']}, static K/V scales for {kv['attention_layers']} attention layers")
    lines.append(f"  load it: {load_hint}")
    return "\n".join(lines)

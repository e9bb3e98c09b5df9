"""`dist-export calibrate`: max calibration of activation (input) amax for every quantized Linear.

The model is loaded with transformers (CPU, one GPU, or `device_map="auto"`), forward hooks record max|x| at
the input of each Linear the recipe quantizes, and the result is written in checkpoint key space. Fused
in-memory experts (transformers 5 `*Experts` modules holding 3-D `gate_up_proj`/`down_proj`) are observed per
expert by replaying the routing inside a wrapper. Experts that no calibration token reached get the layer's
max over routed experts (explicit and logged: serving engines apply one input scale per fused MoE layer).
With recipe.kv_cache the model runs a registered attention function that records max|key| and max|value| of
each attention layer as the attention receives them (after RoPE and any k_norm: what the engine's KV cache
stores) and then runs transformers' SDPA attention unchanged.
"""
from __future__ import annotations

import logging
import re

import torch

from .data import CalibrationData, load_samples, random_token_samples
from .file import input_quantizer_name, model_signature, save_calibration
from ..sources.checkpoint import SourceCheckpoint
from ..sources.keymap import checkpoint_keys, expert_slots
from ..plan import classify_tensors, kv_cache_quantizers

log = logging.getLogger(__name__)
_EXPERT = re.compile(r"^(.*\.experts)\.(\d+)\.(gate_proj|up_proj|w1|w3|down_proj|w2)$")


def calibration_samples(model_dir: str, vocab_size: int, data: str | None, num_samples: int, seq_len: int,
                        seed: int) -> CalibrationData:
    """Samples (token id lists) and the record of how they were chosen (calibration/data.py): a text, JSONL
    (`text` or chat `messages`) file or dataset folder read with the model's tokenizer, or, without `data`,
    seeded random ids, announced as fit for tests only."""
    if data is None:
        log.warning("no --data: calibrating on %d RANDOM token sequences (fine for tests, not for real scales); "
                    "pass --data FILE.jsonl|FILE.txt|DATASET_FOLDER", num_samples)
        return random_token_samples(vocab_size, num_samples, seq_len, seed)
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(model_dir)
    except Exception as e:  # noqa: BLE001
        raise ValueError(f"--data needs the model's tokenizer, which failed to load from {model_dir}: {e}") from None
    return load_samples(data, tok, num_samples, seq_len)


class _AmaxRecorder:
    def __init__(self):
        self.amax: dict[str, torch.Tensor] = {}

    def observe(self, name: str, x: torch.Tensor) -> None:
        if x.numel() == 0:
            return
        a = x.detach().abs().amax().float().cpu()
        self.amax[name] = torch.maximum(self.amax[name], a) if name in self.amax else a


def _hook_linears(model, targets: dict[str, str], rec: _AmaxRecorder) -> list:
    handles = []
    for name, module in model.named_modules():
        if name in targets and isinstance(module, torch.nn.Linear):
            handles.append(module.register_forward_pre_hook(
                lambda m, args, _q=targets[name]: rec.observe(_q, args[0])))
    return handles


def _hook_fused_experts(model, expert_modules: dict[str, dict[int, dict[str, str]]], rec: _AmaxRecorder) -> list:
    """Wrap each fused experts module so its forward also records per-expert input amax."""
    handles = []
    for prefix, experts in expert_modules.items():
        module = model.get_submodule(prefix)
        if not hasattr(module, "gate_up_proj"):
            continue

        def hook(mod, args, kwargs, _experts=experts):
            hidden = args[0]
            index = args[1] if len(args) > 1 else kwargs.get("top_k_index", kwargs.get("router_indices"))
            hidden = hidden.reshape(-1, hidden.shape[-1])
            index = index.reshape(hidden.shape[0], -1)
            stack = _experts.get(-1)  # one quantizer for a whole stack: observe every expert into it
            for e in range(mod.gate_up_proj.shape[0]):
                names = stack or _experts.get(e)
                rows = (index == e).any(dim=-1)
                if names is None or not rows.any():
                    continue
                x = hidden[rows]
                for role in ("gate", "up"):
                    if role in names:
                        rec.observe(names[role], x)
                down = names.get("down")
                if down:
                    rec.observe(down, _expert_hidden(mod, e, x))

        handles.append(module.register_forward_pre_hook(hook, with_kwargs=True))
    return handles


KV_OBSERVER = "dist_export_kv_observer"  # the attention implementation name calibration registers


class _KvObserver:
    """Attention function (transformers' AttentionInterface) recording K/V amax per attention module."""

    def __init__(self, rec: _AmaxRecorder):
        self.rec = rec
        self.names: dict[int, tuple[str, str]] = {}  # id(attention module) -> (k quantizer, v quantizer)

    def __call__(self, module, query, key, value, attention_mask, **kwargs):
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        names = self.names.get(id(module))
        if names is not None:
            self.rec.observe(names[0], key)
            self.rec.observe(names[1], value)
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


def _register_kv_observer(observer: _KvObserver) -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(KV_OBSERVER, observer)
    AttentionMaskInterface.register(KV_OBSERVER, sdpa_mask)


def _kv_attention_modules(model, kv_targets: set[str]) -> dict[str, tuple[str, str]]:
    """{memory attention module path: (k quantizer, v quantizer)} for the checkpoint-space K/V targets."""
    meta_state = {k: torch.empty(v.shape, dtype=v.dtype, device="meta") for k, v in model.state_dict().items()}
    found = {}
    for key, names in checkpoint_keys(model, meta_state).items():
        if key.endswith(".k_proj.weight") and len(names) == 1:
            attention = names[0][: -len(".k_proj.weight")]
            k, v = f"{attention}.k_bmm_quantizer", f"{attention}.v_bmm_quantizer"
            if k in kv_targets and v in kv_targets:
                found[key[: -len(".k_proj.weight")]] = (k, v)
    return found


def calibrate(model_dir: str, recipe, out: str, data: str | None = None, num_samples: int = 16, seq_len: int = 128,
              seed: int = 0, device_map: str | None = None, trust_remote_code: bool = False) -> dict:
    from transformers import AutoModelForCausalLM

    from ..recipe import Recipe, load_recipe
    from ..sources.hub import resolve_model

    model_dir = resolve_model(model_dir).path if isinstance(model_dir, str) else model_dir
    recipe = recipe if isinstance(recipe, Recipe) else load_recipe(recipe)
    source = SourceCheckpoint(model_dir)
    items, _ = classify_tensors(source.tensors, recipe)
    targets = [i.module for i in items if i.quantized and i.input is not None and i.input.needs_calibration]
    kv_targets = kv_cache_quantizers(items)
    if not targets and not kv_targets:
        raise ValueError(f"recipe {recipe.name!r} has no static input quantizers; it needs no calibration")
    rec = _AmaxRecorder()
    observer = _KvObserver(rec)
    extra = {}
    if kv_targets:
        _register_kv_observer(observer)
        extra["attn_implementation"] = KV_OBSERVER
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype="auto", device_map=device_map,
                                                 trust_remote_code=trust_remote_code, **extra)
    model.eval()
    chosen = calibration_samples(model_dir, model.config.vocab_size, data, num_samples, seq_len, seed)
    if kv_targets:
        paths = _kv_attention_modules(model, set(kv_targets))
        observer.names = {id(model.get_submodule(p)): names for p, names in paths.items()}
    plain, expert_modules = _memory_targets(model, set(targets))
    handles = _hook_linears(model, plain, rec) + _hook_fused_experts(model, expert_modules, rec)
    device = next(model.parameters()).device
    try:
        with torch.no_grad():
            for ids in chosen.samples:
                model(torch.tensor([ids], dtype=torch.long, device=device))
    finally:
        for h in handles:
            h.remove()
    _fill_unrouted_experts(targets, rec)
    missing = [m for m in targets if input_quantizer_name(m) not in rec.amax]
    if missing:
        raise RuntimeError(f"calibration saw no input for {len(missing)} modules, e.g. {missing[0]!r}; "
                           f"they are not Linear modules of the loaded model")
    missing_kv = [q for q in kv_targets if q not in rec.amax]
    if missing_kv:
        raise RuntimeError(f"calibration saw no key/value states for {len(missing_kv)} KV quantizers, e.g. "
                           f"{missing_kv[0]!r}: that attention does not run through transformers' attention "
                           f"interface, so recipe kv_cache is not supported for this model")
    save_calibration(out, rec.amax, recipe, model_signature(source.tensors), data=chosen.record)
    log.info("calibrated %d input quantizers on %d samples (%s) -> %s", len(rec.amax), len(chosen.samples),
             chosen.record.get("kind"), out)
    return rec.amax


def _expert_hidden(mod, e: int, x: torch.Tensor) -> torch.Tensor:
    """Input of expert e's down projection, recomputed as the experts module computes it."""
    if hasattr(mod, "gate_up_proj_bias"):  # GPT-OSS: x @ W[e] + b[e], interleaved gating
        return mod._apply_gate(x @ mod.gate_up_proj[e] + mod.gate_up_proj_bias[e])
    gate, up = torch.nn.functional.linear(x, mod.gate_up_proj[e]).chunk(2, dim=-1)
    return mod.act_fn(gate) * up


def _memory_targets(model, targets: set[str]):
    """Checkpoint-space target modules -> ({memory Linear path: quantizer name},
    {memory fused-experts path: {expert: {role: quantizer name}}})."""
    meta_state = {k: torch.empty(v.shape, dtype=v.dtype, device="meta") for k, v in model.state_dict().items()}
    plain: dict[str, str] = {}
    experts: dict[str, dict[int, dict[str, str]]] = {}
    for key, names in checkpoint_keys(model, meta_state).items():
        if names == [key] and key in targets and meta_state[key].dim() == 3:  # a stack kept whole (GPT-OSS)
            prefix, proj = key.rsplit(".", 1)
            role = "down" if proj == "down_proj" else "gate"
            experts.setdefault(prefix, {}).setdefault(-1, {})[role] = input_quantizer_name(key)
            continue
        modules = [n[: -len(".weight")] for n in names if n.endswith(".weight")]
        hit = [m for m in modules if m in targets]
        if not hit:
            continue
        if len(names) == 1 and key.endswith(".weight"):
            plain[key[: -len(".weight")]] = input_quantizer_name(hit[0])
            continue
        prefix = key.rsplit(".", 1)[0]
        for (e, role), name in expert_slots(names).items():
            module = name[: -len(".weight")]
            if module in targets:
                experts.setdefault(prefix, {}).setdefault(e, {})[role] = input_quantizer_name(module)
    return plain, experts


def _fill_unrouted_experts(targets: list[str], rec: _AmaxRecorder) -> None:
    by_layer: dict[tuple[str, str], list[str]] = {}
    for m in targets:
        hit = _EXPERT.match(m)
        if hit:
            by_layer.setdefault((hit.group(1), hit.group(3)), []).append(input_quantizer_name(m))
    for (prefix, proj), names in by_layer.items():
        seen = [rec.amax[n] for n in names if n in rec.amax]
        unseen = [n for n in names if n not in rec.amax]
        if unseen and seen:
            fill = torch.stack(seen).amax()
            for n in unseen:
                rec.amax[n] = fill.clone()
            log.warning("%s.*.%s: %d experts got no calibration tokens; their input amax is the layer max %.4g",
                        prefix, proj, len(unseen), float(fill))

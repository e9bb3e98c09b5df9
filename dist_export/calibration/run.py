"""`dist-export calibrate` (every rank; rank 0 writes the file): max calibration of activation (input) amax for
every quantized Linear.

The model is loaded with transformers (each rank's device: its GPU where one exists; or `device_map="auto"` in
one process), or given in memory; forward hooks record max|x| at the input of each Linear the recipe quantizes,
over this rank's slice of the samples (padded positions of a batch excluded), the ranks' amax are reduced with a
max all-reduce, and the result is written in checkpoint key space. Fused
in-memory experts (transformers 5 `*Experts` modules holding 3-D `gate_up_proj`/`down_proj`) are observed per
expert by replaying the routing inside a wrapper. Experts that no calibration token reached get the layer's
max over routed experts (explicit and logged: serving engines apply one input scale per fused MoE layer).
A heartbeat (`runtime/monitor.py`) runs for the whole calibration: every observed input and every batch counts as
progress (so a long calibration is never taken for a hung rank; the model load and the data choice are one long
call each, exempt from that judgement), a dead or hung peer ends every rank in one line, and rank 0 shows the
job-wide tokens and batches (a bar on a terminal, a line every 30 s elsewhere).
With recipe.kv_cache the model runs a registered attention function that records max|key| and max|value| of
each attention layer as the attention receives them (after RoPE and any k_norm: what the engine's KV cache
stores) and then runs transformers' SDPA attention unchanged.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import re

import torch

from .data import CalibrationData, batches, load_samples, random_token_samples, rank_slice
from ..storage.header import model_signature
from .file import input_quantizer_name, save_calibration
from ..sources.checkpoint import SourceCheckpoint
from ..sources.keymap import checkpoint_keys, expert_slots
from ..options import DEFAULTS, check_kv_cache_choice, check_timeouts
from ..runtime.progress import NO_PROGRESS, calibration_progress
from ..plan import classify_tensors, kv_cache_quantizers

log = logging.getLogger(__name__)
_EXPERT = re.compile(r"^(.*\.experts)\.(\d+)\.(gate_proj|up_proj|w1|w3|down_proj|w2)$")


def check_data_choice(data, random_tokens) -> None:
    """Calibration data is always chosen explicitly: `data` (a file or folder) or `random_tokens=True` (tests),
    exactly one of them (the CLI's required `--data | --random-tokens`)."""
    if not isinstance(random_tokens, bool):
        raise ValueError(f"random_tokens must be True or False, got {random_tokens!r}")
    if data is None and not random_tokens:
        raise ValueError("calibration needs data: pass data=FILE.jsonl|FILE.txt|DATASET_FOLDER (--data), or "
                         "random_tokens=True (--random-tokens) for tests only: random tokens give useless scales")
    if data is not None and random_tokens:
        raise ValueError("pass data (--data) or random_tokens (--random-tokens), not both")
    if data is not None and not isinstance(data, (str, os.PathLike)):
        raise ValueError(f"data must be the path of a .txt/.jsonl/.json file or a dataset folder, got "
                         f"{type(data).__name__}")


def calibration_samples(model_dir: str | None, vocab_size: int, data: str | None, num_samples: int, seq_len: int,
                        seed: int, tokenizer=None, announce: bool = True) -> CalibrationData:
    """Samples (token id lists) and the record of how they were chosen (calibration/data.py): a text, JSONL
    (`text` or chat `messages`) file or dataset folder read with the model's tokenizer (`tokenizer`, else the one
    in `model_dir`), or, for `data` None (random tokens asked for: `check_data_choice`), seeded random ids,
    announced as fit for tests only."""
    if data is None:
        if announce:
            log.warning("--random-tokens: calibrating on %d RANDOM token sequences (fine for tests, useless scales "
                        "for real use: pass --data FILE.jsonl|FILE.txt|DATASET_FOLDER)", num_samples)
        return random_token_samples(vocab_size, num_samples, seq_len, seed)
    data = os.fspath(data)
    if tokenizer is None:
        if model_dir is None:
            raise ValueError("--data needs a tokenizer: pass tokenizer= with an in-memory model")
        from transformers import AutoTokenizer

        try:
            tokenizer = AutoTokenizer.from_pretrained(model_dir)
        except Exception as e:  # noqa: BLE001
            raise ValueError(f"--data needs the model's tokenizer, which failed to load from {model_dir}: "
                             f"{e}") from None
    return load_samples(data, tokenizer, num_samples, seq_len)


class _AmaxRecorder:
    """max|x| per input quantizer; `mask` ([B, T], set per batch) keeps padded positions out. Every observation
    ticks `progress` (the heartbeat's step counter: a rank inside a long forward still moves)."""

    def __init__(self, progress=NO_PROGRESS):
        self.amax: dict[str, torch.Tensor] = {}
        self.mask: torch.Tensor | None = None
        self.progress = progress

    def rows(self, x: torch.Tensor) -> torch.Tensor:
        """x without its padded tokens: [B, T, ...] by the mask, or flattened [B*T, ...] rows."""
        m = self.mask
        if m is None or bool(m.all()):
            return x
        if x.dim() >= 2 and tuple(x.shape[:2]) == tuple(m.shape):
            return x[m.to(x.device, torch.bool)]
        if x.shape[0] == m.numel():
            return x[m.reshape(-1).to(x.device, torch.bool)]
        raise RuntimeError(f"cannot tell padded tokens in an input of shape {list(x.shape)} (batch {list(m.shape)});"
                           f" calibrate with --batch-size 1")

    def observe(self, name: str, x: torch.Tensor) -> None:
        self.observe_rows(name, self.rows(x))

    def observe_rows(self, name: str, x: torch.Tensor) -> None:
        self.progress.tick()
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
            if rec.mask is not None and not bool(rec.mask.all()):
                keep = rec.mask.reshape(-1).to(hidden.device, torch.bool)
                hidden, index = hidden[keep], index[keep]
            stack = _experts.get(-1)  # one quantizer for a whole stack: observe every expert into it
            for e in range(mod.gate_up_proj.shape[0]):
                names = stack or _experts.get(e)
                rows = (index == e).any(dim=-1)
                if names is None or not rows.any():
                    continue
                x = hidden[rows]
                for role in ("gate", "up"):
                    if role in names:
                        rec.observe_rows(names[role], x)
                down = names.get("down")
                if down:
                    rec.observe_rows(down, _expert_hidden(mod, e, x))

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
        if names is not None:  # [B, heads, T, d] -> [B, T, heads, d]: the batch mask applies to dims 0, 1
            self.rec.observe(names[0], key.transpose(1, 2))
            self.rec.observe(names[1], value.transpose(1, 2))
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


def calibrate(model, recipe, out: str | None = None, data: str | None = None, num_samples: int = 16,
              seq_len: int = 128, seed: int = 0, device_map: str | None = None, trust_remote_code: bool = False, *,
              random_tokens: bool = False, batch_size: int = 1, revision: str | None = None, tokenizer=None,
              device: str | None = None, ctx=None, kv_cache: str | None = None,
              hang_timeout: float = DEFAULTS.hang_timeout,
              dead_timeout: float = DEFAULTS.dead_timeout) -> dict[str, torch.Tensor]:
    """Max-calibrate the input amax of every static input quantizer of `recipe`; returns {quantizer: 0-d amax}
    on every rank, and rank 0 writes `out` (when given).

    The samples come from `data` (a .txt, .jsonl or .json file or a dataset folder, read with the model's
    tokenizer) or, for tests only, from `random_tokens=True` (seeded random ids, `seed`); exactly one of the two,
    as the CLI's `--data | --random-tokens` (nothing is chosen silently).

    `model`: a folder, Hub id or `synthetic:...` (loaded with transformers on each rank's device, or with
    `device_map` in a single process), or an in-memory transformers model (used as it is, never changed; hooks
    are removed afterwards). Under a launcher every rank takes its slice of the samples (samples r, r+W, ...),
    and the amax are reduced with a max all-reduce: max is exact, so the result equals one process calibrating
    every sample, bit for bit, wherever each sample's activations do not depend on its batch (`batch_size` 1,
    or the same batches; padded positions are never observed). `ctx`: an existing `DistContext`. `kv_cache`
    (`--kv-cache`): "fp8" also records the K/V amax of every attention layer, "none" does not, None: as the
    recipe says; the file is bound to the recipe with that setting (export with the same `--kv-cache`).
    `hang_timeout` / `dead_timeout`: the heartbeat's, as for export (`DIST_EXPORT_FAULT` fires before a rank's
    n-th batch here).
    """
    from ..runtime.dist import init_distributed
    from ..runtime.faults import fault_from_env

    check_data_choice(data, random_tokens)  # before any process group or model load
    check_kv_cache_choice(kv_cache)
    check_timeouts(hang_timeout, dead_timeout)
    own = ctx is None
    ctx = ctx or init_distributed(device, startup_timeout_s=dead_timeout)
    try:
        with monitored(ctx, hang_timeout, dead_timeout) as progress:
            amax, record, signature, recipe = _calibrate(ctx, model, recipe, data, num_samples, seq_len, seed,
                                                         device_map, trust_remote_code, batch_size, revision,
                                                         tokenizer, kv_cache, progress=progress,
                                                         fault=fault_from_env())
            if out is not None:
                ctx.on_rank0("write calibration", save_calibration, out, amax, recipe, signature, data=record)
        if ctx.is_rank0:
            log.info("calibrated %d input quantizers on %d samples (%s, %d rank%s)%s", len(amax), record["samples"],
                     record.get("kind"), ctx.world_size, "s" if ctx.world_size > 1 else "", f" -> {out}" if out else "")
        return amax
    finally:
        if own:
            ctx.close()


def calibrate_for_export(ctx, model, recipe, path: str, options: dict, hang_timeout: float = DEFAULTS.hang_timeout,
                         dead_timeout: float = DEFAULTS.dead_timeout) -> None:
    """`export(..., calibration={...})`: calibrate on every rank of `ctx` (data-parallel) and write the result to
    `path` on every rank (each rank's own private file, the same bytes everywhere)."""
    o = calibration_options(options)
    with monitored(ctx, hang_timeout, dead_timeout) as progress:
        amax, record, signature, recipe = _calibrate(ctx, model, recipe, o["data"], o["num_samples"], o["seq_len"],
                                                     o["seed"], None, o["trust_remote_code"], o["batch_size"],
                                                     o["revision"], o["tokenizer"], progress=progress)
    save_calibration(path, amax, recipe, signature, data=record)
    if ctx.is_rank0:
        log.info("calibrated %d input quantizers on %d samples (%s, %d rank%s) for this export", len(amax),
                 record["samples"], record.get("kind"), ctx.world_size, "s" if ctx.world_size > 1 else "")


@contextlib.contextmanager
def monitored(ctx, hang_timeout: float, dead_timeout: float):
    """The calibration's heartbeat on every rank (yields its `Progress`): peers dead or hung end the job in one
    line ("calibration aborted: ...; nothing was written"); on rank 0 the job-wide bar, closed at the job's
    totals once every rank is done. Inside a caller's own monitor, counts only."""
    from ..runtime.monitor import start_monitor
    from ..runtime.progress import Progress

    if ctx.monitor is not None:
        yield Progress()
        return
    progress = calibration_progress()
    monitor = start_monitor(ctx, hang_after=hang_timeout, dead_after=dead_timeout, progress=progress,
                            job="calibration", left="nothing was written")
    try:
        yield progress
        progress.close(complete=True)
        monitor.finish()
    finally:
        monitor.stop()
        ctx.monitor = None


CALIBRATION_DEFAULTS = {"data": None, "random_tokens": False, "num_samples": 16, "seq_len": 128, "seed": 0,
                        "batch_size": 1, "tokenizer": None, "trust_remote_code": False, "revision": None}


def calibration_options(options: dict) -> dict:
    """`export(calibration={...})`'s options with their defaults; an unknown key, or no data choice, is one line
    (checked before any process group: `data` or `random_tokens=True`, as for `calibrate`)."""
    unknown = sorted(set(options) - set(CALIBRATION_DEFAULTS))
    if unknown:
        raise TypeError(f"calibration= got unknown key(s) {', '.join(unknown)}; valid: "
                        f"{', '.join(sorted(CALIBRATION_DEFAULTS))}")
    o = {**CALIBRATION_DEFAULTS, **options}
    check_data_choice(o["data"], o["random_tokens"])
    return o


def _calibrate(ctx, model, recipe, data, num_samples, seq_len, seed, device_map, trust_remote_code,
               batch_size, revision, tokenizer, kv_cache=None, *, progress=NO_PROGRESS, fault=None):
    """(amax on every rank, the data record, the model signature, the recipe with `kv_cache` applied)."""
    from ..recipe import Recipe, load_recipe, with_kv_cache

    recipe = with_kv_cache(recipe if isinstance(recipe, Recipe) else load_recipe(recipe), kv_cache)
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"--batch-size must be a positive integer, got {batch_size!r}")
    live = model is not None and not isinstance(model, str)
    if live:
        from ..sources.memory import MemorySource

        model_dir, tensors = None, MemorySource(model).tensors
    else:
        from ..sources.hub import resolve_model

        model_dir = resolve_model(model, revision).path
        tensors = SourceCheckpoint(model_dir).tensors
        if device_map is not None and ctx.is_distributed:
            raise ValueError("--device-map spreads one model over this machine's GPUs; with several ranks each "
                             "rank calibrates its own copy on its own GPU: drop --device-map, or run one process")
    items, _ = classify_tensors(tensors, recipe)
    targets = [i.module for i in items if i.quantized and i.input is not None and i.input.needs_calibration]
    kv_targets = kv_cache_quantizers(items)
    if not targets and not kv_targets:
        raise ValueError(f"recipe {recipe.name!r} has no static input quantizers; it needs no calibration "
                         f"(--kv-cache fp8 would calibrate its KV cache)")
    if kv_targets and live:
        raise ValueError(f"recipe {recipe.name!r} quantizes the KV cache: its calibration loads the model with an "
                         f"observing attention; calibrate the saved folder instead of the in-memory model")
    observer = _KvObserver(None) if kv_targets else None
    with ctx.long_call():
        lm = model if live else ctx.local_step("load model", _load_model, model_dir, device_map, trust_remote_code,
                                               ctx.device, observer)
    if observer is not None:
        paths = _kv_attention_modules(lm, set(kv_targets))
        observer.names = {id(lm.get_submodule(p)): names for p, names in paths.items()}
    with ctx.long_call():
        chosen = ctx.agree("calibration data", lambda: calibration_samples(
            model_dir, lm.config.vocab_size, data, num_samples, seq_len, seed, tokenizer, ctx.is_rank0),
            _samples_digest)
    _set_totals(progress, chosen.samples, ctx.world_size, batch_size)
    mine = rank_slice(chosen.samples, ctx.rank, ctx.world_size)
    pad = _pad_id(tokenizer, lm)
    before = None if fault is None else (lambda i: fault.maybe_fire(ctx.rank, f"calibration batch {i}"))
    local = ctx.local_step("calibrate", observe_samples, lm, targets, mine, batch_size, pad, observer, progress=progress,
                           before_batch=before)
    amax = _max_all_reduce(ctx, local, sorted([input_quantizer_name(m) for m in targets] + list(kv_targets)))
    _fill_unrouted_experts(targets, amax, announce=ctx.is_rank0)  # reduced amax: the same on every rank
    missing = [m for m in targets if input_quantizer_name(m) not in amax]
    if missing:
        raise RuntimeError(f"calibration saw no input for {len(missing)} modules, e.g. {missing[0]!r}; "
                           f"they are not Linear modules of the loaded model")
    missing_kv = [q for q in kv_targets if q not in amax]
    if missing_kv:
        raise RuntimeError(f"calibration saw no key/value states for {len(missing_kv)} KV quantizers, e.g. "
                           f"{missing_kv[0]!r}: that attention does not run through transformers' attention "
                           f"interface, so recipe kv_cache is not supported for this model")
    return amax, chosen.record, model_signature(tensors), recipe


def _load_model(model_dir: str, device_map, trust_remote_code: bool, device, observer=None):
    """The model on this rank's device; with a KV observer, its attention runs through the observer."""
    from transformers import AutoModelForCausalLM

    extra = {}
    if observer is not None:
        _register_kv_observer(observer)
        extra["attn_implementation"] = KV_OBSERVER
    lm = AutoModelForCausalLM.from_pretrained(model_dir, dtype="auto", device_map=device_map,
                                              trust_remote_code=trust_remote_code, **extra)
    if device_map is None and device is not None and device.type != "cpu":
        lm.to(device)  # GPU by default where one exists: this rank's own
    return lm.eval()


def _samples_digest(chosen: CalibrationData) -> str:
    h = hashlib.sha256(json.dumps(chosen.record, sort_keys=True).encode())
    for ids in chosen.samples:
        h.update(json.dumps(ids).encode())
    return h.hexdigest()


def _pad_id(tokenizer, lm) -> int:
    for source in (tokenizer, getattr(lm, "generation_config", None), lm.config):
        for attr in ("pad_token_id", "eos_token_id"):
            value = getattr(source, attr, None) if source is not None else None
            if isinstance(value, list):
                value = value[0] if value else None
            if isinstance(value, int):
                return value
    return 0


def _set_totals(progress, samples: list[list[int]], world_size: int, batch_size: int) -> None:
    """The job's totals: every rank's batches of its slice, every sample's tokens."""
    batches_per_rank = [math.ceil(len(rank_slice(samples, r, world_size)) / batch_size) for r in range(world_size)]
    progress.set_totals(sum(batches_per_rank), sum(len(ids) for ids in samples))


def observe_samples(lm, targets: list[str], samples: list[list[int]], batch_size: int, pad_id: int, observer=None, *,
             progress=NO_PROGRESS, before_batch=None) -> dict:
    """This rank's max|x| per input quantizer (and K/V amax, with `observer`) over its samples (hooks on the model,
    removed afterwards); `progress` advances by each batch and its tokens (padding excluded); `before_batch(i)`
    (fault injection) runs before batch i."""
    rec = _AmaxRecorder(progress)
    if observer is not None:
        observer.rec = rec
    plain, expert_modules = _memory_targets(lm, set(targets))
    handles = _hook_linears(lm, plain, rec) + _hook_fused_experts(lm, expert_modules, rec)
    device = next(lm.parameters()).device
    try:
        with torch.no_grad():
            for i, (ids, mask) in enumerate(batches(samples, batch_size, pad_id)):
                if before_batch is not None:
                    before_batch(i)
                rec.mask = mask if batch_size > 1 else None
                lm(input_ids=ids.to(device), attention_mask=mask.to(device) if batch_size > 1 else None)
                progress.advance(1, int(mask.sum()))
    finally:
        for h in handles:
            h.remove()
    return rec.amax


def _max_all_reduce(ctx, local: dict, names: list[str]) -> dict[str, torch.Tensor]:
    """The job-wide max of every rank's amax (a max all-reduce over `names`, the same list on every rank; a name
    no rank observed stays out)."""
    values = torch.tensor([float(local[n]) if n in local else float("-inf") for n in names], dtype=torch.float32)
    if ctx.is_distributed:
        import torch.distributed as dist

        dist.all_reduce(values, op=dist.ReduceOp.MAX)
    return {n: values[i].clone() for i, n in enumerate(names) if values[i] != float("-inf")}


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


def _fill_unrouted_experts(targets: list[str], amax: dict[str, torch.Tensor], announce: bool = True) -> None:
    by_layer: dict[tuple[str, str], list[str]] = {}
    for m in targets:
        hit = _EXPERT.match(m)
        if hit:
            by_layer.setdefault((hit.group(1), hit.group(3)), []).append(input_quantizer_name(m))
    for (prefix, proj), names in by_layer.items():
        seen = [amax[n] for n in names if n in amax]
        unseen = [n for n in names if n not in amax]
        if unseen and seen:
            fill = torch.stack(seen).amax()
            for n in unseen:
                amax[n] = fill.clone()
            if announce:
                log.warning("%s.*.%s: %d experts got no calibration tokens; their input amax is the layer max %.4g",
                            prefix, proj, len(unseen), float(fill))

"""Recipes: which modules get which weight and input quantizers, loaded from YAML into frozen dataclasses.

A recipe names module-path patterns (fnmatch, in checkpoint key space, without the `.weight` suffix). The first
rule whose pattern matches decides a module's quantizers, so different layers can use different formats
(mixed precision). Default exclusions (lm_head, embeddings, norms, MoE routers) apply unless switched off.
Unknown keys and impossible settings are ValueErrors that name the key and list the valid values.

Loaded on every rank at plan time (the same file gives every rank the same recipe).
"""
from __future__ import annotations

import fnmatch
import hashlib
import json
import logging
import os
from dataclasses import dataclass, field, replace

import yaml

from .numerics import QuantSpec, get_format
from .options import KV_CACHE_FORMATS, check_kv_cache_choice
from .numerics.registry import format_names
from .recipe_names import available_recipes, packaged_recipes  # noqa: F401  (torch-free, re-exported)

log = logging.getLogger(__name__)


DEFAULT_EXCLUDE = (
    "lm_head",
    "*embed_tokens",
    "*embeddings*",
    "*norm",
    "*layernorm",
    "*.mlp.gate",  # Qwen-MoE / DeepSeek router
    "*.block_sparse_moe.gate",  # Mixtral router
    "*.router",  # GPT-OSS router
    "*shared_expert_gate",
)
SHARE_KINDS = ("qkv", "gate_up", "experts")
INPUT_GRANULARITIES = ("tensor", "token", "group")
# A recipe is a few hundred bytes; anchors and aliases may not make it grow past these (a 400-byte YAML of nested
# aliases expands to 10^9 values: it is refused while still a node graph, before any value is built).
MAX_RECIPE_BYTES = 1 << 20
MAX_RECIPE_NODES = 100_000


@dataclass(frozen=True)
class InputSpec:
    """An activation (input) quantizer; vLLM's fake-quant worker applies it, we record its settings and amax.

    dynamic=True: scales are computed at run time (per token, or per group of `block_size`); no calibration.
    dynamic=False: a static per-tensor amax from calibration (NVFP4 keeps dynamic block scales under it).
    """

    fmt: str
    granularity: str = "tensor"
    block_size: int | None = None
    dynamic: bool = False

    def __post_init__(self) -> None:
        valid = activation_formats()
        if self.fmt not in valid:
            raise ValueError(f"input quantizer format {self.fmt!r} is not supported; valid: {valid}")
        fmt = get_format(self.fmt)
        if self.granularity not in INPUT_GRANULARITIES:
            raise ValueError(f"input granularity {self.granularity!r} unknown; valid: {list(INPUT_GRANULARITIES)}")
        if fmt.block_size is not None and (self.granularity, self.block_size) != ("group", fmt.block_size):
            raise ValueError(f"{self.fmt} input quantizers use granularity 'group' with block_size {fmt.block_size}")
        if self.granularity == "group" and not self.block_size:
            raise ValueError("input granularity 'group' needs block_size")
        if self.granularity in ("token", "group") and not fmt.tensor_amax and not self.dynamic:
            raise ValueError(f"input granularity {self.granularity!r} needs dynamic: true (static amax is per tensor)")

    @property
    def needs_calibration(self) -> bool:
        return not self.dynamic


def activation_formats() -> list[str]:
    """The registered numeric formats that can quantize inputs (`NumericFormat.activations`)."""
    return [n for n in format_names() if get_format(n).activations]


def _defaults(fmt_name) -> tuple[str, int | None]:
    """(granularity, block_size) a recipe entry without them gets: the format's own (NVFP4: group of 16)."""
    try:
        fmt = get_format(fmt_name)
    except (ValueError, TypeError):
        return "tensor", None  # the spec refuses the unknown format with the list of valid ones
    return fmt.default_granularity, fmt.block_size


@dataclass(frozen=True)
class Rule:
    match: tuple[str, ...]
    weight: QuantSpec
    input: InputSpec | None = None


@dataclass(frozen=True)
class Recipe:
    name: str
    rules: tuple[Rule, ...]
    exclude: tuple[str, ...] = ()
    default_exclude: bool = True
    share_weight_amax: tuple[str, ...] = ()
    description: str = ""
    source: str = field(default="", compare=False)
    kv_cache: str | None = None  # one of KV_CACHE_FORMATS, or None: the KV cache stays in the model dtype

    @property
    def exclude_patterns(self) -> tuple[str, ...]:
        return (DEFAULT_EXCLUDE if self.default_exclude else ()) + self.exclude

    def excluded_by(self, module: str) -> str | None:
        for pattern in self.exclude_patterns:
            if fnmatch.fnmatchcase(module, pattern):
                return pattern
        return None

    def rule_for(self, module: str) -> Rule | None:
        for rule in self.rules:
            if any(fnmatch.fnmatchcase(module, p) for p in rule.match):
                return rule
        return None

    @property
    def needs_calibration(self) -> bool:
        return self.kv_cache is not None or any(r.input is not None and r.input.needs_calibration
                                                for r in self.rules)

    def to_dict(self) -> dict:
        """The recipe in its YAML schema (round-trips through `recipe_from_dict`)."""

        def weight(w: QuantSpec) -> dict:
            return {"format": w.fmt, "granularity": w.granularity, "block_size": w.block_size,
                    "scale_search": w.scale_search, "mse_candidates": w.mse_candidates}

        def inp(i: InputSpec | None) -> dict | None:
            return None if i is None else {"format": i.fmt, "granularity": i.granularity,
                                           "block_size": i.block_size, "dynamic": i.dynamic}

        d = {"name": self.name, "description": self.description,
             "rules": [{"match": list(r.match), "weight": weight(r.weight), "input": inp(r.input)} for r in self.rules],
             "exclude": list(self.exclude), "default_exclude": self.default_exclude,
             "share_weight_amax": list(self.share_weight_amax)}
        if self.kv_cache is not None:  # absent when unset: recipes without it keep their fingerprints
            d["kv_cache"] = self.kv_cache
        return d

    @property
    def fingerprint(self) -> str:
        return hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True).encode()).hexdigest()[:16]


def _check_keys(where: str, data: dict, valid: tuple[str, ...]) -> None:
    if not isinstance(data, dict):
        raise ValueError(f"{where}: expected a mapping, got {type(data).__name__}")
    unknown = sorted(set(data) - set(valid))
    if unknown:
        raise ValueError(f"{where}: unknown key(s) {unknown}; valid keys: {sorted(valid)}")


def _bool(where: str, key: str, d: dict, default: bool) -> bool:
    """A YAML boolean (true/false, unquoted); the string "false" is not read as true."""
    value = d.get(key, default)
    if not isinstance(value, bool):
        raise ValueError(f"{where}: {key} must be true or false (unquoted), got {value!r}")
    return value


def _positive_int(where: str, key: str, d: dict, default: int | None) -> int | None:
    """A positive integer, or the default when the key is absent or null (`true` is not 1, `128.0` not 128)."""
    value = d.get(key)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{where}: {key} must be a positive integer, got {value!r}")
    return value


def _string(where: str, key: str, d: dict, default: str | None) -> str | None:
    """A string, or the default when the key is absent (a list or a number is refused, not str()'ed)."""
    if key not in d:
        return default
    value = d[key]
    if not isinstance(value, str):
        raise ValueError(f"{where}: {key} must be a string, got {value!r}")
    return value


def _weight_spec(where: str, d: dict) -> QuantSpec:
    _check_keys(where, d, ("format", "granularity", "block_size", "scale_search", "mse_candidates"))
    if "format" not in d:
        raise ValueError(f"{where}: missing 'format'")
    fmt = _string(where, "format", d, None)
    default_gran, default_block = _defaults(fmt)
    block = _positive_int(where, "block_size", d, default_block)
    try:
        return QuantSpec(fmt, _string(where, "granularity", d, default_gran), block,
                         _string(where, "scale_search", d, "max"), _positive_int(where, "mse_candidates", d, 64))
    except ValueError as e:
        raise ValueError(f"{where}: {e}") from None


def _input_spec(where: str, d: dict | None) -> InputSpec | None:
    if d is None:
        return None
    _check_keys(where, d, ("format", "granularity", "block_size", "dynamic"))
    if "format" not in d:
        raise ValueError(f"{where}: missing 'format'")
    fmt = _string(where, "format", d, None)
    default_gran, default_block = _defaults(fmt)
    try:
        return InputSpec(
            fmt,
            _string(where, "granularity", d, "tensor" if default_block is None else default_gran),
            _positive_int(where, "block_size", d, default_block),
            _bool(where, "dynamic", d, False),
        )
    except ValueError as e:
        raise ValueError(f"{where}: {e}") from None


def _strings(where: str, value) -> tuple[str, ...]:
    """A string or a list of strings (patterns, group kinds); anything else is the user's mistake, not a crash."""
    if isinstance(value, str):
        return (value,)
    if isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
        return tuple(value)
    raise ValueError(f"{where}: expected a string or a list of strings, got {value!r}")


def recipe_from_dict(data: dict, source: str = "<dict>") -> Recipe:
    where = f"recipe {source}"
    _check_keys(where, data, ("name", "description", "rules", "exclude", "default_exclude", "share_weight_amax",
                              "kv_cache"))
    rules_data = data.get("rules")
    if not rules_data or not isinstance(rules_data, list):
        raise ValueError(f"{where}: 'rules' must be a non-empty list of {{match, weight, input}} entries")
    rules = []
    for i, r in enumerate(rules_data):
        rw = f"{where}: rules[{i}]"
        _check_keys(rw, r, ("match", "weight", "input"))
        match = _strings(f"{rw}.match", r.get("match", ["*"]))
        if "weight" not in r:
            raise ValueError(f"{rw}: missing 'weight'")
        rules.append(Rule(match, _weight_spec(f"{rw}.weight", r["weight"]), _input_spec(f"{rw}.input", r.get("input"))))
    share = _strings(f"{where}: share_weight_amax", data.get("share_weight_amax") or [])
    bad = sorted(set(share) - set(SHARE_KINDS))
    if bad:
        raise ValueError(f"{where}: share_weight_amax has unknown group kind(s) {bad}; valid: {list(SHARE_KINDS)}")
    exclude = _strings(f"{where}: exclude", data.get("exclude") or [])
    kv_cache = data.get("kv_cache")
    if kv_cache is not None and (not isinstance(kv_cache, str) or kv_cache not in KV_CACHE_FORMATS):
        raise ValueError(f"{where}: kv_cache {kv_cache!r} is not supported; valid: {list(KV_CACHE_FORMATS)} "
                         f"(or leave it out: the KV cache stays in the model dtype)")
    return Recipe(
        name=_string(where, "name", data, os.path.splitext(os.path.basename(source))[0]),
        rules=tuple(rules),
        exclude=exclude,
        default_exclude=_bool(where, "default_exclude", data, True),
        share_weight_amax=share,
        description=_string(where, "description", data, ""),
        source=source,
        kv_cache=kv_cache,
    )


def with_kv_cache(recipe: Recipe, kv_cache: str | None) -> Recipe:
    """The recipe with `--kv-cache` applied: None keeps the recipe's own `kv_cache:`, "none" drops it, "fp8" sets
    it (the recipe keeps its name; its fingerprint, and so the calibration it needs, follow the KV cache)."""
    if kv_cache is None:
        return recipe
    check_kv_cache_choice(kv_cache)
    return replace(recipe, kv_cache=None if kv_cache == "none" else kv_cache)


def recipe_args(recipe: Recipe) -> str:
    """The `--recipe` (and `--kv-cache`) arguments that name this recipe in a command line the user can rerun."""
    return f"--recipe {recipe.name}" + (f" --kv-cache {recipe.kv_cache}" if recipe.kv_cache else "")


def resolve_recipe_path(name_or_path: str):
    """A recipe file path, or the packaged recipe of that name."""
    if os.path.isfile(name_or_path):
        return name_or_path
    packaged = packaged_recipes()
    found = packaged.get(name_or_path)
    if found is not None:
        return found
    from .recipe_names import resolve_alias

    ours = resolve_alias(name_or_path, sorted(packaged))  # a ModelOpt / llm-compressor name, or a near miss
    if ours is not None:
        log.info("recipe %s is our %s (same quantization)", name_or_path, ours)
        return packaged[ours]
    raise ValueError(f"unknown recipe {name_or_path!r}; valid recipes: {available_recipes()} (or their ModelOpt / "
                     f"llm-compressor names, `dist-export recipes` lists them) or a path to a .yaml file")


def _expanded_nodes(node, seen: dict, path: set) -> int:
    """How many YAML nodes `node` stands for with every alias written out (memoized per node, so a graph of
    nested aliases is counted without being expanded); a node that contains itself counts as unbounded."""
    key = id(node)
    if key in seen:
        return seen[key]
    if key in path:
        return MAX_RECIPE_NODES + 1
    path.add(key)
    children = node.value if isinstance(node, yaml.SequenceNode) else \
        [n for pair in node.value for n in pair] if isinstance(node, yaml.MappingNode) else []
    total = 1
    for child in children:
        total += _expanded_nodes(child, seen, path)
        if total > MAX_RECIPE_NODES:
            break
    path.discard(key)
    seen[key] = total
    return total


def _safe_load_bounded(text: str, path) -> object:
    """yaml.safe_load with a bound on the size the document expands to (anchors and aliases included)."""
    if len(text) > MAX_RECIPE_BYTES:
        raise ValueError(f"recipe {path} is {len(text)} bytes, more than the {MAX_RECIPE_BYTES} a recipe may have: "
                         f"pass the recipe file itself")
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        if _expanded_nodes(node, {}, set()) > MAX_RECIPE_NODES:
            raise ValueError(f"recipe {path}: its anchors and aliases expand to more than {MAX_RECIPE_NODES} YAML "
                             f"values (or refer to themselves); write it out without nested aliases")
        return loader.construct_document(node)
    finally:
        loader.dispose()


def load_recipe(name_or_path: str) -> Recipe:
    path = resolve_recipe_path(name_or_path)
    try:
        with open(path, "rb") if isinstance(path, str) else path.open("rb") as f:
            raw = f.read(MAX_RECIPE_BYTES + 1)
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise ValueError(f"recipe {path} is not UTF-8 text ({e}): save it as UTF-8 YAML") from None
        data = _safe_load_bounded(text, path)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ValueError(f"recipe {path} is not valid YAML{where} ({getattr(e, 'problem', None) or e}): fix the "
                         f"YAML syntax there") from None
    if data is not None and not isinstance(data, dict):
        raise ValueError(f"recipe {path} is a YAML {type(data).__name__}, not a mapping of name, rules, ...: write "
                         f"the recipe as `rules: [...]` (see dist_export/configs)")
    return recipe_from_dict(data or {}, source=str(path))

"""Stage 1, every rank: plan the export from metadata alone (pure functions: no tensor data, no collectives).

The plan lists the work items (one per source tensor), the groups of items that must share one weight amax,
the output shards (which tensors go in which file; this layout never depends on the world size) and who writes
what (issue 17, `ownership.py`): each shard belongs to one node, each item to one rank of that node, balanced by
bytes and quantization cost, so several ranks of a node write one shard file at its planned offsets
(`storage/shared_shard.py`). Every rank computes the same plan; the ranks compare `ExportPlan.digest` before
anything is written.
"""
from __future__ import annotations

import fnmatch
import hashlib
import json
import logging
import math
import re
from dataclasses import dataclass, replace

from .layout import shard_filename
from .ownership import assign_items, rank_summary
from .storage.header import ST_ITEMSIZE, TensorMeta
from .numerics import QuantSpec, get_format, has_tensor_amax
from .recipe import InputSpec, Recipe

log = logging.getLogger(__name__)

FLOAT_DTYPES = ("BF16", "F16", "F32")


@dataclass(frozen=True)
class OutSpec:
    """One tensor the output will hold (metadata only)."""

    name: str
    dtype: str  # safetensors dtype name
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * ST_ITEMSIZE[self.dtype]


@dataclass(frozen=True)
class Item:
    """One source tensor's work: copy it, or quantize it with `weight` (module `module`)."""

    name: str
    meta: TensorMeta
    module: str | None = None
    weight: QuantSpec | None = None
    input: InputSpec | None = None
    group: str | None = None  # id of the shared-amax group, if any
    # Stacked experts (GPT-OSS: one 3-D tensor holds every expert): "in_out" ([E, in, out], used as x @ W[e])
    # or "out_in" ([E, out, in]); each expert slice is quantized as its own [out, in] matrix.
    stacked: str | None = None
    share_stack: bool = False  # all experts of the stack share one per-tensor amax
    # KV-cache quantization (recipe.kv_cache): the K or V quantizer whose static scale this k_proj / v_proj item
    # also carries, named as ModelOpt names it (`<attention>.k_bmm_quantizer` / `.v_bmm_quantizer`)
    kv: str | None = None

    @property
    def quantized(self) -> bool:
        return self.weight is not None


def item_outputs(output_format, item: Item) -> list[OutSpec]:
    """Every tensor `item` becomes: the format's outputs, then its KV-cache scale where the item carries one."""
    outs = output_format.outputs(item)
    return outs + output_format.kv_outputs(item) if item.kv else outs


@dataclass(frozen=True)
class ShardPlan:
    filename: str
    items: tuple[str, ...]
    tensors: tuple[OutSpec, ...]
    nbytes: int
    cost: float
    node: int  # the node whose ranks write this file (a shard never has writers on two nodes)
    ranks: tuple[int, ...]  # the rank that writes each item (aligned with `items`)
    outputs: tuple[tuple[str, ...], ...]  # the output tensors of each item (aligned with `items`)
    # the writer that creates the file and decides whether --resume reuses it (writers take turns by shard
    # index, so creating, resume checks and failure clean-up are spread over the ranks)
    creator: int

    @property
    def writers(self) -> tuple[int, ...]:
        return tuple(sorted(set(self.ranks)))

    def part(self, rank: int) -> "ShardPart":
        idx = [k for k, r in enumerate(self.ranks) if r == rank]
        return ShardPart(self, tuple(self.items[k] for k in idx), tuple(t for k in idx for t in self.outputs[k]))


@dataclass(frozen=True)
class ShardPart:
    """One rank's items of one shard and the output tensors they produce (in file order)."""

    shard: ShardPlan
    items: tuple[str, ...]
    tensors: tuple[str, ...]

    @property
    def filename(self) -> str:
        return self.shard.filename


@dataclass(frozen=True)
class ExportPlan:
    items: dict[str, Item]
    shards: tuple[ShardPlan, ...]
    groups: dict[str, tuple[str, ...]]
    excluded: tuple[tuple[str, str], ...]  # (module, pattern) of 2-D weights kept unquantized
    world_size: int
    format: str
    nnodes: int = 1
    warnings: tuple[str, ...] = ()  # recipe rules that match nothing, a recipe that quantizes nothing, the
    # format's check_items lines: job-wide, so rank 0 logs them once

    @property
    def single_file(self) -> bool:
        return len(self.shards) == 1

    @property
    def total_size(self) -> int:
        return sum(s.nbytes for s in self.shards)

    def owners(self) -> dict[str, int]:
        """{item: the rank that reads, quantizes and writes it}."""
        return {n: r for s in self.shards for n, r in zip(s.items, s.ranks)}

    def owned_items(self, rank: int) -> list[str]:
        return [n for s in self.shards for n, r in zip(s.items, s.ranks) if r == rank]

    def parts(self, rank: int) -> list[ShardPart]:
        """This rank's part of every shard it writes into, in file order."""
        return [s.part(rank) for s in self.shards if rank in s.ranks]

    def digest(self) -> str:
        """Hash of everything ranks must agree on (layout, owners, quantizer choices, groups)."""
        data = {
            "shards": [(s.filename, s.node, s.ranks, s.creator, [(t.name, t.dtype, t.shape) for t in s.tensors])
                       for s in self.shards],
            "nnodes": self.nnodes,
            "items": [(i.name, repr(i.weight), repr(i.input), i.group, i.stacked, i.share_stack, i.kv)
                      for i in self.items.values()],
            "groups": sorted(self.groups.items()),
            "format": self.format,
        }
        return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()

    def layout_digest(self) -> str:
        """Hash of the output layout only (no owners): equal for every world size."""
        data = [(s.filename, [(t.name, t.dtype, t.shape) for t in s.tensors]) for s in self.shards]
        return hashlib.sha256(json.dumps(data).encode()).hexdigest()


# ----------------------------------------------------------------------------------------------- items


def natural_key(name: str) -> tuple:
    return tuple((0, int(p), "") if p.isdigit() else (1, 0, p) for p in re.split(r"(\d+)", name))


def classify_tensors(tensors: dict[str, TensorMeta], recipe: Recipe) -> tuple[list[Item], list[tuple[str, str]]]:
    """Decide for every source tensor: quantize (with which specs), or copy.

    A 2-D `.weight` that no rule matches and no exclusion covers is an error: we never silently pass a weight
    through that the user may have meant to quantize. Tensors of other ranks (1-D norms, biases) are copied.
    """
    items, excluded = [], []
    # Natural name order (layer 2 before layer 10): the output layout depends on the names alone, not on how
    # the source happens to be laid out, so a folder, its re-save and the in-memory model give the same bytes.
    for name in sorted(tensors, key=natural_key):
        meta = tensors[name]
        if len(meta.shape) < 2 or name.endswith(("bias", ".sinks")):
            items.append(Item(name, meta))  # norms, biases, attention sinks: copied
            continue
        module = name[: -len(".weight")] if name.endswith(".weight") else name
        numbered = _NUMBERED_WEIGHT.search(name)  # experts stored as weight0..weightN under one module
        if numbered and len(meta.shape) == 2:
            module = f"{name[: numbered.start()]}.{numbered.group(1)}"
        pattern = recipe.excluded_by(module)
        if pattern is not None:
            items.append(Item(name, meta))
            if name.endswith(".weight"):
                excluded.append((module, pattern))
            continue
        stacked = stacked_layout(name, meta, tensors)
        if stacked is None and not numbered and (not name.endswith(".weight") or len(meta.shape) != 2):
            raise ValueError(
                f"tensor {name!r} with shape {list(meta.shape)} is not a 2-D Linear weight nor a stack of experts "
                f"with a bias that tells its layout; add it to the recipe's 'exclude' list"
            )
        rule = recipe.rule_for(module)
        if rule is None:
            raise ValueError(
                f"module {module!r} matches no rule of recipe {recipe.name!r} and no exclusion; add a rule "
                f"or an 'exclude' pattern for it"
            )
        if meta.dtype not in FLOAT_DTYPES:
            raise ValueError(
                f"tensor {name!r} has dtype {meta.dtype}; quantization takes {list(FLOAT_DTYPES)}: exclude it or convert the source"
            )
        matrix = _matrix_shape(meta.shape, stacked)
        _check_shape_fits(name, matrix, rule.weight)
        items.append(Item(name, meta, module=module, weight=rule.weight, input=rule.input, stacked=stacked,
                          share_stack=stacked is not None and "experts" in recipe.share_weight_amax
                          and has_tensor_amax(rule.weight)))
    if recipe.kv_cache is not None:
        items = kv_cache_items(items, recipe)
    return items, excluded


_KV_PROJ = re.compile(r"^(.+)\.([kv])_proj$")


def kv_cache_items(items: list[Item], recipe: Recipe) -> list[Item]:
    """Mark each attention layer's k_proj / v_proj item with its KV quantizer (`<attention>.k_bmm_quantizer`).

    The real-quant layouts store the K/V scales next to those projections, so both must be quantized 2-D
    weights; a layer with one of them excluded, or a model with no separate k_proj/v_proj (fused qkv, MLA) is
    refused by name rather than exported with a KV cache the engine would quantize without our scales."""
    by_name = {i.name: i for i in items}
    layers: dict[str, dict[str, Item | None]] = {}
    for name in by_name:
        hit = _KV_PROJ.match(name[: -len(".weight")]) if name.endswith(".weight") else None
        if hit:
            layers.setdefault(hit.group(1), {"k": None, "v": None})[hit.group(2)] = by_name[name]
    if not layers:
        raise ValueError(f"recipe {recipe.name!r} asks for kv_cache: {recipe.kv_cache}, but the model has no "
                         f"attention k_proj/v_proj weights (fused qkv or MLA attention is not supported yet)")
    marked = {}
    for attn, kv in sorted(layers.items()):
        for role, item in kv.items():
            if item is None or not item.quantized or item.stacked:
                raise ValueError(f"recipe {recipe.name!r} asks for kv_cache: {recipe.kv_cache}, but "
                                 f"{attn}.{role}_proj is {'missing' if item is None else 'not quantized'}; the "
                                 f"K/V scales are stored with quantized k_proj and v_proj weights")
            marked[item.name] = replace(item, kv=f"{attn}.{role}_bmm_quantizer")
    return [marked.get(i.name, i) for i in items]


def kv_cache_quantizers(items) -> list[str]:
    """The KV quantizer names the items carry, sorted (calibration must provide each one's amax)."""
    return sorted(i.kv for i in items if i.kv)


_NUMBERED_WEIGHT = re.compile(r"\.weight(\d+)$")
_STACK = re.compile(r"\.experts\.(gate_up_proj|down_proj)$")


def stacked_layout(name: str, meta: TensorMeta, tensors: dict[str, TensorMeta]) -> str | None:
    """Layout of a 3-D stack of experts, told by its bias [E, out] (metadata only), or None if not a stack."""
    if len(meta.shape) != 3 or not _STACK.search(name):
        return None
    bias = tensors.get(name + "_bias")
    if bias is None or len(bias.shape) != 2 or bias.shape[0] != meta.shape[0]:
        return None
    if bias.shape[1] == meta.shape[2] and bias.shape[1] != meta.shape[1]:
        return "in_out"
    if bias.shape[1] == meta.shape[1] and bias.shape[1] != meta.shape[2]:
        return "out_in"
    sibling = name.replace(".down_proj", ".gate_up_proj")  # square down_proj (GPT-OSS: I == H): same convention
    if sibling != name and sibling in tensors:
        return stacked_layout(sibling, tensors[sibling], tensors)
    return None


def _matrix_shape(shape: tuple[int, ...], stacked: str | None) -> tuple[int, ...]:
    """The [out, in] shape one expert's matrix has (the tensor's own shape for ordinary weights)."""
    if stacked == "in_out":
        return (shape[2], shape[1])
    if stacked == "out_in":
        return (shape[1], shape[2])
    return shape


def _check_shape_fits(name: str, shape: tuple[int, ...], spec: QuantSpec) -> None:
    per_byte = get_format(spec.fmt).values_per_byte
    if shape[-1] % per_byte:
        raise ValueError(f"tensor {name!r} has an input dim {shape[-1]} that is not a multiple of {per_byte}; "
                         f"{spec.fmt} packs {per_byte} values per byte: exclude this module in the recipe or use "
                         f"another recipe for it")
    if 0 in shape:
        raise ValueError(f"tensor {name!r} is empty (shape {list(shape)}); refusing to quantize an empty weight")


# ---------------------------------------------------------------------------------------------- groups

_GROUP_RULES = {
    "qkv": [(re.compile(r"^(.*)\.(q_proj|k_proj|v_proj)$"), "qkv")],
    "gate_up": [(re.compile(r"^(.*)\.(gate_proj|up_proj|w1|w3)$"), "gate_up")],
    "experts": [
        (re.compile(r"^(.*\.experts)\.\d+\.(gate_proj|up_proj|w1|w3)$"), "experts_gate_up"),
        (re.compile(r"^(.*\.experts)\.\d+\.(down_proj|w2)$"), "experts_down"),
    ],
}


def plan_groups(items: list[Item], share: tuple[str, ...]) -> dict[str, tuple[str, ...]]:
    """Union of the recipe's share kinds over quantized items with a per-tensor amax; returns {group: members}."""
    parent: dict[str, str] = {}

    def find(x: str) -> str:
        while parent.setdefault(x, x) != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    keyed: dict[str, list[str]] = {}
    for item in items:
        if not has_tensor_amax(item.weight):
            continue
        for kind in share:
            for regex, tag in _GROUP_RULES[kind]:
                m = regex.match(item.module)
                if m:
                    keyed.setdefault(f"{m.group(1)}:{tag}", []).append(item.name)
    for members in keyed.values():
        for other in members[1:]:
            parent[find(other)] = find(members[0])
    groups: dict[str, list[str]] = {}
    for members in keyed.values():
        for name in members:
            groups.setdefault(find(name), []).append(name)
    out = {}
    by_name = {i.name: i for i in items}
    for members in groups.values():
        members = sorted(set(members))
        if len(members) < 2:
            continue
        specs = {by_name[m].weight for m in members}
        if len(specs) > 1:
            raise ValueError(f"weights {members[:3]}... share one amax but the recipe gives them different formats")
        out[f"group:{members[0]}"] = tuple(members)
    return out


# ---------------------------------------------------------------------------------------------- shards


def item_cost(item: Item, outputs: list[OutSpec]) -> float:
    """Relative cost in byte-equivalents: reading + writing + quantize math (MSE search tries K scales)."""
    cost = item.meta.nbytes + sum(o.nbytes for o in outputs)
    if item.weight is not None:
        per_elem = 8.0
        if item.weight.scale_search == "mse":
            per_elem *= 1 + item.weight.mse_candidates / 4
        cost += per_elem * item.meta.numel
    return cost


def split_in_order(entries: list, sizes: list[int], max_bytes: int) -> list[list]:
    """Greedy split keeping order: a new group starts when the next entry would pass `max_bytes`."""
    groups, current, total = [], [], 0
    for entry, nbytes in zip(entries, sizes):
        if current and total + nbytes > max_bytes:
            groups.append(current)
            current, total = [], 0
        current.append(entry)
        total += nbytes
    if current:
        groups.append(current)
    return groups


def plan_shards(ordered: list[tuple[Item, list[OutSpec]]], max_shard_bytes: int) -> list[list[tuple[Item, list[OutSpec]]]]:
    """Greedy split in name order; an item's outputs never straddle two files. No world size involved."""
    return split_in_order(ordered, [sum(o.nbytes for o in outs) for _, outs in ordered], max_shard_bytes)


def assign_owners(shard_lists: list[list[tuple[Item, list[OutSpec]]]], world_size: int,
                  nnodes: int) -> tuple[list[int], list[list[int]]]:
    """(node of each shard, rank of each item): `ownership.assign_items` on item costs; the members of a
    shared-amax group within one shard stay on one rank (measured in the pipeline, read once)."""
    if nnodes < 1 or world_size % nnodes:
        raise ValueError(f"world size {world_size} is not a multiple of nnodes={nnodes}; use a world size of "
                         f"nnodes * ranks per node")
    costs = [[item_cost(i, o) for i, o in s] for s in shard_lists]
    bundles = [[i.group for i, _ in s] for s in shard_lists]
    return assign_items(costs, nnodes, world_size // nnodes, bundles)


def build_plan(tensors: dict[str, TensorMeta], recipe: Recipe, output_format, world_size: int,
               max_shard_bytes: int, nnodes: int = 1) -> ExportPlan:
    """The whole plan: classify items, form groups, lay out shards, pick the node of each shard and the rank of
    each item (`nnodes` nodes of world_size / nnodes ranks, torchrun's numbering)."""
    items, excluded = classify_tensors(tensors, recipe)
    if recipe.kv_cache is not None and not output_format.carries_kv_cache:
        raise ValueError(f"--format {output_format.name} cannot carry the recipe's kv_cache: {recipe.kv_cache} "
                         f"scales; use --format vllm-fq, modelopt or compressed-tensors, or drop kv_cache (--kv-cache none)")
    format_warnings = tuple(output_format.check_items(items, recipe) or ())
    groups = plan_groups(items, recipe.share_weight_amax)
    member_of = {m: g for g, ms in groups.items() for m in ms}
    items = [replace(i, group=member_of.get(i.name)) for i in items]
    ordered = [(item, item_outputs(output_format, item)) for item in items]
    shard_lists = plan_shards(ordered, max_shard_bytes)
    nodes, ranks = assign_owners(shard_lists, world_size, nnodes)
    shards = tuple(
        ShardPlan(
            filename=shard_filename(k, len(shard_lists)),
            items=tuple(i.name for i, _ in s),
            tensors=tuple(o for _, outs in s for o in outs),
            nbytes=sum(o.nbytes for _, outs in s for o in outs),
            cost=sum(item_cost(i, o) for i, o in s),
            node=nodes[k],
            ranks=tuple(ranks[k]),
            outputs=tuple(tuple(o.name for o in outs) for _, outs in s),
            creator=sorted(set(ranks[k]))[k % len(set(ranks[k]))],
        )
        for k, s in enumerate(shard_lists)
    )
    return ExportPlan({i.name: i for i in items}, shards, groups, tuple(excluded), world_size, output_format.name,
                      nnodes, recipe_warnings(recipe, items, excluded) + format_warnings)


def recipe_warnings(recipe: Recipe, items: list[Item], excluded: list[tuple[str, str]]) -> tuple[str, ...]:
    """Legal but likely wrong: a rule that decides no module (its patterns match none, or only modules that an
    exclusion or an earlier rule takes), an `exclude` pattern of the recipe that matches no module, a recipe that
    quantizes nothing. Each names the rule or pattern."""
    quantized = sorted({i.module for i in items if i.quantized})
    modules = quantized + sorted({m for m, _ in excluded})
    where = f"recipe {recipe.name!r}"
    if not quantized and modules:  # the one thing to say (every rule then decides nothing)
        patterns = sorted({p for _, p in excluded})
        return (f"{where} quantizes nothing: all {len(modules)} weight modules of this model are excluded (by "
                f"{', '.join(repr(p) for p in patterns[:4])}{', ...' if len(patterns) > 4 else ''}); the export "
                f"is an unquantized copy of the model",)
    out = []
    deciding = {id(recipe.rule_for(m)) for m in quantized}
    for k, rule in enumerate(recipe.rules):
        matched = [m for m in modules if any(fnmatch.fnmatchcase(m, p) for p in rule.match)]
        if not matched:
            out.append(f"{where}: rules[{k}] (match {list(rule.match)}) matches no module of this model; check the "
                       f"pattern (module names such as {_example(modules)}, without '.weight')")
        elif id(rule) not in deciding:
            out.append(f"{where}: rules[{k}] (match {list(rule.match)}) decides no module: each one it matches "
                       f"({matched[0]!r}, ...) is excluded or taken by an earlier rule")
    named = set(modules) | {i.name.rsplit(".", 1)[0] for i in items}  # also norms, biases: '*norm' is not noise
    for pattern in recipe.exclude:
        if not any(fnmatch.fnmatchcase(m, pattern) for m in named):
            out.append(f"{where}: exclude pattern {pattern!r} matches no module of this model; check the pattern "
                       f"(module names such as {_example(modules)})")
    return tuple(out)


def _example(modules: list[str]) -> str:
    return repr(modules[len(modules) // 2]) if modules else "'model.layers.0.mlp.down_proj'"


def _entries(plan: ExportPlan, output_format) -> list[tuple[int, float, int, int]]:
    """(rank, cost, bytes in, bytes out) of every item."""
    out = []
    for s in plan.shards:
        for name, rank in zip(s.items, s.ranks):
            item = plan.items[name]
            outs = item_outputs(output_format, item)
            out.append((rank, item_cost(item, outs), item.meta.nbytes, sum(o.nbytes for o in outs)))
    return out


def rank_loads(plan: ExportPlan, output_format) -> list[dict]:
    """Per-rank items, bytes and cost of a plan, and the shards each rank writes into (logs, dry runs, tests)."""
    loads = rank_summary(_entries(plan, output_format), plan.world_size, plan.world_size // plan.nnodes)["ranks"]
    for d in loads:
        d["shards"] = sum(1 for s in plan.shards if d["rank"] in s.ranks)
    return loads


def plan_summary(plan: ExportPlan, output_format) -> dict:
    """`plan --json` body (rank 0 prints it): per-rank items/cost/bytes/node, the idle ranks and the max/mean cost
    imbalance of the assignment an export executes ("executed": shards to nodes, items to ranks)."""
    return {"world_size": plan.world_size, "nnodes": plan.nnodes, "shards": len(plan.shards),
            "items": len(plan.items),
            "executed": rank_summary(_entries(plan, output_format), plan.world_size, plan.world_size // plan.nnodes)}

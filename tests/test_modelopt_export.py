"""ModelOpt-quantized models exported with no recipe (issue 15): the model's own quantizers decide, checked
against ModelOpt itself: its exporter `export_hf_vllm_fq_checkpoint` applies each quantizer to its weight and
writes the state file we must equal (modes, configs, every non-weight quantizer's properties and buffers).

ModelOpt's CPU FP8 path computes `448.0 / amax` as 448 * (1 / amax); the comparisons replace only that by the
exact division formats.md documents (`exact_fp8_eager`), and one test checks ModelOpt unpatched.
Needs nvidia-modelopt (CI: the ModelOpt venv step of .ci/run); skipped where it is absent.
"""
from __future__ import annotations

import copy
import functools
import json
import os

import pytest
import torch

mtq = pytest.importorskip("modelopt.torch.quantization")
from modelopt.torch.export import export_hf_vllm_fq_checkpoint  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

from helpers import model_dir  # noqa: E402

import dist_export  # noqa: E402
from dist_export.layout import STATE_FILE_NAME  # noqa: E402

FP8_MAX = 448.0


def _with(cfg, *entries, algorithm=None, weight_cfg=None):
    cfg = copy.deepcopy(cfg)
    if weight_cfg is not None:
        for e in cfg["quant_cfg"]:
            if e.get("quantizer_name") == "*weight_quantizer":
                e["cfg"] = {**e["cfg"], **weight_cfg}
    cfg["quant_cfg"] = list(cfg["quant_cfg"]) + list(entries)
    if algorithm is not None:
        cfg["algorithm"] = algorithm
    return cfg


def _kv(cfg):
    return _with(cfg, *[e for e in mtq.FP8_KV_CFG["quant_cfg"] if "bmm" in str(e.get("quantizer_name"))])


CONFIGS = {
    "fp8": lambda: copy.deepcopy(mtq.FP8_DEFAULT_CFG),
    "fp8-pc-pt": lambda: copy.deepcopy(mtq.FP8_PER_CHANNEL_PER_TOKEN_CFG),
    "int8-wo": lambda: copy.deepcopy(mtq.INT8_WEIGHT_ONLY_CFG),
    "int4-b128": lambda: copy.deepcopy(mtq.INT4_BLOCKWISE_WEIGHT_ONLY_CFG),
    "int4-b64": lambda: _with(mtq.INT4_BLOCKWISE_WEIGHT_ONLY_CFG, weight_cfg={"block_sizes": {-1: 64, "type": "static"}}),
    "int4-b64-mse": lambda: _with(mtq.INT4_BLOCKWISE_WEIGHT_ONLY_CFG, algorithm="mse",
                                  weight_cfg={"block_sizes": {-1: 64, "type": "static"}}),
    "int4-b128-mse": lambda: _with(mtq.INT4_BLOCKWISE_WEIGHT_ONLY_CFG, algorithm="mse"),
    "int4-awq": lambda: _with(mtq.INT4_AWQ_CFG, weight_cfg={"block_sizes": {-1: 32, "type": "static"}}),
    "int8-sq": lambda: copy.deepcopy(mtq.INT8_SMOOTHQUANT_CFG),
    "fp8-kv": lambda: _kv(mtq.FP8_DEFAULT_CFG),
    "fp8-2d-block": lambda: copy.deepcopy(mtq.FP8_2D_BLOCKWISE_WEIGHT_ONLY_CFG),
    "int8-w8a8": lambda: copy.deepcopy(mtq.INT8_DEFAULT_CFG),
    "fp8-layer0-off": lambda: _with(mtq.FP8_DEFAULT_CFG, {"quantizer_name": "*layers.0.*", "enable": False}),
    "nvfp4": lambda: copy.deepcopy(mtq.NVFP4_DEFAULT_CFG),  # CUDA only (ModelOpt's NVFP4 fake quant)
    "w4a16-nvfp4": lambda: copy.deepcopy(mtq.W4A16_NVFP4_CFG),
    "fp8-lm-head": lambda: _with(mtq.FP8_DEFAULT_CFG, {"quantizer_name": "*lm_head*weight_quantizer",
                                                       "cfg": {"num_bits": (4, 3), "axis": None}, "enable": True}),
}
GPU_ONLY = ("nvfp4", "w4a16-nvfp4")
UNTIED = "llama-tiny-untied"
# Every CPU config on both models. llama-tiny ties lm_head to the embeddings (fp8-lm-head: refused, see
# test_quantized_lm_head_tied_to_embeddings_refused): its quantized-lm_head case runs on an untied copy.
CASES = [("llama-tiny", c) for c in CONFIGS if c not in ("fp8-lm-head", *GPU_ONLY)] + [(UNTIED, "fp8-lm-head")] + \
        [("qwen3-moe-tiny", c) for c in CONFIGS if c not in GPU_ONLY]


def load_model(name: str):
    import transformers

    folder = _untied_llama() if name == UNTIED else model_dir(f"synthetic:{name}")
    return transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16).eval(), folder


@functools.lru_cache(maxsize=None)
def _untied_llama() -> str:
    """llama-tiny with an lm_head of its own (seeded random, unlike the embeddings), saved once per process: the
    tiny Llama of the quantized-lm_head case (llama-tiny itself ties lm_head to the embeddings)."""
    import tempfile

    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir("synthetic:llama-tiny"), dtype=torch.bfloat16)
    model.config.tie_word_embeddings = False
    head = torch.randn(model.lm_head.weight.shape, generator=torch.Generator().manual_seed(1)) * 0.02
    model.lm_head.weight = torch.nn.Parameter(head.to(torch.bfloat16))
    folder = os.path.join(tempfile.mkdtemp(prefix="dist-export-untied-llama-"), "model")
    model.save_pretrained(folder)
    return folder


def quantized(name: str, config: str, device: str = "cpu"):
    model, folder = load_model(name)
    model = model.to(device)
    data = torch.randint(0, model.config.vocab_size, (4, 16), generator=torch.Generator().manual_seed(0)).to(device)

    def loop(m):
        for i in range(data.shape[0]):
            m(data[i:i + 1])

    with torch.no_grad():
        model = mtq.quantize(model, CONFIGS[config](), loop)
    return model, folder


def exact_fp8_eager(x, amax=None):
    """formats.md section 5 FP8 (exact division 448 / a), in place of ModelOpt's CPU `448.0 / a`, which torch
    computes as 448 * (1 / a), one more rounding."""
    dtype = x.dtype
    if amax is None:
        return x.to(torch.float8_e4m3fn).to(dtype)
    a = amax.to(torch.float32)
    a = torch.where(a <= 2.0**-24, torch.ones_like(a), a)
    scale = torch.full_like(a, FP8_MAX) / a
    inv = torch.ones_like(scale) / scale
    y = (x.to(torch.float32) * scale).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    return (y.to(torch.float32) * inv).to(dtype)


class _ExactGlobalScale:
    """Stands in for the global amax ModelOpt's NVFP4 Triton launcher receives: its `.float() / 2688.0` gives the
    exact division of formats.md, where CUDA's tensor-by-scalar division computes amax * (1 / 2688)."""

    def __init__(self, amax: torch.Tensor):
        self.amax = amax

    def float(self):
        return self

    def __truediv__(self, divisor: float) -> torch.Tensor:
        a = self.amax.float()
        return a / torch.full_like(a, divisor)


def modelopt_export(model, out, exact_fp8: bool, exact_global_scale: bool = False):
    """ModelOpt's own export; `exact_*` replace only ModelOpt's rounded reciprocals (FP8 `448.0 / amax` on CPU,
    the NVFP4 global scale `amax / 2688.0` on CUDA) by the exact divisions formats.md documents. A fused experts
    module is skipped by its MoE re-smoothing (`_fused_experts_not_grouped`), as ModelOpt skips a model type it
    does not list."""
    import modelopt.torch.kernels.quantization.gemm as kernels
    import modelopt.torch.quantization.tensor_quant as tq
    from modelopt.torch.export.plugins import vllm_fakequant_hf as vfq

    fp8, fp4, groups = tq.fp8_eager, getattr(kernels, "fp4_fake_quant_block", None), vfq.get_experts_list
    if exact_fp8:
        tq.fp8_eager = exact_fp8_eager
    if exact_global_scale and fp4 is not None:
        kernels.fp4_fake_quant_block = lambda x, amax, *a, **kw: fp4(x, _ExactGlobalScale(amax), *a, **kw)
    vfq.get_experts_list = _fused_experts_not_grouped(groups)
    try:
        export_hf_vllm_fq_checkpoint(model, out)
    finally:
        tq.fp8_eager, vfq.get_experts_list = fp8, groups
        if fp4 is not None:
            kernels.fp4_fake_quant_block = fp4
    return load_file(os.path.join(out, "model.safetensors"))


def _fused_experts_not_grouped(get_experts_list):
    """ModelOpt 0.47's exporter re-smooths AWQ-format exports (INT4 blocks, AWQ) per MoE expert group, listing
    the group with `len(module.experts)`: a transformers-5 fused experts module has no len() (TypeError). Its
    re-smoothing averages per-expert `pre_quant_scale`s, and a fused module has none (one shared input quantizer;
    awq_lite leaves fused experts at max calibration: _awq_left_fused_experts_at_max), so it has nothing to
    do: NotImplementedError, which the exporter already catches for a model type it does not list, skips it."""
    def patched(module, model_type):
        if not hasattr(type(module.experts), "__len__"):
            raise NotImplementedError(f"{type(module.experts).__name__}: fused experts, no per-expert groups")
        return get_experts_list(module, model_type)
    return patched


def ours(model, out, device="cpu", **kw):
    dist_export.export(model, str(out), format="vllm-fq", recipe=None, device=device, **kw)
    return load_file(os.path.join(out, "model.safetensors"))


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(torch.int16 if t.element_size() == 2 else torch.int32)


@pytest.mark.parametrize("name,config", CASES)
def test_weights_equal_the_models_own_quantizers(tmp_path, name, config):
    model, folder = quantized(name, config)
    mine = ours(model, tmp_path / "ours")
    theirs = modelopt_export(model, str(tmp_path / "modelopt"), exact_fp8=True)
    assert sorted(mine) == sorted(theirs) == sorted(load_file_keys(folder))
    for key in sorted(theirs):
        assert mine[key].dtype == theirs[key].dtype, key
        assert torch.equal(bits(mine[key]), bits(theirs[key])), f"{key}: differs from ModelOpt's fold"
    enabled = _check_state(tmp_path / "ours" / STATE_FILE_NAME, tmp_path / "modelopt" / STATE_FILE_NAME, model)
    assert enabled > 0 or config in ("int8-wo", "int4-b128", "int4-b64", "int4-b64-mse", "int4-b128-mse",
                                     "int4-awq", "fp8-2d-block")
    if (name, config) == ("qwen3-moe-tiny", "int4-awq"):
        _awq_left_fused_experts_at_max(model)
    if config == "fp8-lm-head":  # lm_head was quantized (its own weight, not the embeddings')
        source = load_model(name)[0]
        assert not torch.equal(mine["lm_head.weight"], source.lm_head.weight)
        assert torch.equal(mine["model.embed_tokens.weight"], source.model.embed_tokens.weight)
        assert not torch.equal(source.lm_head.weight, source.model.embed_tokens.weight)


def _awq_left_fused_experts_at_max(model) -> None:
    """What INT4_AWQ_CFG (awq_lite) does to a transformers-5 fused experts module in ModelOpt 0.47: nothing
    AWQ-specific. Its experts get no pre_quant_scale (the attention linears do), their weights are not rescaled
    and every expert's weight amax is plain max calibration, max|W| per block of 32; so an MoE AWQ export is AWQ
    on attention and INT4-max on the experts, in ModelOpt's export and in ours."""
    source = load_model("qwen3-moe-tiny")[0].state_dict()
    assert model.model.layers[0].self_attn.q_proj.input_quantizer._pre_quant_scale is not None
    for i, layer in enumerate(model.model.layers):
        experts = layer.mlp.experts
        for name in ("gate_up_proj", "down_proj"):
            assert getattr(getattr(experts, f"{name}_input_quantizer"), "_pre_quant_scale", None) is None
            weight = getattr(experts, name)
            assert torch.equal(weight, source[f"model.layers.{i}.mlp.experts.{name}"]), "weights rescaled"
            for e, q in enumerate(getattr(experts, f"{name}_weight_quantizers")):
                want = weight[e].float().abs().reshape(-1, 32).amax(-1)
                assert torch.equal(q._amax.float().reshape(-1), want), (i, name, e)


def test_kv_cache_and_fused_expert_inputs_carry_the_models_amax(tmp_path):
    """FP8 + FP8 KV cache on the MoE model: every k/v bmm quantizer and every expert's input quantizer (one
    shared `gate_up_proj_input_quantizer` per experts module in the model) is enabled in our state file with
    the model's own amax."""
    model, _ = quantized("qwen3-moe-tiny", "fp8-kv")
    ours(model, tmp_path / "o")
    state = torch.load(tmp_path / "o" / STATE_FILE_NAME, weights_only=True)
    qs = state["modelopt_state_dict"][0][1]["metadata"]["quantizer_state"]
    amax = state["modelopt_state_weights"]
    for i, layer in enumerate(model.model.layers):
        for kv in ("k_bmm_quantizer", "v_bmm_quantizer"):
            path = f"model.layers.{i}.self_attn.{kv}"
            assert not qs[path]["_disabled"] and torch.equal(amax[path]["_amax"], getattr(layer.self_attn, kv)._amax)
        shared = layer.mlp.experts.gate_up_proj_input_quantizer._amax
        for e in range(model.config.num_experts):
            for p in ("gate_proj", "up_proj"):
                path = f"model.layers.{i}.mlp.experts.{e}.{p}.input_quantizer"
                assert not qs[path]["_disabled"] and torch.equal(amax[path]["_amax"], shared), path


def load_file_keys(folder) -> list[str]:
    from safetensors import safe_open

    keys = []
    for f in sorted(os.listdir(folder)):
        if f.endswith(".safetensors"):
            with safe_open(os.path.join(folder, f), "pt") as fh:
                keys += list(fh.keys())
    return keys


def _expand_modelopt_name(name: str, model) -> list[str]:
    """ModelOpt's in-memory quantizer names -> checkpoint names (a fused experts' shared quantizer is one per
    expert and projection)."""
    import re

    m = re.match(r"^(.*\.experts)\.(gate_up_proj|down_proj)_input_quantizer$", name)
    if m is None:
        return [name]
    n = model.config.num_experts
    projs = ("gate_proj", "up_proj") if m.group(2) == "gate_up_proj" else ("down_proj",)
    return [f"{m.group(1)}.{e}.{p}.input_quantizer" for e in range(n) for p in projs]


def _same(a, b) -> bool:
    """Deep equality of plain data holding tensors (dtype, shape and values)."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.dtype == b.dtype and \
            torch.equal(a.cpu(), b.cpu())
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return type(a) is type(b) and a == b


def _check_state(mine_path, theirs_path, model) -> int:
    """Our state file against ModelOpt's: the same modes with equal configs and metadata; every quantizer with
    equal properties and buffers (a fused experts' shared quantizer under each expert's checkpoint names); no
    weight quantizer. Returns how many enabled quantizers were compared."""
    mine = torch.load(mine_path, weights_only=True)  # plain torch, nothing else imported for it
    theirs = torch.load(theirs_path, weights_only=False)
    assert mine["modelopt_version"] == theirs["modelopt_version"]
    assert [m for m, _ in mine["modelopt_state_dict"]] == [m for m, _ in theirs["modelopt_state_dict"]]
    for (mode, a), (_, b) in zip(mine["modelopt_state_dict"], theirs["modelopt_state_dict"]):
        assert _same(a["config"], b["config"]), mode
        assert _same({k: v for k, v in a["metadata"].items() if k != "quantizer_state"},
                     {k: v for k, v in b["metadata"].items() if k != "quantizer_state"}), mode
        assert ("quantizer_state" in a["metadata"]) == ("quantizer_state" in b["metadata"]), mode
    qs_mine = mine["modelopt_state_dict"][0][1]["metadata"]["quantizer_state"]
    qs_theirs = theirs["modelopt_state_dict"][0][1]["metadata"]["quantizer_state"]
    expected = set()
    enabled = 0
    for name, props in qs_theirs.items():
        for ck in _expand_modelopt_name(name, model):
            expected.add(ck)
            assert ck in qs_mine, f"{ck} missing from our state file"
            assert _same(qs_mine[ck], props), ck
            w_theirs = theirs["modelopt_state_weights"].get(name, {})
            w_mine = mine["modelopt_state_weights"].get(ck, {})
            assert sorted(w_mine) == sorted(w_theirs), ck
            for buf, value in w_theirs.items():
                assert w_mine[buf].dtype == value.dtype and torch.equal(w_mine[buf].cpu(), value.cpu()), f"{ck}.{buf}"
            enabled += not props["_disabled"]
    assert set(qs_mine) == expected and set(mine["modelopt_state_weights"]) <= expected
    assert not [n for n in qs_mine if "weight_quantizer" in n]
    return enabled


def test_unexpressible_quantizer_refused_by_name(tmp_path):
    model, _ = quantized("llama-tiny", "fp8")
    model.model.layers[0].self_attn.q_proj.weight_quantizer.backend = "my_backend"
    with pytest.raises(ValueError, match=r"model\.layers\.0\.self_attn\.q_proj\.weight_quantizer.*'my_backend'"):
        ours(model, tmp_path / "o")
    assert not (tmp_path / "o").exists() or not os.listdir(tmp_path / "o")


def test_recipe_must_agree_with_the_quantizers(tmp_path):
    from dist_export.recipe import recipe_from_dict

    model, _ = quantized("llama-tiny", "fp8")
    with pytest.raises(ValueError, match=r"model\.layers\.0\.mlp\.down_proj.*int4"):
        dist_export.export(model, str(tmp_path / "bad"), recipe="int4-w4a16", device="cpu")
    same = recipe_from_dict({"name": "fp8-plain", "rules": [{"match": ["*"], "weight": {"format": "fp8"},
                                                            "input": {"format": "fp8"}}]})
    a = ours(model, tmp_path / "a")
    dist_export.export(model, str(tmp_path / "b"), recipe=same, device="cpu")
    b = load_file(os.path.join(tmp_path / "b", "model.safetensors"))
    assert all(torch.equal(bits(a[k]), bits(b[k])) for k in a)


def _hashes(path) -> dict:
    from helpers import folder_hashes

    return folder_hashes(path)


def _same_as_in_memory(folder_export, memory_export) -> None:
    """A folder export against the in-memory export of the same model: every file sha256-identical except
    dist_export.json, whose run fingerprint names the source's files since f036760 (a folder's files, or
    '<memory>'); everything else in the record must be equal too."""
    a, b = _hashes(folder_export), _hashes(memory_export)
    assert {k: v for k, v in a.items() if k != "dist_export.json"} == \
        {k: v for k, v in b.items() if k != "dist_export.json"}
    ra, rb = (json.load(open(os.path.join(p, "dist_export.json"))) for p in (folder_export, memory_export))
    ra["fingerprint"].pop("source"), rb["fingerprint"].pop("source")
    assert ra == rb


def test_quantizer_state_cli_at_1_2_3_ranks(tmp_path):
    """save_quantizer_state + `export --quantizer-state` at 1, 2 and 3 ranks: sha256-identical to each other and
    to the in-memory export (but the source named in the record); the state file loads with torch alone."""
    import subprocess
    import sys

    from helpers import run_cli

    import shutil

    model, folder = quantized("qwen3-moe-tiny", "fp8-kv")
    # an in-memory model carries no tokenizer: the folder the CLI reads is a copy without it
    folder = shutil.copytree(folder, tmp_path / "bare", ignore=shutil.ignore_patterns("tokenizer*"))
    dist_export.export(model, str(tmp_path / "mem"), device="cpu", max_shard_size="60KB")
    want = None
    assert len([f for f in _hashes(tmp_path / "mem") if f.endswith(".safetensors")]) >= 3  # every rank owns some
    path = str(tmp_path / "q.pt")
    dist_export.save_quantizer_state(model, path)
    probe = "import sys, torch; torch.load(sys.argv[1], weights_only=True); assert 'modelopt' not in sys.modules"
    subprocess.run([sys.executable, "-c", probe, path], check=True)
    for n in (1, 2, 3):
        run_cli("export", "--model", str(folder), "--quantizer-state", path, "--out", str(tmp_path / f"cli{n}"),
                "--device", "cpu", "--max-shard-size", "60KB", "--nproc-per-node", str(n),
                env={"OMP_NUM_THREADS": "1"})
        _same_as_in_memory(tmp_path / f"cli{n}", tmp_path / "mem")
        want = want or _hashes(tmp_path / f"cli{n}")
        assert _hashes(tmp_path / f"cli{n}") == want, f"{n} ranks"  # the folder exports: byte for byte


def test_nproc_per_node_in_process_equals_the_in_memory_export(tmp_path):
    """export(model, out, nproc_per_node=2): two worker processes export the folder the model was loaded from
    with its quantizers; sha256-identical to the in-memory export (the folder holds no tokenizer here, as an
    in-memory model carries none)."""
    import shutil

    import transformers

    bare = shutil.copytree(model_dir("synthetic:qwen3-moe-tiny"), tmp_path / "bare",
                           ignore=shutil.ignore_patterns("tokenizer*"))
    model = transformers.AutoModelForCausalLM.from_pretrained(str(bare), dtype=torch.bfloat16).eval()
    data = torch.randint(0, model.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        model = mtq.quantize(model, CONFIGS["fp8-kv"](), lambda m: [m(data[i:i + 1]) for i in range(2)])
    dist_export.export(model, str(tmp_path / "mem"), device="cpu", max_shard_size="60KB")
    summary = dist_export.export(model, str(tmp_path / "workers"), device="cpu", max_shard_size="60KB",
                                 nproc_per_node=2)
    assert len(summary["ranks"]) == 2
    _same_as_in_memory(tmp_path / "workers", tmp_path / "mem")
    with pytest.raises(ValueError, match="nproc_per_node is for in-memory ModelOpt-quantized models"):
        dist_export.export(str(bare), str(tmp_path / "x"), nproc_per_node=2)


def test_readme_modelopt_path_runs(tmp_path, monkeypatch):
    """README's five lines for a ModelOpt user, run as written (in a folder holding models/llama, a copy of
    llama-tiny without tokenizer as in the tests above; 2 processes where they say 8, for the CPU), with the
    names a PTQ script has (mtq, torch, AutoModelForCausalLM, dist_export, a forward loop): the in-memory export
    equals ModelOpt's own bit for bit, and the 2 worker processes and the command line on the saved quantizer
    state give the same files."""
    import re
    import shlex
    import shutil

    import transformers

    from helpers import REPO, run_cli

    readme = open(os.path.join(REPO, "README.md")).read()
    section = readme[readme.index("## ModelOpt-calibrated models"):]
    lines = section[section.index("```python\n") + 10:section.index("```\n", section.index("```python"))].splitlines()
    assert len(lines) == 5 and lines[-1].startswith("# dist-export "), lines
    shutil.copytree(model_dir("synthetic:llama-tiny"), tmp_path / "models" / "llama",
                    ignore=shutil.ignore_patterns("tokenizer*"))
    monkeypatch.chdir(tmp_path)
    data = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))
    names = {"mtq": mtq, "torch": torch, "dist_export": dist_export, "loop": lambda m: [m(d[None]) for d in data],
             "AutoModelForCausalLM": transformers.AutoModelForCausalLM}
    with torch.no_grad():
        exec(compile("\n".join(lines[:4]).replace("nproc_per_node=8", "nproc_per_node=2"), "README.md", "exec"),
             names)
    cli = shlex.split(re.sub(r"--nproc-per-node 8\b", "--nproc-per-node 2", lines[4][2:]))
    assert cli[:2] == ["dist-export", "export"] and "--nproc-per-node" in cli, cli
    run_cli(*cli[1:], cwd=str(tmp_path), env={"OMP_NUM_THREADS": "1"})
    mine = load_file(tmp_path / "out" / "llama-fp8" / "model.safetensors")
    theirs = modelopt_export(names["model"], str(tmp_path / "modelopt"), exact_fp8=True)
    assert sorted(mine) == sorted(theirs) and all(torch.equal(bits(mine[k]), bits(theirs[k])) for k in theirs)
    for folder in ("llama-fp8-x8", "llama-fp8-cli"):
        _same_as_in_memory(tmp_path / "out" / folder, tmp_path / "out" / "llama-fp8")


def test_weights_changed_in_place_are_refused(tmp_path):
    """AWQ rescales the weights in place: the original folder no longer matches the quantizer state."""
    from helpers import run_cli

    model, folder = quantized("llama-tiny", "int4-awq")
    path = str(tmp_path / "q.pt")
    dist_export.save_quantizer_state(model, path)
    proc = run_cli("export", "--model", folder, "--quantizer-state", path, "--out", str(tmp_path / "o"),
                   "--device", "cpu", check=False)
    assert proc.returncode != 0
    assert "differs from the weights" in proc.stderr and "save_pretrained" in proc.stderr
    with pytest.raises(ValueError, match="differs from the weights"):
        dist_export.export(model, str(tmp_path / "w"), device="cpu", nproc_per_node=2)
    assert not (tmp_path / "w").exists()
    # the documented path: save the calibrated model (its quantizer buffers in the folder are never read as
    # weights), then that folder exports on every rank exactly as the model does in memory
    model.save_pretrained(str(tmp_path / "saved"))
    run_cli("export", "--model", str(tmp_path / "saved"), "--quantizer-state", path, "--out", str(tmp_path / "s"),
            "--device", "cpu", "--nproc-per-node", "2", env={"OMP_NUM_THREADS": "1"})
    dist_export.export(model, str(tmp_path / "mem"), device="cpu")
    _same_as_in_memory(tmp_path / "s", tmp_path / "mem")


def test_plan_takes_the_quantizer_state(tmp_path):
    """`dist-export plan --quantizer-state` plans the export `export --quantizer-state` runs: its quantized items
    are the model's enabled weight quantizers (layer 0 disabled: 7 of llama-tiny's 14 linear weights, where the
    default recipe quantizes all 14), simulated at 3 ranks and under torchrun at 2 (the ranks agree); a recipe
    that disagrees with the quantizers and a state saved from another model are one-line refusals."""
    from helpers import run_cli, run_torchrun

    model, folder = quantized("llama-tiny", "fp8-layer0-off")
    enabled = [n for n, _ in _weight_quantizers(model)]
    path = str(tmp_path / "q.pt")
    dist_export.save_quantizer_state(model, path)
    got = json.loads(run_cli("plan", "--model", folder, "--quantizer-state", path, "--world-size", "3",
                             "--json").stdout)
    assert got["recipe"] == "modelopt-quantizers" and got["quantized_items"] == len(enabled) == 7, got
    assert got["world_size"] == 3 and sum(r["items"] for r in got["executed"]["ranks"]) == got["items"]
    plain = json.loads(run_cli("plan", "--model", folder, "--world-size", "3", "--json").stdout)
    assert plain["recipe"] == "fp8-block" and plain["quantized_items"] == 14 and plain["items"] == got["items"]
    proc = run_torchrun(2, "plan", "--model", folder, "--quantizer-state", path)
    assert "recipe modelopt-quantizers: " in proc.stdout and "(7 quantized)" in proc.stdout, proc.stdout
    assert "2 ranks agree on digest" in proc.stdout, proc.stdout
    for args, message in (((folder, "--recipe", "nvfp4-w4a16"), "disagrees with the model's quantizers"),
                          ((model_dir("synthetic:qwen3-moe-tiny"),), "was saved from another model")):
        proc = run_cli("plan", "--quantizer-state", path, "--model", *args, check=False)
        assert proc.returncode == 1 and message in proc.stderr, proc.stderr[-2000:]
        last = proc.stderr.strip().splitlines()[-1]
        assert last.startswith("[rank 0] error: ") and len(last) < 400, last


@pytest.mark.skipif(not torch.cuda.is_available(), reason="ModelOpt's NVFP4 fake quant needs CUDA")
@pytest.mark.parametrize("name", ["llama-tiny", "qwen3-moe-tiny"])
@pytest.mark.parametrize("config", GPU_ONLY)
def test_nvfp4_on_cuda_against_modelopt(tmp_path, name, config):
    """NVFP4_DEFAULT_CFG and W4A16_NVFP4_CFG calibrated on CUDA.

    1. modelopt_kernels=True: bit for bit ModelOpt's own CUDA export (weights and state file).
    2. dist_export's exact arithmetic (the default): the CUDA export equals the CPU export of the same model;
       how many elements differ from ModelOpt's export (which computes the global scale as amax * (1/2688) and
       uses Triton's approximate fp32 division) is measured, as it stands and with only its global scale made
       exact, and written with the other counts to $DIST_EXPORT_GPU_REPORT (JSON lines) when that is set.
    """
    model, _ = quantized(name, config, device="cuda")
    raw = modelopt_export(model, str(tmp_path / "raw"), exact_fp8=False)
    exact_gs = modelopt_export(model, str(tmp_path / "exact"), exact_fp8=False, exact_global_scale=True)
    kern = ours(model, tmp_path / "kern", device="cuda", modelopt_kernels=True)
    mine = ours(model, tmp_path / "ours", device="cuda")
    cpu = ours(model, tmp_path / "cpu", device="cpu")
    assert sorted(kern) == sorted(raw) == sorted(mine) == sorted(cpu)

    def count(a, b):
        keys = [k for k in sorted(b) if not torch.equal(bits(a[k]), bits(b[k]))]
        return keys, sum(int((bits(a[k]) != bits(b[k])).sum()) for k in keys)

    quantized_names = [k for n, _ in _weight_quantizers(model) for k in _checkpoint_names(n, model)]
    report = {"case": f"{name}/{config}", "tensors": len(raw), "quantized_tensors": len(quantized_names),
              "quantized_elements": sum(raw[k].numel() for k in quantized_names)}
    for label, (a, b) in {"modelopt_kernels_vs_modelopt": (kern, raw), "exact_cuda_vs_exact_cpu": (mine, cpu),
                          "exact_vs_modelopt": (mine, raw), "exact_vs_modelopt_exact_global_scale": (mine, exact_gs),
                          "exact_cpu_vs_modelopt": (cpu, raw)}.items():
        keys, elements = count(a, b)
        report[label] = {"tensors": len(keys), "elements": elements, "first": keys[:2]}
    if os.environ.get("DIST_EXPORT_GPU_REPORT"):
        with open(os.environ["DIST_EXPORT_GPU_REPORT"], "a") as f:
            f.write(json.dumps(report) + "\n")
    assert report["modelopt_kernels_vs_modelopt"]["tensors"] == 0, report
    assert report["exact_cuda_vs_exact_cpu"]["tensors"] == 0, report
    _check_state(tmp_path / "kern" / STATE_FILE_NAME, tmp_path / "raw" / STATE_FILE_NAME, model)
    _check_state(tmp_path / "ours" / STATE_FILE_NAME, tmp_path / "raw" / STATE_FILE_NAME, model)


def _weight_quantizers(model):
    for name, module in model.named_modules():
        q = getattr(module, "weight_quantizer", None)
        if q is not None and not q._disabled:
            yield name, q
        for attr in ("gate_up_proj_weight_quantizers", "down_proj_weight_quantizers"):
            for e, q in enumerate(getattr(module, attr, None) or ()):
                if not q._disabled:
                    yield f"{name}.{attr}.{e}", q


def _checkpoint_names(quantizer: str, model) -> list[str]:
    import re

    m = re.match(r"^(.*\.experts)\.(gate_up_proj|down_proj)_weight_quantizers\.(\d+)$", quantizer)
    if m is None:
        return [f"{quantizer}.weight"]
    projs = ("gate_proj", "up_proj") if m.group(2) == "gate_up_proj" else ("down_proj",)
    return [f"{m.group(1)}.{m.group(3)}.{p}.weight" for p in projs]


@pytest.mark.parametrize("name,config", [("llama-tiny", "fp8"), ("llama-tiny", "int4-awq"), ("llama-tiny", "int8-sq"),
                                         ("llama-tiny", "int4-b64-mse"), ("qwen3-moe-tiny", "fp8-kv")])
def test_modelopt_kernels_equal_unpatched_modelopt(tmp_path, name, config):
    """modelopt_kernels=True: every weight through its own quantizer rebuilt on the rank; the export equals
    ModelOpt's own, unpatched (its CPU `448 * (1 / amax)` included), bit for bit, state file too."""
    model, _ = quantized(name, config)
    mine = ours(model, tmp_path / "ours", modelopt_kernels=True)
    theirs = modelopt_export(model, str(tmp_path / "modelopt"), exact_fp8=False)
    assert sorted(mine) == sorted(theirs)
    for key in sorted(theirs):
        assert torch.equal(bits(mine[key]), bits(theirs[key])), f"{key}: differs from ModelOpt's own export"
    _check_state(tmp_path / "ours" / STATE_FILE_NAME, tmp_path / "modelopt" / STATE_FILE_NAME, model)
    record = json.load(open(tmp_path / "ours" / "dist_export.json"))
    assert record["recipe"]["weight_arithmetic"] == "modelopt"


def test_modelopt_kernels_refusals(tmp_path):
    """A quantizer a rank cannot rebuild (INT4 blocks of a fused expert's gate/up, a per-row amax) is named;
    real-quant formats and plain models are refused; nothing is written."""
    model, _ = quantized("qwen3-moe-tiny", "int4-b64")
    with pytest.raises(ValueError, match=r"model\.layers\.0\.mlp\.experts\.gate_up_proj_weight_quantizers\.0: "
                                         r"modelopt_kernels cannot rebuild"):
        ours(model, tmp_path / "a", modelopt_kernels=True)
    fp8, _ = quantized("llama-tiny", "fp8")
    with pytest.raises(ValueError, match="modelopt_kernels writes ModelOpt's fake-quant weights: use --format vllm-fq"):
        dist_export.export(fp8, str(tmp_path / "b"), format="modelopt", device="cpu", modelopt_kernels=True)
    with pytest.raises(ValueError, match="this export has none"):
        dist_export.export(model_dir("synthetic:llama-tiny"), str(tmp_path / "c"), device="cpu", modelopt_kernels=True)
    for d in "abc":
        assert not (tmp_path / d).exists() or not os.listdir(tmp_path / d), d


def test_fp8_against_unpatched_modelopt_cpu(tmp_path):
    """Against ModelOpt's CPU arithmetic as it stands (448 * (1 / amax)): elements differ only by one FP8 step,
    and only in tensors whose amax makes that product differ from the exact 448 / amax."""
    model, _ = quantized("llama-tiny", "fp8")
    mine = ours(model, tmp_path / "ours")
    theirs = modelopt_export(model, str(tmp_path / "modelopt"), exact_fp8=False)
    for name, module in model.named_modules():
        q = getattr(module, "weight_quantizer", None)
        if q is None or q._disabled:
            continue
        a = q._amax.float()
        exact = bool(torch.equal(448.0 / a, torch.full_like(a, 448.0) / a))
        x, y = mine[f"{name}.weight"].float(), theirs[f"{name}.weight"].float()
        if exact:
            assert torch.equal(x, y), name
        else:
            step = (a / 448.0) * 2.0 ** -3 * 448.0  # one E4M3 mantissa step at the top of the range
            assert ((x - y).abs() <= step * 1.01).all(), name


def test_modelopt_not_imported_for_plain_exports(tmp_path):
    import subprocess
    import sys

    code = ("import sys, dist_export, dist_export.api, dist_export.cli; "
            f"dist_export.export('synthetic:llama-tiny', {str(tmp_path / 'o')!r}, recipe='int4-w4a16', device='cpu'); "
            "assert not [m for m in sys.modules if m.startswith('modelopt')], 'modelopt imported'")
    subprocess.run([sys.executable, "-c", code], check=True, env={**os.environ, "OMP_NUM_THREADS": "1"})


def test_quantized_lm_head_tied_to_embeddings_refused(tmp_path):
    """llama-tiny ties lm_head to the embeddings: the saved checkpoint holds one tensor, which cannot be both
    quantized (lm_head) and not (embeddings)."""
    model, _ = quantized("llama-tiny", "fp8-lm-head")
    with pytest.raises(ValueError, match="lm_head.weight"):
        ours(model, tmp_path / "o")


def test_bad_combinations_are_one_line_and_write_nothing(tmp_path):
    """calib with a quantized model, a state file against another model, a pre-quant scale or a KV-cache
    quantizer in a format that cannot carry it: each refused with a message naming it, the folder untouched."""
    from helpers import run_cli

    kv, _ = quantized("llama-tiny", "fp8-kv")
    with pytest.raises(ValueError, match="do not pass --calib"):
        dist_export.export(kv, str(tmp_path / "a"), calib=str(tmp_path / "c.safetensors"), device="cpu")
    with pytest.raises(ValueError, match=r"model\.layers\.0\.self_attn\.k_bmm_quantizer: --format modelopt cannot"):
        dist_export.export(kv, str(tmp_path / "b"), format="modelopt", device="cpu")
    awq, _ = quantized("llama-tiny", "int4-awq")
    with pytest.raises(ValueError, match=r"--format compressed-tensors cannot store model\.layers\.0\..*pre-quant"):
        dist_export.export(awq, str(tmp_path / "c"), format="compressed-tensors", device="cpu")
    path = str(tmp_path / "q.pt")
    dist_export.save_quantizer_state(kv, path)
    proc = run_cli("export", "--model", model_dir("synthetic:qwen3-moe-tiny"), "--quantizer-state", path, "--out",
                   str(tmp_path / "d"), "--device", "cpu", check=False)
    assert proc.returncode == 1 and "was saved from another model" in proc.stderr, proc.stderr[-2000:]
    assert len(proc.stderr.strip().splitlines()[-1]) < 400
    for d in "abcd":
        assert not (tmp_path / d).exists() or not os.listdir(tmp_path / d), d

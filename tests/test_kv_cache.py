"""KV-cache quantization (recipe `kv_cache: fp8`): calibrated K/V amax and the scales every format writes.

1. Calibration records, per attention layer, max|key| and max|value| as the attention receives them (after RoPE
   and Qwen3's k_norm): checked against an independent reference that records what torch's
   scaled_dot_product_attention receives under transformers' SDPA attention, on the same token samples.
2. Each format writes what its consumer reads (names from vLLM 0.32's and ModelOpt 0.47's loaders/exporters):
   compressed-tensors `<attn>.k_scale` F32 [1] + `kv_cache_scheme`; modelopt `<attn>.k_proj.k_scale` F32 [] +
   `kv_cache_quant_algo: FP8` / `kv_cache_scheme`; vllm-fq `<attn>.k_bmm_quantizer` state with its amax and a
   `*[kv]_bmm_quantizer` quant_cfg entry. Scale = amax / 448 exactly; `verify --source` recomputes them.
3. Bad inputs: an unknown kv_cache value, a format that cannot carry the scales, an excluded k_proj.
4. Where ModelOpt is installed (the ModelOpt venv of .ci/run): ModelOpt's own convert + restore of the vllm-fq
   state file enables the HF attention's k/v_bmm_quantizers with our amax, and ModelOpt's quantized attention
   equals the formula on the layer's key states.
"""
from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors import safe_open

FP8_MAX = 448.0


def _recipe(tmp_path, name="fp8-pc-pt-kv", exclude=None) -> str:
    path = tmp_path / f"{name}.yaml"
    lines = [f"name: {name}", "rules:", '  - match: ["*"]', "    weight: {format: fp8, granularity: channel}",
             "    input: {format: fp8, granularity: token, dynamic: true}", "kv_cache: fp8"]
    if exclude:
        lines.append(f"exclude: {json.dumps(exclude)}")
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def _reference_kv_amax(model_dir: str, samples) -> dict[str, float]:
    """max|key| / max|value| per attention layer, recorded by patching torch's scaled_dot_product_attention under
    transformers' SDPA attention (the same arithmetic as calibration; the i-th call of a forward is layer i)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16, attn_implementation="sdpa")
    layers = model.config.num_hidden_layers
    seen: dict[str, float] = {}
    calls = []
    original = torch.nn.functional.scaled_dot_product_attention

    def recording(query, key, value, *args, **kwargs):
        layer = len(calls) % layers
        calls.append(layer)
        for role, t in (("k", key), ("v", value)):
            q = f"model.layers.{layer}.self_attn.{role}_bmm_quantizer"
            seen[q] = max(seen.get(q, 0.0), t.detach().float().abs().max().item())
        return original(query, key, value, *args, **kwargs)

    torch.nn.functional.scaled_dot_product_attention = recording
    try:
        with torch.no_grad():
            for ids in samples:
                model(torch.tensor([ids]))
    finally:
        torch.nn.functional.scaled_dot_product_attention = original
    assert len(calls) == layers * len(samples)
    return seen


@pytest.mark.parametrize("model", ["synthetic:llama-tiny", "synthetic:qwen3-tiny"])
def test_calibration_records_kv_amax_after_rope(model, tmp_path, synthetic_cache):
    from dist_export.calibration.data import random_token_samples
    from dist_export.calibration.run import calibrate
    from dist_export.sources.synthetic import ensure_synthetic

    src = ensure_synthetic(model)
    got = calibrate(src, _recipe(tmp_path), str(tmp_path / "calib.safetensors"), random_tokens=True, num_samples=3, seq_len=24, seed=5)
    vocab = json.load(open(os.path.join(src, "config.json")))["vocab_size"]
    ref = _reference_kv_amax(src, random_token_samples(vocab, 3, 24, 5).samples)
    assert sorted(got) == sorted(ref) and len(ref) == 4, (sorted(got), sorted(ref))
    for name, value in ref.items():
        assert float(got[name]) == value, (name, float(got[name]), value)


@pytest.fixture(scope="module")
def kv_exports(tmp_path_factory, synthetic_cache):
    from dist_export.api import export
    from dist_export.calibration.run import calibrate
    from dist_export.sources.synthetic import ensure_synthetic

    root = tmp_path_factory.mktemp("kv")
    src = ensure_synthetic("synthetic:llama-tiny")
    recipe = _recipe(root)
    calib = str(root / "calib.safetensors")
    amax = calibrate(src, recipe, calib, random_tokens=True, num_samples=3, seq_len=24)
    outs = {}
    for fmt in ("compressed-tensors", "modelopt", "vllm-fq"):
        outs[fmt] = str(root / fmt)
        export(src, outs[fmt], recipe=recipe, format=fmt, calib=calib)
    return src, amax, outs


def _tensors(folder: str) -> dict[str, torch.Tensor]:
    found = {}
    for f in sorted(os.listdir(folder)):
        if f.endswith(".safetensors"):
            with safe_open(os.path.join(folder, f), "pt") as h:
                found.update({k: h.get_tensor(k) for k in h.keys()})
    return found


LAYERS = ("model.layers.0.self_attn", "model.layers.1.self_attn")


@pytest.mark.parametrize("fmt,name,shape", [("compressed-tensors", "{a}.{r}_scale", (1,)),
                                            ("modelopt", "{a}.{r}_proj.{r}_scale", ())])
def test_real_quant_formats_write_kv_scales(kv_exports, fmt, name, shape):
    from dist_export.verify import verify_export

    src, amax, outs = kv_exports
    tensors = _tensors(outs[fmt])
    scales = {k: v for k, v in tensors.items() if k.endswith(("k_scale", "v_scale"))}
    want = {name.format(a=a, r=r): amax[f"{a}.{r}_bmm_quantizer"] for a in LAYERS for r in "kv"}
    assert sorted(scales) == sorted(want), sorted(scales)
    for key, a in want.items():
        t = scales[key]
        assert t.dtype == torch.float32 and tuple(t.shape) == shape, (key, t.dtype, t.shape)
        assert torch.equal(t.reshape(()), (a.float() / FP8_MAX).reshape(())), (key, t, a)
    qc = json.load(open(os.path.join(outs[fmt], "config.json")))["quantization_config"]
    if fmt == "compressed-tensors":
        assert qc["kv_cache_scheme"] == {"num_bits": 8, "type": "float", "symmetric": True, "group_size": None,
                                         "strategy": "tensor", "dynamic": False, "observer": "minmax"}
    else:
        assert qc["kv_cache_scheme"] == {"dynamic": False, "num_bits": 8, "type": "float"}
        hf = json.load(open(os.path.join(outs[fmt], "hf_quant_config.json")))
        assert hf["quantization"]["kv_cache_quant_algo"] == "FP8"
    report = verify_export(outs[fmt], src)
    assert report["ok"], report["defects"]


def test_vllm_fq_state_carries_kv_quantizers(kv_exports):
    _, amax, outs = kv_exports
    state = torch.load(os.path.join(outs["vllm-fq"], "vllm_fq_modelopt_state.pth"), weights_only=True)
    qstate = state["modelopt_state_dict"][0][1]["metadata"]["quantizer_state"]
    weights = state["modelopt_state_weights"]
    for a in LAYERS:
        for r in "kv":
            q = f"{a}.{r}_bmm_quantizer"
            assert qstate[q]["_disabled"] is False and qstate[q]["_num_bits"] == (4, 3), qstate[q]
            assert qstate[q]["_dynamic"] is False and qstate[q]["_axis"] is None
            assert torch.equal(weights[q]["_amax"], amax[q].to(torch.bfloat16).reshape(())), (q, weights[q])
    entry = state["modelopt_state_dict"][0][1]["config"]["quant_cfg"][-1]
    assert entry["quantizer_name"] == "*[kv]_bmm_quantizer" and entry["enable"] is True
    assert entry["cfg"]["num_bits"] == (4, 3) and entry["cfg"]["axis"] is None
    assert not [k for k in _tensors(outs["vllm-fq"]) if "scale" in k]


def test_kv_cache_refusals(tmp_path, synthetic_cache):
    from dist_export.api import export
    from dist_export.recipe import load_recipe, recipe_from_dict
    from dist_export.sources.synthetic import ensure_synthetic

    with pytest.raises(ValueError, match=r"kv_cache 'int8' is not supported; valid: \['fp8'\]"):
        recipe_from_dict({"rules": [{"weight": {"format": "fp8"}}], "kv_cache": "int8"})
    assert "kv_cache" not in load_recipe("fp8").to_dict()  # packaged recipes keep their fingerprints
    src = ensure_synthetic("synthetic:llama-tiny")
    with pytest.raises(ValueError, match="--format fp8-block cannot carry the recipe's kv_cache"):
        export(src, str(tmp_path / "a"), recipe=_recipe(tmp_path), format="fp8-block")
    with pytest.raises(ValueError, match=r"model.layers.0.self_attn.v_proj is not quantized"):
        export(src, str(tmp_path / "b"), recipe=_recipe(tmp_path, "ex", ["*.v_proj"]), format="modelopt")
    with pytest.raises(ValueError, match="calibrate first"):
        export(src, str(tmp_path / "c"), recipe=_recipe(tmp_path), format="modelopt")
    assert not os.path.exists(tmp_path / "a") and not os.path.exists(tmp_path / "b")


def test_modelopt_restores_kv_quantizers(kv_exports):
    """ModelOpt's convert + restore (the worker's sequence, on the HF model) of the vllm-fq state: the attention's
    k/v_bmm_quantizers come up enabled, static FP8, with our amax, and quantize keys as formats.md's FP8 formula."""
    pytest.importorskip("modelopt")
    import warnings

    import modelopt.torch.quantization as mtq
    from modelopt.torch.quantization.nn import TensorQuantizer
    from transformers import LlamaForCausalLM

    from test_state_file import _fp8_reference, _restore_as_vllm_worker_does

    _, amax, outs = kv_exports
    out = outs["vllm-fq"]
    state = torch.load(os.path.join(out, "vllm_fq_modelopt_state.pth"), weights_only=True, map_location="cpu")
    file_weights = state.pop("modelopt_state_weights")
    model = LlamaForCausalLM.from_pretrained(out, dtype=torch.bfloat16).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = _restore_as_vllm_worker_does(model, state)
        mtq.utils.set_quantizer_state_dict(model, file_weights)
    for a in LAYERS:
        for r in "kv":
            q = model.get_submodule(f"{a}.{r}_bmm_quantizer")
            assert isinstance(q, TensorQuantizer) and q.is_enabled and not q._dynamic, (a, r, q)
            assert q.num_bits == (4, 3)
            assert torch.equal(q.amax, file_weights[f"{a}.{r}_bmm_quantizer"]["_amax"]), (a, r, q.amax)
    q = model.model.layers[0].self_attn.k_bmm_quantizer
    x = (torch.randn(1, 1, 8, 16) * 0.8).to(torch.bfloat16)
    with torch.no_grad():
        got = q(x).float()
    want = _fp8_reference(x, q.amax.float()).to(torch.bfloat16).float()
    assert torch.equal(got, want), (got - want).abs().max()


# ---- `--kv-cache {none,fp8}` (export, calibrate, plan): the recipe option from the command line ----

def _cli(capsys, *args) -> tuple[int, str]:
    from dist_export.cli import main

    rc = main(list(args))
    return rc, capsys.readouterr().err


def test_kv_cache_flag_writes_what_each_consumer_reads(tmp_path, capsys, synthetic_cache):
    """`calibrate --kv-cache fp8` + `export --recipe fp8-pc-pt --kv-cache fp8`: compressed-tensors config carries
    `kv_cache_scheme`, modelopt `kv_cache_quant_algo: FP8`, vllm-fq the k_bmm/v_bmm state entries; the K/V scales
    equal amax / 448 of the calibration; the record and summary say so; and every file is byte-identical to the
    export of a YAML recipe holding `kv_cache: fp8` (the packaged fp8-pc-pt plus that key)."""
    import yaml
    from safetensors.torch import load_file

    from dist_export.api import export
    from dist_export.calibration.run import calibrate
    from dist_export.recipe import available_recipes, load_recipe, resolve_recipe_path
    from dist_export.sources.synthetic import ensure_synthetic
    from helpers import folder_hashes

    assert all(load_recipe(n).kv_cache is None for n in available_recipes())  # --help: none in every packaged one
    src = ensure_synthetic("synthetic:llama-tiny")
    calib = str(tmp_path / "calib.safetensors")
    rc, err = _cli(capsys, "calibrate", "--model", src, "--recipe", "fp8-pc-pt", "--kv-cache", "fp8",
                   "--random-tokens", "--num-samples", "3", "--seq-len", "24", "--out", calib)
    assert rc == 0, err
    amax = load_file(calib)
    assert sorted(amax) == sorted(f"{a}.{r}_bmm_quantizer" for a in LAYERS for r in "kv"), sorted(amax)
    with_key = dict(yaml.safe_load(open(resolve_recipe_path("fp8-pc-pt"))), kv_cache="fp8")
    yaml_recipe = tmp_path / "fp8-pc-pt.yaml"
    yaml_recipe.write_text(yaml.safe_dump(with_key))
    yaml_calib = str(tmp_path / "calib-yaml.safetensors")
    calibrate(src, str(yaml_recipe), yaml_calib, random_tokens=True, num_samples=3, seq_len=24)
    assert folder_hashes(tmp_path)["calib.safetensors"] == folder_hashes(tmp_path)["calib-yaml.safetensors"]
    for fmt in ("compressed-tensors", "modelopt", "vllm-fq"):
        out = str(tmp_path / fmt)
        summary = str(tmp_path / f"{fmt}.json")
        rc, err = _cli(capsys, "export", "--model", src, "--recipe", "fp8-pc-pt", "--kv-cache", "fp8", "--calib",
                       calib, "--format", fmt, "--out", out, "--summary-json", summary)
        assert rc == 0, err
        assert "KV cache: fp8, static K/V scales for 2 attention layers" in err, err[-2000:]
        assert json.load(open(summary))["quantization"]["kv_cache"] == {"format": "fp8", "attention_layers": 2}
        record = json.load(open(os.path.join(out, "dist_export.json")))
        assert record["recipe"]["name"] == "fp8-pc-pt" and record["recipe"]["kv_cache"] == "fp8", record["recipe"]
        assert sorted(record["calibration"]) == sorted(amax)
        qc = json.load(open(os.path.join(out, "config.json"))).get("quantization_config")
        tensors = _tensors(out)
        if fmt == "compressed-tensors":
            assert qc["kv_cache_scheme"]["type"] == "float" and qc["kv_cache_scheme"]["num_bits"] == 8, qc
            scales = {f"{a}.{r}_bmm_quantizer": tensors[f"{a}.{r}_scale"] for a in LAYERS for r in "kv"}
        elif fmt == "modelopt":
            hf = json.load(open(os.path.join(out, "hf_quant_config.json")))
            assert hf["quantization"]["kv_cache_quant_algo"] == "FP8" and qc["kv_cache_scheme"]["num_bits"] == 8
            scales = {f"{a}.{r}_bmm_quantizer": tensors[f"{a}.{r}_proj.{r}_scale"] for a in LAYERS for r in "kv"}
        else:
            state = torch.load(os.path.join(out, "vllm_fq_modelopt_state.pth"), weights_only=True)
            qstate = state["modelopt_state_dict"][0][1]["metadata"]["quantizer_state"]
            assert all(qstate[k]["_disabled"] is False and qstate[k]["_num_bits"] == (4, 3) for k in amax)
            scales = {k: state["modelopt_state_weights"][k]["_amax"].float() * (1 / FP8_MAX) for k in amax}
        for k, a in amax.items():  # vllm-fq holds the amax in the model dtype: compare in it
            want = a.float() / FP8_MAX if fmt != "vllm-fq" else a.to(torch.bfloat16).float() * (1 / FP8_MAX)
            assert torch.equal(scales[k].reshape(()).float(), want.reshape(())), (fmt, k, scales[k], a)
        by_yaml = str(tmp_path / f"{fmt}-yaml")
        export(src, by_yaml, recipe=str(yaml_recipe), format=fmt, calib=yaml_calib)
        got, want = folder_hashes(out), folder_hashes(by_yaml)
        assert got.keys() == want.keys() and {k for k in got if got[k] != want[k]} <= {"dist_export.json"}
        a, b = (json.load(open(os.path.join(p, "dist_export.json"))) for p in (out, by_yaml))
        assert a["recipe"] == b["recipe"] and a["calibration"] == b["calibration"]


def test_kv_cache_flag_refusals(tmp_path, capsys, synthetic_cache):
    from dist_export.api import export
    from dist_export.options import ExportOptions
    from dist_export.sources.synthetic import ensure_synthetic

    src = ensure_synthetic("synthetic:llama-tiny")
    with pytest.raises(SystemExit) as e:
        _cli(capsys, "export", "--model", src, "--kv-cache", "int8", "--out", str(tmp_path / "x"))
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--kv-cache: invalid choice: 'int8'" in err[0] and "'none', 'fp8'" in err[0], err
    with pytest.raises(ValueError, match=r"kv_cache 'int8' is not supported; valid: \['none', 'fp8'\]"):
        export(src, str(tmp_path / "y"), recipe="fp8-pc-pt", kv_cache="int8")
    with pytest.raises(ValueError, match="the model's quantizers decide its KV cache"):
        ExportOptions(quantizer_state="q.pt", kv_cache="fp8")

    def refused(*args) -> str:
        rc, err = _cli(capsys, *args)
        lines = err.strip().splitlines()
        assert rc == 1 and len(lines) == 1 and lines[0].startswith("[rank 0] error: "), (rc, err)
        return lines[0]

    from dist_export.cli import main

    assert main(["plan", "--model", src, "--recipe", "fp8-pc-pt", "--kv-cache", "fp8", "--format", "modelopt",
                 "--world-size", "2", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["kv_cache"] == "fp8"
    line = refused("plan", "--model", src, "--recipe", "fp8-pc-pt", "--kv-cache", "fp8", "--format", "fp8-block")
    assert "--format fp8-block cannot carry" in line, line
    out = str(tmp_path / "z")
    line = refused("export", "--model", src, "--recipe", "fp8-pc-pt", "--kv-cache", "fp8", "--out", out)
    assert "quantizes the KV cache: calibrate first with" in line and "--recipe fp8-pc-pt --kv-cache fp8" in line
    line = refused("export", "--model", src, "--recipe", "fp8-block", "--kv-cache", "fp8", "--format", "fp8-block",
                   "--out", out)
    assert "--format fp8-block cannot carry" in line and "--kv-cache none" in line, line
    line = refused("calibrate", "--model", src, "--recipe", "fp8-pc-pt", "--random-tokens", "--out",
                   str(tmp_path / "c.safetensors"))
    assert "needs no calibration (--kv-cache fp8 would calibrate its KV cache)" in line, line
    calib = str(tmp_path / "no-kv.safetensors")  # a static recipe calibrated without the KV cache ...
    assert _cli(capsys, "calibrate", "--model", src, "--recipe", "fp8", "--random-tokens", "--num-samples", "2",
                "--seq-len", "16", "--out", calib)[0] == 0
    line = refused("export", "--model", src, "--recipe", "fp8", "--kv-cache", "fp8", "--calib", calib, "--out", out)
    assert "with its KV cache" in line and "calibrate again with --recipe fp8 --kv-cache fp8" in line, line
    assert not os.path.exists(out) and not os.path.exists(tmp_path / "c.safetensors")
    # ... exports with that file under --kv-cache none; and none switches a recipe's own kv_cache off
    assert _cli(capsys, "export", "--model", src, "--recipe", "fp8", "--kv-cache", "none", "--calib", calib,
                "--format", "compressed-tensors", "--out", out)[0] == 0
    assert json.load(open(os.path.join(out, "config.json")))["quantization_config"]["kv_cache_scheme"] is None
    off = str(tmp_path / "off")
    export(src, off, recipe=_recipe(tmp_path), kv_cache="none", format="modelopt")  # dynamic: no calibration
    assert json.load(open(os.path.join(off, "hf_quant_config.json")))["quantization"].get("kv_cache_quant_algo") \
        is None
    assert "kv_cache" not in json.load(open(os.path.join(off, "dist_export.json")))["recipe"]
    assert not [k for k in _tensors(off) if k.endswith(("k_scale", "v_scale"))]

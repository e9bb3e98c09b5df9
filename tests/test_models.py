"""Every model layout: more architectures, in-memory models (fused experts, accelerate CPU/disk offload),
the caller's model left untouched (also when the export fails), and tied weights written once."""
from __future__ import annotations

import os

import pytest
import torch

from helpers import assert_same_export_of_other_source, model_dir
from expected import expected_folds, read_all

ARCHS = ["synthetic:qwen3-tiny", "synthetic:mixtral-tiny", "synthetic:deepseek-v3-tiny", "synthetic:gpt-oss-tiny",
         "synthetic:llama-small"]
RECIPES = ["int4-w4a16", "fp8-block", "nvfp4"]


@pytest.mark.parametrize("model", ARCHS)
def test_architecture_exports_every_recipe(model, tmp_path):
    from transformers import AutoModelForCausalLM

    from dist_export.api import export
    from dist_export.calibration.run import calibrate
    from dist_export.recipe import load_recipe
    from dist_export.verify import verify_export

    src = model_dir(model)
    source = read_all(src)
    for recipe in RECIPES:
        calib = None
        if recipe == "nvfp4":
            calib = str(tmp_path / "calib.safetensors")
            calibrate(src, load_recipe(recipe), calib, random_tokens=True, num_samples=2, seq_len=16)
        out = str(tmp_path / recipe)
        export(src, out, recipe=recipe, calib=calib)
        got = read_all(out)
        want, quantized = expected_folds(source, recipe)
        changed = {n for n in source if not torch.equal(got[n], source[n])}
        assert changed == set(quantized), (recipe, sorted(changed ^ set(quantized))[:5])
        assert not any(k in n for n in quantized for k in ("embed", "lm_head", "norm", "mlp.gate.", "block_sparse_moe.gate"))
        for n in source:
            assert torch.equal(got[n], want[n]), (recipe, n)
        _, info = AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
        assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
        report = verify_export(out, source_dir=src)
        assert report["ok"], report["defects"]


def _without_tokenizer(src: str, tmp_path) -> str:
    """A copy of checkpoint `src` without its tokenizer: an in-memory model carries none, so its export is
    compared with the export of this copy."""
    import shutil

    bare = tmp_path / "bare"
    shutil.copytree(src, bare, ignore=shutil.ignore_patterns("tokenizer*"))
    return str(bare)


def _export_memory(model, out, **kw):
    import dist_export

    return dist_export.export(model, out, **kw)


def _snapshot(model) -> dict:
    """Every parameter and buffer value (offloaded ones through accelerate's weights_map) and quantizer-free
    flags, to prove the export leaves the model exactly as it was."""
    from dist_export.sources.memory import model_tensor

    state = {k: model_tensor(model, k).detach().clone() for k in model.state_dict()}
    flags = {n: (m.training, type(m).__name__) for n, m in model.named_modules()}
    devices = {n: p.device.type for n, p in model.named_parameters()}
    return {"state": state, "flags": flags, "devices": devices}


def _same(a: dict, b: dict) -> bool:
    return (a["flags"] == b["flags"] and a["devices"] == b["devices"]
            and all(torch.equal(a["state"][k].view(torch.uint8), b["state"][k].view(torch.uint8)) for k in a["state"]))


def test_in_memory_fused_experts_equal_saved_checkpoint(tmp_path):
    from transformers import AutoModelForCausalLM

    from dist_export.api import export

    src = model_dir("synthetic:qwen3-moe-tiny")
    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.bfloat16)
    assert model.model.layers[0].mlp.experts.gate_up_proj.dim() == 3  # fused in memory
    before = _snapshot(model)
    _export_memory(model, str(tmp_path / "mem"), recipe="nvfp4-w4a16")
    model.save_pretrained(str(tmp_path / "saved"))
    export(str(tmp_path / "saved"), str(tmp_path / "disk"), recipe="nvfp4-w4a16")
    assert_same_export_of_other_source(str(tmp_path / "mem"), str(tmp_path / "disk"))
    assert _same(before, _snapshot(model))


def test_offloaded_model_exports_like_its_checkpoint_and_stays_untouched(tmp_path):
    from transformers import AutoModelForCausalLM

    from dist_export.api import export
    from dist_export.runtime.faults import Fault

    src = model_dir("synthetic:qwen3-moe-small")
    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.bfloat16, device_map="auto",
                                                 max_memory={"cpu": "20MB"}, offload_folder=str(tmp_path / "off"))
    placed = set(model.hf_device_map.values())
    assert {"cpu", "disk"} <= placed, placed
    assert any(p.device.type == "meta" for p in model.parameters())
    before = _snapshot(model)
    # an injected failure halfway leaves the model as it was, and no index
    with pytest.raises(RuntimeError, match="injected fault"):
        _export_memory(model, str(tmp_path / "failed"), recipe="int4-w4a16", max_shard_size="4MB",
                       fault=Fault("raise", 0, 20))
    assert not os.path.exists(tmp_path / "failed" / "model.safetensors.index.json")
    assert _same(before, _snapshot(model))
    _export_memory(model, str(tmp_path / "mem"), recipe="int4-w4a16", max_shard_size="4MB")
    export(_without_tokenizer(src, tmp_path), str(tmp_path / "disk"), recipe="int4-w4a16", max_shard_size="4MB")
    assert_same_export_of_other_source(str(tmp_path / "mem"), str(tmp_path / "disk"))
    assert _same(before, _snapshot(model))


def test_unresolvable_meta_weight_is_an_error_naming_it(tmp_path):
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(model_dir("synthetic:llama-tiny"))
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    with pytest.raises(ValueError, match=r"model\.embed_tokens\.weight: the parameter is on the meta device"):
        _export_memory(model, str(tmp_path / "o"), recipe="int4-w4a16")
    assert not os.path.exists(tmp_path / "o" / "model.safetensors")


def test_tied_weights_written_once_and_side_files_copied(tmp_path):
    import json
    import shutil

    from dist_export.api import export

    src = str(tmp_path / "src")
    shutil.copytree(model_dir("synthetic:llama-tiny"), src)  # tie_word_embeddings=True: no lm_head tensor
    with open(os.path.join(src, "config.json")) as f:
        config = json.load(f)
    config["auto_map"] = {"AutoModelForCausalLM": "modeling_custom.CustomForCausalLM"}
    with open(os.path.join(src, "config.json"), "w") as f:
        json.dump(config, f)
    with open(os.path.join(src, "modeling_custom.py"), "w") as f:
        f.write("# remote code\n")
    with open(os.path.join(src, "tokenizer_config.json"), "w") as f:
        f.write("{}\n")
    export(src, str(tmp_path / "out"), recipe="int4-w4a16")
    got = read_all(str(tmp_path / "out"))
    assert "lm_head.weight" not in got and "model.embed_tokens.weight" in got
    with open(tmp_path / "out" / "config.json") as f:
        assert json.load(f)["auto_map"] == config["auto_map"]
    assert (tmp_path / "out" / "modeling_custom.py").read_text() == "# remote code\n"
    assert (tmp_path / "out" / "tokenizer_config.json").exists()
    # a dangling auto_map (its .py missing) is removed rather than left for vLLM to trip on
    os.unlink(os.path.join(src, "modeling_custom.py"))
    export(src, str(tmp_path / "out2"), recipe="int4-w4a16")
    with open(tmp_path / "out2" / "config.json") as f:
        assert "auto_map" not in json.load(f)


def test_in_memory_model_calibrated_in_place_uses_its_input_amax(tmp_path):
    """A model that already carries calibrated input quantizers (ModelOpt-style `<linear>.input_quantizer._amax`
    buffers) exports without --calib, with those amax in the state file and no quantizer tensor written."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir("synthetic:llama-tiny"))
    linears = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n != "lm_head"]
    for i, name in enumerate(linears):
        quantizer = torch.nn.Module()
        quantizer.register_buffer("_amax", torch.tensor(1.0 + i / 8))
        model.get_submodule(name).add_module("input_quantizer", quantizer)
    _export_memory(model, str(tmp_path / "o"), recipe="fp8")
    got = read_all(str(tmp_path / "o"))
    assert not any("quantizer" in k or "amax" in k for k in got)
    state = torch.load(tmp_path / "o" / "vllm_fq_modelopt_state.pth", weights_only=True)
    for i, name in enumerate(linears):
        amax = state["modelopt_state_weights"][f"{name}.input_quantizer"]["_amax"]
        assert float(amax) == 1.0 + i / 8, name  # exact in every float dtype for these values
    # a pre-quant scale (AWQ/SmoothQuant) would change the weights: refused with a message
    model.get_submodule(linears[0]).input_quantizer.register_buffer("_pre_quant_scale", torch.ones(64))
    with pytest.raises(ValueError, match="pre-quant scale"):
        _export_memory(model, str(tmp_path / "p"), recipe="fp8")


def test_unrouted_experts_still_quantized_and_calibrated(tmp_path, caplog):
    """One calibration token reaches 2 of 8 experts per layer: every expert's weights are still folded from its
    own weights, and unrouted experts get the layer's input amax (logged), never a missing one."""
    import logging

    from safetensors import safe_open

    from dist_export.api import export
    from dist_export.calibration.run import calibrate
    from dist_export.recipe import load_recipe

    src = model_dir("synthetic:qwen3-moe-tiny")
    calib = str(tmp_path / "calib.safetensors")
    with caplog.at_level(logging.WARNING):
        calibrate(src, load_recipe("nvfp4"), calib, random_tokens=True, num_samples=1, seq_len=1)
    assert any("got no calibration tokens" in r.message for r in caplog.records)
    with safe_open(calib, "pt") as f:
        amax = {k: f.get_tensor(k) for k in f.keys()}
    for layer in (0, 1):
        down = [amax[f"model.layers.{layer}.mlp.experts.{e}.down_proj.input_quantizer"] for e in range(8)]
        assert all(torch.isfinite(a) and a > 0 for a in down)
        assert len({float(a) for a in down}) < 8  # the unrouted ones share the layer max
    export(src, str(tmp_path / "out"), recipe="nvfp4", calib=calib)
    source, got = read_all(src), read_all(str(tmp_path / "out"))
    want, quantized = expected_folds(source, "nvfp4")
    experts = [n for n in quantized if ".experts." in n]
    assert len(experts) == 48
    for n in experts:
        assert torch.equal(got[n], want[n]) and not torch.equal(got[n], source[n]), n


def test_shared_and_per_expert_quantizers_match_reference(tmp_path):
    """Experts of very different magnitudes (up to 16x apart): a recipe sharing one weight amax over all
    experts of a layer and one giving each expert its own both equal the independent reference."""
    import yaml

    from dist_export.api import export

    src = model_dir("synthetic:qwen3-moe-tiny")
    source = read_all(src)
    for name, share in (("per-expert", []), ("shared-experts", ["experts"])):
        recipe = {"name": name, "rules": [{"match": ["*"], "weight": {"format": "nvfp4"}}],
                  "share_weight_amax": share}
        (tmp_path / f"{name}.yaml").write_text(yaml.safe_dump(recipe))
        out = str(tmp_path / name)
        export(src, out, recipe=str(tmp_path / f"{name}.yaml"))
        got = read_all(out)
        want, quantized = expected_folds(source, recipe)
        for n in quantized:
            assert torch.equal(got[n], want[n]), (name, n)
    assert not torch.equal(read_all(str(tmp_path / "per-expert"))["model.layers.0.mlp.experts.0.down_proj.weight"],
                           read_all(str(tmp_path / "shared-experts"))["model.layers.0.mlp.experts.0.down_proj.weight"])


def test_calibrate_from_text_and_jsonl_with_the_models_tokenizer(tmp_path):
    """`calibrate --data` tokenizes a text or JSONL file with the tokenizer saved in the model folder."""
    import json
    import shutil

    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from helpers import run_cli

    src = str(tmp_path / "model")
    shutil.copytree(model_dir("synthetic:llama-tiny"), src)
    words = [f"w{i}" for i in range(200)]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(["[UNK]", *words])}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]").save_pretrained(src)
    text = tmp_path / "data.txt"
    text.write_text("\n".join(" ".join(words[i:i + 20]) for i in range(0, 180, 20)))
    jsonl = tmp_path / "data.jsonl"
    jsonl.write_text("\n".join(json.dumps({"text": " ".join(words[i:i + 20])}) for i in range(0, 180, 20)))
    for data in (text, jsonl):
        out = tmp_path / f"calib-{data.suffix[1:]}.safetensors"
        run_cli("calibrate", "--model", src, "--recipe", "fp8", "--data", str(data), "--num-samples", "4",
                "--out", str(out))
        run_cli("export", "--model", src, "--recipe", "fp8", "--calib", str(out), "--out",
                str(tmp_path / f"out-{data.suffix[1:]}"))
    # the exported folder carries the tokenizer
    assert (tmp_path / "out-txt" / "tokenizer.json").exists()
    # an empty data file is refused with a clear message
    empty = tmp_path / "empty.txt"
    empty.write_text("\n")
    proc = run_cli("calibrate", "--model", src, "--recipe", "fp8", "--data", str(empty), "--out",
                   str(tmp_path / "c.safetensors"), check=False)
    assert proc.returncode == 1 and "holds no text" in proc.stderr.strip().splitlines()[-1]


def test_in_memory_gpt_oss_stacks_equal_saved_checkpoint(tmp_path):
    """GPT-OSS keeps experts stacked [E, in, out] in memory and on disk: exported per expert slice either way."""
    from transformers import AutoModelForCausalLM

    from dist_export.api import export

    src = model_dir("synthetic:gpt-oss-tiny")
    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.bfloat16)
    before = _snapshot(model)
    _export_memory(model, str(tmp_path / "mem"), recipe="int4-w4a16")
    export(_without_tokenizer(src, tmp_path), str(tmp_path / "disk"), recipe="int4-w4a16")
    assert_same_export_of_other_source(str(tmp_path / "mem"), str(tmp_path / "disk"))
    assert _same(before, _snapshot(model))
    with pytest.raises(ValueError, match="cannot store stacked 3-D experts"):
        export(src, str(tmp_path / "real"), recipe="fp8-block", format="fp8-block")


def test_experts_stored_as_numbered_weights_are_each_quantized(tmp_path):
    """Experts kept as `experts.weight0..weightN` under one module: each is a work item of its own."""
    import json

    from safetensors.torch import load_file, save_file

    from dist_export.api import export
    from numerics_reference import ref_compute_amax, ref_fake_quant

    src = str(tmp_path / "src")
    import shutil

    shutil.copytree(model_dir("synthetic:llama-tiny"), src)
    tensors = load_file(os.path.join(src, "model.safetensors"))
    g = torch.Generator().manual_seed(0)
    for e in range(3):
        tensors[f"model.layers.0.mlp.experts.weight{e}"] = (torch.randn(32, 64, generator=g) * 2.0 ** e).bfloat16()
    save_file(tensors, os.path.join(src, "model.safetensors"), metadata={"format": "pt"})
    export(src, str(tmp_path / "out"), recipe="int4-w4a16")
    got = read_all(str(tmp_path / "out"))
    for e in range(3):
        w = tensors[f"model.layers.0.mlp.experts.weight{e}"]
        want = ref_fake_quant(w, "int4", "group", 128, ref_compute_amax(w, "int4", "group", 128))
        assert torch.equal(got[f"model.layers.0.mlp.experts.weight{e}"], want)
    state = torch.load(tmp_path / "out" / "vllm_fq_modelopt_state.pth", weights_only=True)
    assert "model.layers.0.mlp.experts.0.input_quantizer" in state["modelopt_state_weights"]
    assert json.load(open(tmp_path / "out" / "config.json"))


def test_make_model_writes_a_real_tokenizer_and_exports_carry_it(tmp_path, synthetic_cache):
    """make-model's tokenizer loads with transformers' AutoTokenizer, round-trips text with ids inside the model's
    vocabulary and bos/eos as config.json names them; an export copies its files byte for byte."""
    from transformers import AutoConfig, AutoTokenizer

    from dist_export.api import export
    from dist_export.sources.synthetic import ensure_synthetic

    src = ensure_synthetic("synthetic:llama-tiny")
    tok = AutoTokenizer.from_pretrained(src)
    config = AutoConfig.from_pretrained(src)
    ids = tok("The lazy dog, 42 times!")["input_ids"]
    assert len(ids) > 3 and max(ids) < config.vocab_size
    assert tok.decode(ids, skip_special_tokens=True) == "The lazy dog, 42 times!"
    assert (tok.bos_token_id, tok.eos_token_id) == (config.bos_token_id, config.eos_token_id) == (1, 2)
    out = tmp_path / "out"
    export(src, str(out), recipe="int8-w8a16", format="vllm-fq")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        assert (out / name).read_bytes() == open(os.path.join(src, name), "rb").read(), name

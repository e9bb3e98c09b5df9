"""Inputs a hostile or careless author can write (issue 13, item 6): each is validated where it enters (source
headers and index, config.json, recipe YAML, command-line values, calibration files) and ends in one line naming
the file or key and the fix, a non-zero exit, nothing published, and no file outside `--out` touched. Legal but
odd recipes (a rule that matches nothing, a recipe that quantizes nothing) export with a warning. NaN/inf in a
copied tensor is refused unless --allow-nonfinite.

Runs `dist-export export` in this process (`dist_export.cli.main`): every check here happens before a tensor is
quantized, so a subprocess per case would only add interpreter starts. docs/bad-inputs.md lists the cases.
"""
from __future__ import annotations

import json
import os
import struct
import time

import pytest
from safetensors.torch import save_file

from test_safety import copy_model, export, published, refused, tree

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"


# ----------------------------------------------------------------------------------------------- helpers


def outside(tmp_path) -> dict:
    """Every file and folder under tmp_path except the output folder (what a refused export must not touch)."""
    return {k: v for k, v in tree(tmp_path).items() if k != "out" and not k.startswith("out" + os.sep)}


def assert_refused_untouched(tmp_path, rc: int, err: str, before: dict, *names: str) -> str:
    """One error line naming `names`, non-zero exit, nothing published, every file outside --out unchanged."""
    line = refused(rc, err, *names)
    out = tmp_path / "out"
    assert not published(out)
    leftovers = [f for _, _, files in os.walk(out) for f in files if f.endswith((".tmp", ".staged", ".safetensors"))]
    assert not leftovers, leftovers
    assert outside(tmp_path) == before
    return line


def edit_header(src: str, edit) -> None:
    """Rewrite the JSON header of src/model.safetensors with `edit(header)` (the data bytes unchanged)."""
    path = os.path.join(src, SINGLE)
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
        data = f.read()
    edit(header)
    raw = json.dumps(header).encode()
    raw += b" " * ((-len(raw)) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw + data)


def first_weight(header: dict) -> str:
    return sorted(k for k in header if k.endswith("k_proj.weight"))[0]


def bad_source(tmp_path, capsys, *names, edit=None, mutate=None, recipe="int4-w4a16") -> str:
    src = copy_model(tmp_path)
    if edit is not None:
        edit_header(src, edit)
    if mutate is not None:
        mutate(src)
    before = outside(tmp_path)
    rc, err = export(capsys, tmp_path / "out", model=src, recipe=recipe)
    return assert_refused_untouched(tmp_path, rc, err, before, *names)


# --------------------------------------------------------------------------------- source headers, index


def test_header_shape_an_int(tmp_path, capsys):
    def edit(h):
        h[first_weight(h)]["shape"] = 2048

    bad_source(tmp_path, capsys, SINGLE, "k_proj.weight", "shape 2048", "re-download", edit=edit)


def test_header_dtype_a_list(tmp_path, capsys):
    def edit(h):
        h[first_weight(h)]["dtype"] = ["BF16"]

    bad_source(tmp_path, capsys, SINGLE, "k_proj.weight", "dtype ['BF16']", "valid:", edit=edit)


def test_header_float_data_offsets(tmp_path, capsys):
    """Float offsets used to pass the plan and fail on the reader thread (a traceback from a slice index)."""
    def edit(h):
        h[first_weight(h)]["data_offsets"] = [float(x) for x in h[first_weight(h)]["data_offsets"]]

    bad_source(tmp_path, capsys, SINGLE, "data_offsets", "not two integers", "re-download", edit=edit)


def _index(weight_map):
    def mutate(src: str) -> None:
        with open(os.path.join(src, INDEX), "w") as f:
            json.dump({"metadata": {}, "weight_map": weight_map}, f)
    return mutate


@pytest.mark.parametrize("weight_map,got", [(None, "got null"), (["model.safetensors"], '["model.safetensors"]'),
                                            ({}, "got {}")])
def test_index_weight_map_not_an_object(tmp_path, capsys, weight_map, got):
    bad_source(tmp_path, capsys, INDEX, "weight_map must be a non-empty object", got, "fix " + INDEX,
               mutate=_index(weight_map))


def test_index_weight_map_value_not_a_file_name(tmp_path, capsys):
    bad_source(tmp_path, capsys, INDEX, "weight_map['a.weight'] is 3", "not a file name", "fix " + INDEX,
               mutate=_index({"a.weight": 3}))


def test_index_not_an_object(tmp_path, capsys):
    def mutate(src):
        with open(os.path.join(src, INDEX), "w") as f:
            json.dump(["model.safetensors"], f)

    bad_source(tmp_path, capsys, INDEX, "got a JSON list", "fix " + INDEX, mutate=mutate)


def test_empty_checkpoint_refused(tmp_path, capsys):
    """A checkpoint with 0 tensors used to export an empty model with exit 0."""
    def mutate(src):
        save_file({}, os.path.join(src, SINGLE), metadata={"format": "pt"})

    bad_source(tmp_path, capsys, "holds no tensors", SINGLE, "nothing to export", mutate=mutate)


@pytest.mark.parametrize("text,kind", [('[{"model_type": "llama"}]', "list"), ('"llama"', "str")])
def test_config_json_not_an_object(tmp_path, capsys, text, kind):
    """A config.json holding a list was an AttributeError traceback (earlier: read as {})."""
    def mutate(src):
        with open(os.path.join(src, "config.json"), "w") as f:
            f.write(text)

    bad_source(tmp_path, capsys, "config.json", f"holds a JSON {kind}, not an object", "restore", mutate=mutate)


def test_config_json_not_json(tmp_path, capsys):
    def mutate(src):
        with open(os.path.join(src, "config.json"), "w") as f:
            f.write("{model_type: llama")

    bad_source(tmp_path, capsys, "config.json", "is not valid JSON", "restore", mutate=mutate)


# ------------------------------------------------------------------------------------------------ recipes


INT4 = "  - match: ['*']\n    weight: {format: int4, granularity: group, block_size: 128}\n"


def bad_recipe(tmp_path, capsys, text: str, *names: str) -> str:
    path = tmp_path / "r.yaml"
    path.write_text(text)
    before = outside(tmp_path)
    rc, err = export(capsys, tmp_path / "out", recipe=str(path))
    return assert_refused_untouched(tmp_path, rc, err, before, str(path), *names)


@pytest.mark.parametrize("value", ["true", "128.0", "'128'", "0"])
def test_recipe_block_size_must_be_a_positive_int(tmp_path, capsys, value):
    """`block_size: true` was a TypeError traceback from torch (True passed as an int)."""
    bad_recipe(tmp_path, capsys, "rules:\n  - match: ['*']\n    weight: {format: int4, granularity: group, "
               f"block_size: {value}}}\n", "rules[0].weight", "block_size must be a positive integer")


@pytest.mark.parametrize("value", ["0", "2.5", "true"])
def test_recipe_mse_candidates_must_be_a_positive_int(tmp_path, capsys, value):
    bad_recipe(tmp_path, capsys, "rules:\n  - match: ['*']\n    weight: {format: int4, granularity: group, "
               f"block_size: 128, scale_search: mse, mse_candidates: {value}}}\n",
               "mse_candidates must be a positive integer")


@pytest.mark.parametrize("value", ["'false'", "0", "'no'"])
def test_recipe_dynamic_must_be_a_yaml_boolean(tmp_path, capsys, value):
    """`dynamic: "false"` was read as dynamic (bool of a non-empty string)."""
    bad_recipe(tmp_path, capsys, "rules:\n  - match: ['*']\n    weight: {format: fp8}\n"
               f"    input: {{format: fp8, granularity: token, dynamic: {value}}}\n",
               "rules[0].input", "dynamic must be true or false")


def test_recipe_default_exclude_must_be_a_yaml_boolean(tmp_path, capsys):
    """`default_exclude: "false"` was read as true."""
    bad_recipe(tmp_path, capsys, "default_exclude: 'false'\nrules:\n" + INT4, "default_exclude must be true or false")


@pytest.mark.parametrize("key,value", [("name", "[a, b]"), ("description", "{a: 1}"), ("kv_cache", "[fp8]")])
def test_recipe_strings_must_be_strings(tmp_path, capsys, key, value):
    bad_recipe(tmp_path, capsys, f"{key}: {value}\nrules:\n" + INT4, key)


def test_recipe_format_must_be_a_string(tmp_path, capsys):
    bad_recipe(tmp_path, capsys, "rules:\n  - match: ['*']\n    weight: {format: [int4]}\n",
               "format must be a string")


def test_recipe_not_a_mapping(tmp_path, capsys):
    bad_recipe(tmp_path, capsys, "- rules\n- int4\n", "is a YAML list, not a mapping")


def test_recipe_anchor_expansion_bounded(tmp_path, capsys):
    """About 400 bytes of nested aliases that stand for 10^9 values (the issue's 254 MB record came from a
    smaller one): refused while still a node graph, at once."""
    levels = ["&a [x, x, x, x, x, x, x, x, x, x]"]
    for i in range(1, 9):
        levels.append(f"&{chr(97 + i)} [" + ", ".join([f"*{chr(96 + i)}"] * 10) + "]")
    text = "description: [" + ", ".join(levels) + "]\nrules:\n" + INT4
    assert len(text) < 600
    t0 = time.monotonic()
    bad_recipe(tmp_path, capsys, text, "expand to more than 100000 YAML values", "without nested aliases")
    assert time.monotonic() - t0 < 10


def test_recipe_larger_than_the_bound(tmp_path, capsys):
    bad_recipe(tmp_path, capsys, "# " + "x" * (1 << 20) + "\nrules:\n" + INT4, "more than the 1048576",
               "a recipe may have")


def test_recipe_aliases_below_the_bound_still_load(tmp_path):
    """Anchors themselves are legal: a shared weight spec loads as if written out."""
    from dist_export.recipe import load_recipe

    path = tmp_path / "r.yaml"
    path.write_text("rules:\n  - match: ['*q_proj']\n    weight: &w {format: int4, granularity: group, "
                    "block_size: 128}\n  - match: ['*']\n    weight: *w\n")
    recipe = load_recipe(str(path))
    assert recipe.rules[0].weight == recipe.rules[1].weight
    assert recipe.rules[1].weight.block_size == 128


# ------------------------------------------------------------------------------------- command line values


@pytest.mark.parametrize("option", ["--hang-timeout", "--dead-timeout"])
@pytest.mark.parametrize("value", ["0", "-1", "nan", "inf"])
def test_timeouts_must_be_positive_and_finite(tmp_path, capsys, option, value):
    """nan and inf used to be accepted (nan <= 0 is false): a monitor that never calls a rank hung or dead."""
    before = outside(tmp_path)
    rc, err = export(capsys, tmp_path / "out", option, value)
    assert_refused_untouched(tmp_path, rc, err, before, option[2:].replace("-", "_"),
                             "must be a positive, finite number of seconds")


# ------------------------------------------------------------------------ legal but odd recipes: warnings


def warned(tmp_path, capsys, text: str, *names: str) -> str:
    """The export succeeds and warns once about the recipe, at plan time (before the plan line, so before any write), in a line
    naming `names`; nothing outside --out changes."""
    path = tmp_path / "r.yaml"
    path.write_text(text)
    before = outside(tmp_path)
    rc, err = export(capsys, tmp_path / "out", recipe=str(path))
    assert rc == 0 and published(tmp_path / "out"), err[-2000:]
    lines = [ln for ln in err.splitlines() if " WARNING " in ln and "recipe '" in ln]  # the recipe's warnings
    assert len(lines) == 1 and all(n in lines[0] for n in names), err[-3000:]
    plan_line = next(i for i, ln in enumerate(err.splitlines()) if " plan: " in ln)
    assert err.splitlines().index(lines[0]) < plan_line, err[-3000:]
    assert outside(tmp_path) == before
    return lines[0]


def test_rule_matching_no_module_warns(tmp_path, capsys):
    warned(tmp_path, capsys, "rules:\n  - match: ['*.no_such_proj']\n    weight: {format: fp8}\n" + INT4,
           "rules[0] (match ['*.no_such_proj']) matches no module of this model", "without '.weight'")


def test_rule_shadowed_by_an_earlier_one_warns(tmp_path, capsys):
    warned(tmp_path, capsys, "rules:\n" + INT4 + "  - match: ['*q_proj']\n    weight: {format: fp8}\n",
           "rules[1] (match ['*q_proj']) decides no module", "taken by an earlier rule")


def test_exclude_pattern_matching_no_module_warns(tmp_path, capsys):
    warned(tmp_path, capsys, "exclude: ['*.no_such_proj']\nrules:\n" + INT4,
           "exclude pattern '*.no_such_proj' matches no module of this model")


def test_recipe_that_quantizes_nothing_warns(tmp_path, capsys):
    """Every weight excluded: a legal export (a re-shard), but a copy the user may not have meant; a warning
    before anything is written (warning, not error: re-sharding a model is a use), and the weights are the
    source's, bit for bit."""
    import glob

    import torch
    from safetensors.torch import load_file

    line = warned(tmp_path, capsys, "exclude: ['*']\nrules:\n" + INT4, "quantizes nothing",
                  "weight modules of this model are excluded", "unquantized copy")
    assert "'*'" in line

    def weights(folder):
        return {k: v for f in glob.glob(os.path.join(folder, "*.safetensors")) for k, v in load_file(f).items()}

    from helpers import model_dir

    got, want = weights(str(tmp_path / "out")), weights(model_dir("synthetic:llama-tiny"))
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)


# ------------------------------------------------------------------- NaN / inf in copied (unquantized) tensors


def _poison(name: str, value: float, at: int = 3):
    """mutate(src): set element `at` of tensor `name` in src/model.safetensors to `value`."""
    def mutate(src: str) -> None:
        from safetensors.torch import load_file

        from test_bad_inputs import rewrite_tensor

        t = load_file(os.path.join(src, SINGLE))[name].clone()
        t.view(-1)[at] = value
        rewrite_tensor(src, SINGLE, name, t)
    return mutate


@pytest.mark.parametrize("name,value,counts", [("model.norm.weight", float("nan"), "1 NaN and 0 inf"),
                                               ("model.embed_tokens.weight", float("-inf"), "0 NaN and 1 inf")])
def test_nonfinite_copied_tensor_refused(tmp_path, capsys, name, value, counts):
    """A norm (1-D) and the embedding (excluded by default) are copied, not quantized: NaN/inf in them used to
    pass into the export silently; now one line naming the tensor and the option, before anything is published."""
    bad_source(tmp_path, capsys, f"copied tensor {name!r} has {counts} values", "fix the source checkpoint",
               "--allow-nonfinite", mutate=_poison(name, value))


EXCLUDED_FP8 = "model.layers.0.self_attn.q_a_proj.weight"  # stored FP8-block, excluded: decoded, then copied


def test_nonfinite_excluded_weight_of_a_quantized_source_refused(tmp_path, capsys):
    """An excluded weight of an FP8-block source is decoded on the device, not by the reader, and was copied
    unchecked: a NaN block scale put 'NaN' into the export. Now the decoded tensor is checked (one line, nothing
    published, nothing outside --out touched); --allow-nonfinite copies it as the source reader decodes it."""
    import torch
    from safetensors.torch import load_file

    from dist_export.sources.checkpoint import SourceCheckpoint
    from dist_export.sources.synthetic import make_model

    src = make_model("deepseek-v3", "tiny", str(tmp_path / "src"), source_format="fp8-block")
    _poison(EXCLUDED_FP8 + "_scale_inv", float("nan"), at=0)(src)
    recipe = tmp_path / "r.yaml"
    recipe.write_text("name: r\nrules:\n  - match: ['*']\n    weight: {format: int8, granularity: channel}\n"
                      "exclude: ['model.layers.0.*']\n")
    source = SourceCheckpoint(src)
    want = source.read(source.tensors[EXCLUDED_FP8]).to("cpu")  # the source reader's own decoding
    n_nan = int(torch.isnan(want).sum())
    assert n_nan > 0 and not torch.isinf(want).any()
    before = outside(tmp_path)
    rc, err = export(capsys, tmp_path / "out", model=src, recipe=str(recipe))
    assert_refused_untouched(tmp_path, rc, err, before, f"copied tensor {EXCLUDED_FP8!r} has {n_nan} NaN and 0 inf",
                             "--allow-nonfinite")
    rc, err = export(capsys, tmp_path / "out", "--allow-nonfinite", "--overwrite", model=src, recipe=str(recipe))
    assert rc == 0, err[-2000:]
    got = load_file(str(tmp_path / "out" / SINGLE))[EXCLUDED_FP8]
    assert got.dtype == want.dtype and torch.equal(torch.isnan(got), torch.isnan(want))
    assert torch.equal(got.nan_to_num(0), want.nan_to_num(0))
    assert outside(tmp_path) == before


def test_allow_nonfinite_copies_and_records_it(tmp_path, capsys, monkeypatch):
    """--allow-nonfinite: the NaN is copied as it is and the record's fingerprint says allow_nonfinite; a run cut
    short with the option is not resumed without it (refused as made from other inputs: shards checked and
    unchecked never mix), and is resumed with it."""
    import torch
    from safetensors.torch import load_file

    src = copy_model(tmp_path)
    _poison("model.norm.weight", float("nan"))(src)
    out = tmp_path / "out"
    args = ("--allow-nonfinite", "--max-shard-size", "20KB")
    monkeypatch.setenv("DIST_EXPORT_FAULT", "raise:0:12")
    rc, err = export(capsys, out, *args, model=src)
    refused(rc, err, "injected fault")
    monkeypatch.delenv("DIST_EXPORT_FAULT")
    rc, err = export(capsys, out, "--resume", "--max-shard-size", "20KB", model=src)
    refused(rc, err, "made from other inputs", "allow_nonfinite")
    rc, err = export(capsys, out, "--resume", *args, model=src)
    assert rc == 0, err[-2000:]
    with open(out / INDEX) as f:
        shard = json.load(f)["weight_map"]["model.norm.weight"]
    got = load_file(str(out / shard))["model.norm.weight"]
    want = load_file(os.path.join(src, SINGLE))["model.norm.weight"]
    assert torch.isnan(got.view(-1)[3]) and torch.equal(got.view(-1)[4:], want.view(-1)[4:])
    with open(out / "dist_export.json") as f:
        assert json.load(f)["fingerprint"]["allow_nonfinite"] is True

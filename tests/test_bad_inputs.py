"""Bad inputs: every user mistake or broken source ends in one clear line, a non-zero exit, and no output.

Each test runs the real CLI (`python -m dist_export export ...`) in a subprocess on a deliberately broken input
and checks the contract of `cli.main`:
  - the exit code is non-zero;
  - the last non-empty line of stderr is the only `[rank 0] error: ...` line, names the offending
    file/tensor/key and says what to do;
  - stderr holds no Python traceback;
  - the output folder holds no index, no `model.safetensors`, and no `*.tmp` / `*.staged` leftovers
    (files the user had put there before stay byte-identical).
"Says what to do" means an instruction ("pass ...", "calibrate ...", "remove ...") or the list of valid values; a
diagnosis alone ("the file is corrupt") does not count; a missing remedy fails with `NoRemedy`.
Setup steps (the sharded source, calibration files) call the same functions as `make-model` / `calibrate`
in-process, to keep the file fast; every export under test runs the real CLI.
docs/bad-inputs.md lists the cases with the message each one produces.
"""
from __future__ import annotations

import json
import os
import shutil
import struct

import pytest
import torch
from safetensors.torch import load_file, save_file

from helpers import REPO, folder_hashes, model_dir, run_cli

MODEL = "synthetic:llama-tiny"
RECIPE = "int4-w4a16"
QWEIGHT = "model.layers.0.mlp.down_proj.weight"  # a weight every recipe quantizes (shape [64, 96])
INDEX = "model.safetensors.index.json"
ERROR_PREFIX = "[rank 0] error:"


# ----------------------------------------------------------------------------------------------- helpers


def export(out, *args, model=MODEL, recipe=RECIPE, env=None):
    argv = ["export", "--out", str(out), "--device", "cpu"]
    if model is not None:
        argv += ["--model", str(model)]
    if recipe is not None:
        argv += ["--recipe", str(recipe)]
    return run_cli(*argv, *args, env=env, check=False, timeout=120)


def copy_model(tmp_path, name: str = "src", model: str = MODEL) -> str:
    """A private, writable copy of a cached synthetic checkpoint (never corrupt the shared cache)."""
    dst = tmp_path / name
    shutil.copytree(model_dir(model), dst)
    return str(dst)


def error_line(proc) -> str:
    """Checks exit code, traceback and the one-line error; returns that line."""
    tail = proc.stderr[-3000:]
    assert proc.returncode != 0, f"exit code 0 on a bad input; stderr:\n{tail}"
    assert "Traceback" not in proc.stderr, f"traceback in stderr:\n{tail}"
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert lines, "stderr is empty"
    last = lines[-1]
    assert last.startswith(ERROR_PREFIX), f"last stderr line is not a rank-0 error line: {last!r}\n{tail}"
    errors = [ln for ln in lines if ERROR_PREFIX in ln]
    assert errors == [last], f"expected exactly one error line, got {errors}"
    return last


def assert_clean_output(out, before: dict[str, str] | None = None) -> None:
    """No published or half-written export files under `out`; pre-existing files unchanged."""
    out = str(out)
    if not os.path.exists(out):
        return
    if os.path.isdir(out):
        top = os.listdir(out)
        assert INDEX not in top, f"{out} has an index after a failed export: {top}"
        assert "model.safetensors" not in top, f"{out} has model.safetensors after a failed export: {top}"
        leftovers = [os.path.join(root, f) for root, _, files in os.walk(out) for f in files
                     if f.endswith((".tmp", ".staged"))]
        assert not leftovers, f"temporary files left behind: {leftovers}"
    if before is not None:
        after = folder_hashes(out)
        assert {k: after.get(k) for k in before} == before, f"pre-existing files changed: {before} -> {after}"


class NoRemedy(AssertionError):
    """The error line is clean and names the culprit, but does not say what to do (a remedy or the valid values)."""


def check(proc, out, names: tuple[str, ...], remedy: tuple[str, ...], before=None) -> str:
    """The whole contract. `names`: every substring must appear (the offending file/tensor/key);
    `remedy`: at least one must appear: an instruction ("pass ...", "calibrate ...") or the list of valid values.
    A diagnosis alone ("the file is corrupt") is not a remedy; it fails with `NoRemedy`."""
    line = error_line(proc)
    assert_clean_output(out, before)
    for n in names:
        assert n in line, f"error line does not name {n!r}: {line!r}"
    low = line.lower()
    if not any(r.lower() in low for r in remedy):
        raise NoRemedy(f"error line says nothing of what to do (none of {remedy}): {line!r}")
    return line


def rewrite_tensor(folder: str, file: str, name: str, tensor: torch.Tensor) -> None:
    """Replace one tensor of a source shard (the header is rewritten by safetensors, so it stays consistent)."""
    path = os.path.join(folder, file)
    tensors = load_file(path)
    tensors[name] = tensor.contiguous()
    save_file(tensors, path, metadata={"format": "pt"})


def read_index(folder: str) -> dict:
    with open(os.path.join(folder, INDEX)) as f:
        return json.load(f)


def write_index(folder: str, index: dict) -> None:
    with open(os.path.join(folder, INDEX), "w") as f:
        json.dump(index, f, indent=2)


def shard_files(folder: str) -> list[str]:
    return sorted(set(read_index(folder)["weight_map"].values()))


@pytest.fixture(scope="module")
def sharded_model(tmp_path_factory, synthetic_cache):
    """llama-tiny in several shards with an index: what `dist-export make-model --arch llama --preset tiny
    --max-shard-size 50KB` writes (made in-process, once per worker, to spare an interpreter start)."""
    from dist_export.options import parse_size
    from dist_export.sources.synthetic import make_model

    folder = str(tmp_path_factory.mktemp("sharded") / "llama-tiny-sharded")
    make_model("llama", "tiny", folder, seed=0, dtype="bfloat16", max_shard_size=parse_size("50KB"))
    assert len(shard_files(folder)) >= 3, read_index(folder)
    return folder


@pytest.fixture
def sharded_copy(sharded_model, tmp_path):
    dst = tmp_path / "src"
    shutil.copytree(sharded_model, dst)
    return str(dst)


def make_calibration(model: str, recipe: str, path) -> str:
    """What `dist-export calibrate --model M --recipe R --out P --num-samples 2 --seq-len 16` does (in-process:
    the CLI's import of transformers alone costs seconds)."""
    from dist_export.api import resolve_model
    from dist_export.calibration.run import calibrate
    from dist_export.recipe import load_recipe

    calibrate(resolve_model(model), load_recipe(recipe), str(path), random_tokens=True, num_samples=2, seq_len=16)
    return str(path)


# ----------------------------------------------------------------------------------------- source model


def test_missing_model_folder(tmp_path):
    missing = tmp_path / "no-such-model"
    out = tmp_path / "out"
    proc = export(out, model=missing)
    check(proc, out, names=(str(missing), "does not exist"), remedy=("pass a local Hugging Face checkpoint",))


def test_folder_without_config_json(tmp_path):
    src = copy_model(tmp_path)
    os.unlink(os.path.join(src, "config.json"))
    out = tmp_path / "out"
    proc = export(out, model=src)
    check(proc, out, names=(src, "config.json"), remedy=("pass a", "add a config.json", "restore config.json"))


def export_damaged_shard(tmp_path, damage):
    """Export a private copy of the model whose shard file was damaged in place by `damage(file, size)`."""
    src = copy_model(tmp_path)
    path = os.path.join(src, "model.safetensors")
    size = os.path.getsize(path)
    with open(path, "r+b") as f:
        damage(f, size)
    out = tmp_path / "out"
    return export(out, model=src), out


def test_truncated_source_shard(tmp_path):
    proc, out = export_damaged_shard(tmp_path, lambda f, size: f.truncate(size - 100))
    check(proc, out, names=("model.safetensors", "truncated"), remedy=("re-download", "replace", "restore"))


def test_corrupt_header(tmp_path):
    def garbage(f, _size):
        f.seek(8)
        f.write(b"\xff\x00garbage!!\xfe\x01")  # 12 bytes of garbage over bytes 8..20

    proc, out = export_damaged_shard(tmp_path, garbage)
    check(proc, out, names=("model.safetensors", "header"), remedy=("re-download", "replace", "restore"))


def test_header_lies_about_sizes(tmp_path):
    src = copy_model(tmp_path)
    path = os.path.join(src, "model.safetensors")
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
        data = f.read()
    victim = "model.layers.0.self_attn.k_proj.weight"
    header[victim]["data_offsets"][1] += 2  # span 2 bytes larger than dtype*shape; nothing else adjusted
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * ((-len(raw)) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw + data)
    out = tmp_path / "out"
    proc = export(out, model=src)
    check(proc, out, names=("model.safetensors", victim), remedy=("re-download", "replace", "restore"))


def test_index_names_missing_shard(sharded_copy, tmp_path):
    victim = shard_files(sharded_copy)[1]
    os.unlink(os.path.join(sharded_copy, victim))
    out = tmp_path / "out"
    proc = export(out, model=sharded_copy)
    check(proc, out, names=(INDEX, victim, "missing"), remedy=("re-download", "restore", "copy"))


def test_index_names_tensor_absent_from_shard(sharded_copy, tmp_path):
    index = read_index(sharded_copy)
    shard = shard_files(sharded_copy)[0]
    index["weight_map"]["model.fake.weight"] = shard
    write_index(sharded_copy, index)
    out = tmp_path / "out"
    proc = export(out, model=sharded_copy)
    check(proc, out, names=(INDEX, "'model.fake.weight'", shard),
          remedy=("fix the index", "remove", "re-download", "regenerate"))


def test_duplicate_tensor_in_two_shards(sharded_copy, tmp_path):
    weight_map = read_index(sharded_copy)["weight_map"]
    first, second = shard_files(sharded_copy)[:2]
    dup = sorted(n for n, f in weight_map.items() if f == second)[0]
    stolen = load_file(os.path.join(sharded_copy, second))[dup]
    rewrite_tensor(sharded_copy, first, dup, stolen)  # the index still (rightly) says `dup` lives in `second`
    out = tmp_path / "out"
    proc = export(out, model=sharded_copy)
    check(proc, out, names=(f"'{dup}'", first, second), remedy=("remove the duplicate",))


def test_weight_dtype_format_cannot_take(tmp_path):
    src = copy_model(tmp_path)
    rewrite_tensor(src, "model.safetensors", QWEIGHT, torch.ones(64, 96, dtype=torch.int8))
    out = tmp_path / "out"
    proc = export(out, model=src)
    check(proc, out, names=(f"'{QWEIGHT}'", "dtype I8"), remedy=("exclude it", "convert the source"))


def test_shape_does_not_fit_recipe(tmp_path):
    src = copy_model(tmp_path)
    rewrite_tensor(src, "model.safetensors", QWEIGHT, torch.randn(64, 95).to(torch.bfloat16))
    out = tmp_path / "out"
    proc = export(out, model=src, recipe="nvfp4-w4a16")
    check(proc, out, names=(f"'{QWEIGHT}'", "95"), remedy=("exclude", "another recipe", "other format"))


def _poison(tmp_path, value: float, name: str = QWEIGHT) -> str:
    src = copy_model(tmp_path)
    w = load_file(os.path.join(src, "model.safetensors"))[name].clone()
    w[3, 5] = value
    rewrite_tensor(src, "model.safetensors", name, w)
    return src


def test_nan_weight(tmp_path):
    out = tmp_path / "out"
    proc = export(out, model=_poison(tmp_path, float("nan")))
    check(proc, out, names=(QWEIGHT, "1 NaN"), remedy=("fix the source checkpoint",))


def test_inf_weight(tmp_path):
    out = tmp_path / "out"
    proc = export(out, model=_poison(tmp_path, float("inf")))
    check(proc, out, names=(QWEIGHT, "1 inf"), remedy=("fix the source checkpoint",))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("recipe,name", [("fp8-block", QWEIGHT), ("nvfp4-mse", QWEIGHT),
                                         ("nvfp4-mse", "model.layers.0.self_attn.k_proj.weight")])  # shared amax
def test_nan_weight_on_gpu(tmp_path, recipe, name):
    """On a GPU the NaN/inf counts stay on the device and the writer refuses the item: same line, nothing
    written."""
    out = tmp_path / "out"
    proc = export(out, "--device", "cuda", model=_poison(tmp_path, float("nan"), name), recipe=recipe)
    check(proc, out, names=(name, "1 NaN"), remedy=("fix the source checkpoint",))


def test_index_file_name_escapes_folder(sharded_copy, tmp_path):
    # A real file sits at the escaping path, so only the name check can stop the read.
    first = shard_files(sharded_copy)[0]
    shutil.copy(os.path.join(sharded_copy, first), tmp_path / "x.safetensors")
    index = read_index(sharded_copy)
    moved = sorted(n for n, f in index["weight_map"].items() if f == first)[0]
    index["weight_map"][moved] = "../x.safetensors"
    write_index(sharded_copy, index)
    out = tmp_path / "out"
    proc = export(out, model=sharded_copy)
    check(proc, out, names=("'../x.safetensors'", "escapes"),
          remedy=("fix the index", "move the file", "inside the folder"))


# ----------------------------------------------------------------------------------------- calibration


def test_calibration_from_another_model(tmp_path):
    calib = make_calibration("synthetic:qwen3-tiny", "fp8", tmp_path / "c.safetensors")
    out = tmp_path / "out"
    proc = export(out, "--calib", calib, recipe="fp8")
    check(proc, out, names=(calib, "another model"), remedy=("calibrate this model first",))


def test_calibration_from_another_recipe(tmp_path):
    calib = make_calibration(MODEL, "nvfp4", tmp_path / "c.safetensors")
    out = tmp_path / "out"
    proc = export(out, "--calib", calib, recipe="fp8")
    check(proc, out, names=(calib, "recipe 'nvfp4'", "'fp8'"), remedy=("calibrate again with --recipe fp8",))


def test_static_recipe_without_calibration(tmp_path):
    out = tmp_path / "out"
    proc = export(out, recipe="fp8")
    check(proc, out, names=("recipe 'fp8'", "static activation quantizers"),
          remedy=("calibrate first with `dist-export calibrate",))


# ----------------------------------------------------------------------------------------------- recipes


def test_unknown_recipe_name(tmp_path):
    out = tmp_path / "out"
    proc = export(out, recipe="no-such-recipe")
    line = check(proc, out, names=("'no-such-recipe'",), remedy=("valid recipes",))
    assert "int4-w4a16" in line, f"valid recipes not listed: {line!r}"


def test_malformed_recipe_yaml(tmp_path):
    recipe = tmp_path / "broken.yaml"
    recipe.write_text('name: broken\nrules:\n  - match: ["*"\n    weight: {format: int4\n')
    out = tmp_path / "out"
    proc = export(out, recipe=recipe)
    check(proc, out, names=(str(recipe), "not valid YAML"), remedy=("fix", "line "))


def test_unknown_recipe_key(tmp_path):
    recipe = tmp_path / "extra.yaml"
    with open(os.path.join(REPO, "dist_export", "configs", "int4-w4a16.yaml")) as f:
        recipe.write_text(f.read() + "foo: 1\n")
    out = tmp_path / "out"
    proc = export(out, recipe=recipe)
    line = check(proc, out, names=(str(recipe), "'foo'"), remedy=("valid keys",))
    for key in ("rules", "exclude", "share_weight_amax"):
        assert key in line, f"valid keys not listed: {line!r}"


def test_unknown_format_in_rule(tmp_path):
    recipe = tmp_path / "fp9.yaml"
    recipe.write_text('name: fp9\nrules:\n  - match: ["*"]\n    weight: {format: fp9}\n')
    out = tmp_path / "out"
    proc = export(out, recipe=recipe)
    line = check(proc, out, names=(str(recipe), "rules[0].weight", "'fp9'"), remedy=("valid formats",))
    assert "'fp8'" in line and "'int4'" in line, f"valid formats not listed: {line!r}"


# ------------------------------------------------------------------------------------------ output side


def test_full_disk(tmp_path):
    out = tmp_path / "out"
    proc = export(out, env={"DIST_EXPORT_FAULT": "enospc:0:3"})
    check(proc, out, names=("No space left on device", "while writing model.layers."),
          remedy=("free", "--resume", "another --out"))


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0,
                    reason="root ignores permissions; test_output_below_a_regular_file covers the case")
def test_unwritable_output_folder(tmp_path):
    parent = tmp_path / "locked"
    parent.mkdir()
    out = parent / "out"
    parent.chmod(0o500)
    try:
        proc = export(out)
        check(proc, out, names=(str(out), "not writable", str(parent)),
              remedy=("choose another --out", "chmod", "grant"))
    finally:
        parent.chmod(0o700)


def test_output_below_a_regular_file(tmp_path):
    afile = tmp_path / "afile"
    afile.write_text("not a folder\n")
    out = afile / "out"
    proc = export(out)
    assert afile.read_text() == "not a folder\n"
    check(proc, out, names=(str(out),), remedy=("choose another --out", "is not a folder"))


def test_output_folder_not_empty(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("the user's notes\n")
    before = folder_hashes(out)
    proc = export(out)
    check(proc, out, names=(str(out), "not empty"), remedy=("pass --overwrite",), before=before)
    assert sorted(os.listdir(out)) == ["keep.txt"]


def test_unknown_output_format(tmp_path):
    out = tmp_path / "out"
    proc = export(out, "--format", "no-such-format")
    line = check(proc, out, names=("--format: invalid choice: 'no-such-format'",), remedy=("choose from",))
    assert "'vllm-fq'" in line and "'fp8-block'" in line, f"valid formats not listed: {line!r}"

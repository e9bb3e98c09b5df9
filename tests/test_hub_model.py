"""`--model org/name`: resolved from a local Hugging Face cache built by the test, offline, with --revision;
side files of a snapshot (links into blobs/) are carried, a link out of the repository is refused."""
from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors.torch import save_file

from dist_export.sources.hub import looks_like_hub_id, resolve_model
from dist_export.sources.side_files import auto_map_modules, list_side_files, missing_auto_map_code
from userkit import make_hub_cache


def _tiny_folder(path, marker: float = 1.0):
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump({"model_type": "llama"}, f)
    save_file({"w": torch.full((2, 2), marker)}, os.path.join(path, "model.safetensors"))
    return str(path)


@pytest.fixture()
def offline_cache(tmp_path, monkeypatch):
    from huggingface_hub import constants

    cache = tmp_path / "hub"
    cache.mkdir()
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return str(cache)


def test_hub_id_resolves_from_the_cache_offline_and_by_revision(tmp_path, offline_cache):
    main = make_hub_cache(offline_cache, "acme/q3moe", _tiny_folder(tmp_path / "v1", 1.0), commit="a" * 40)
    old = make_hub_cache(offline_cache, "acme/q3moe", _tiny_folder(tmp_path / "v0", 0.0), commit="b" * 40, ref="v0")
    got = resolve_model("acme/q3moe")
    assert got.kind == "hub" and os.path.samefile(got.path, main)
    assert os.path.samefile(got.root, os.path.join(offline_cache, "models--acme--q3moe"))
    assert os.path.samefile(resolve_model("acme/q3moe", revision="v0").path, old)
    assert os.path.samefile(resolve_model("acme/q3moe", revision="b" * 40).path, old)


def test_missing_hub_model_offline_and_bad_references_are_one_line(tmp_path, offline_cache):
    with pytest.raises(FileNotFoundError, match=r"acme/absent is not in the Hugging Face cache .* \(HF_HUB_OFFLINE=1\)"):
        resolve_model("acme/absent")
    with pytest.raises(FileNotFoundError, match="neither an existing folder nor a Hugging Face Hub id"):
        resolve_model(str(tmp_path / "no" / "such" / "dir"))
    with pytest.raises(ValueError, match="--revision applies to Hub ids only"):
        resolve_model(_tiny_folder(tmp_path / "local"), revision="main")
    assert looks_like_hub_id("Qwen/Qwen3-8B") and not looks_like_hub_id("./Qwen/Qwen3-8B")
    assert not looks_like_hub_id("a/b/c") and not looks_like_hub_id("../x")


def test_a_cached_snapshot_without_safetensors_is_refused(tmp_path, offline_cache):
    src = tmp_path / "bin-only"
    src.mkdir()
    (src / "config.json").write_text("{}")
    (src / "pytorch_model.bin").write_bytes(b"\0" * 8)
    make_hub_cache(offline_cache, "acme/old", str(src), commit="d" * 40)
    with pytest.raises(FileNotFoundError, match="acme/old"):
        resolve_model("acme/old")


def test_side_files_of_a_snapshot_every_non_weight_file(tmp_path, offline_cache):
    src = _tiny_folder(tmp_path / "src")
    for name, text in {"README.md": "# card", "LICENSE": "Apache", "tokenizer.tiktoken": "abc 0",
                       "tokenization_acme.py": "raise SystemExit('imported!')\n", "generation_config.json": "{}",
                       "hf_quant_config.json": "{}", "pytorch_model.bin": "x", "model.safetensors.index.json": "{}",
                       "assets/logo.svg": "<svg/>", ".gitattributes": "*"}.items():
        os.makedirs(os.path.dirname(os.path.join(src, name)) or src, exist_ok=True)
        with open(os.path.join(src, name), "w") as f:
            f.write(text)
    with open(os.path.join(src, "tokenizer_config.json"), "w") as f:
        json.dump({"auto_map": {"AutoTokenizer": ["tokenization_acme.AcmeTokenizer", None]}}, f)
    snap = make_hub_cache(offline_cache, "acme/side", src, commit="e" * 40)
    got = resolve_model("acme/side")
    assert list_side_files(got.path, got.root) == [
        "LICENSE", "README.md", "assets/logo.svg", "generation_config.json", "tokenization_acme.py",
        "tokenizer.tiktoken", "tokenizer_config.json"]
    assert auto_map_modules(snap) == {"tokenizer_config.json": ["tokenization_acme.py"]}
    assert missing_auto_map_code(snap) == {}
    # the snapshot's links point into blobs/: fine under the repository root, refused under the snapshot alone
    with pytest.raises(ValueError, match="links outside the model folder"):
        list_side_files(got.path)


def test_a_side_file_linking_out_of_the_folder_is_refused(tmp_path):
    src = _tiny_folder(tmp_path / "m")
    secret = tmp_path / "secret.txt"
    secret.write_text("token")
    os.symlink(secret, os.path.join(src, "tokenizer.json"))
    with pytest.raises(ValueError, match="tokenizer.json .* links outside the model folder"):
        list_side_files(src)

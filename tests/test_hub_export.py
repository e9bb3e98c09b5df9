"""`dist-export export --model org/name` end to end (issue 18): a sharded checkpoint laid out as a Hugging Face
cache by the test (no network, HF_HUB_OFFLINE=1), every side file carried (README, LICENSE, *.tiktoken, auto_map
tokenizer code), --revision picks another snapshot; --overwrite removes exactly the side files we wrote; without
--model the demo model is announced."""
from __future__ import annotations

import json
import os

import pytest
from safetensors import safe_open

from helpers import run_cli
from dist_export.sources.synthetic import make_model
from userkit import make_hub_cache

SIDE = {"README.md": b"# acme q3\n", "LICENSE": b"Apache-2.0\n", "qwen.tiktoken": b"aGVsbG8= 0\n",
        "tokenization_acme.py": b"class AcmeTokenizer: pass\n",
        "tokenizer_config.json": json.dumps({"auto_map": {"AutoTokenizer": ["tokenization_acme.AcmeTokenizer",
                                                                            None]}}).encode()}


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    base = tmp_path_factory.mktemp("hub")
    src = str(base / "src")
    make_model("llama", "tiny", src, max_shard_size=100_000)
    assert os.path.isfile(os.path.join(src, "model.safetensors.index.json")), "want a sharded source"
    for name, data in SIDE.items():
        with open(os.path.join(src, name), "wb") as f:
            f.write(data)
    cache = str(base / "cache")
    make_hub_cache(cache, "acme/q3", src, commit="a" * 40)
    bare = str(base / "bare")
    make_model("llama", "tiny", bare, seed=1)
    for name in ("tokenizer.json", "tokenizer_config.json"):  # a revision with no side files but configs
        os.remove(os.path.join(bare, name))
    make_hub_cache(cache, "acme/q3", bare, commit="b" * 40, ref="bare")
    return {"HF_HUB_CACHE": cache, "HF_HUB_OFFLINE": "1"}


def _weight(out: str, name: str = "model.embed_tokens.weight"):
    index = os.path.join(out, "model.safetensors.index.json")
    file = json.load(open(index))["weight_map"][name] if os.path.isfile(index) else "model.safetensors"
    with safe_open(os.path.join(out, file), "pt") as f:
        return f.get_tensor(name)


def test_hub_id_export_offline_carries_every_side_file(tmp_path, hub):
    out = str(tmp_path / "out")
    run_cli("export", "--model", "acme/q3", "--recipe", "fp8-pc-pt", "--out", out, env=hub)
    for name, data in SIDE.items():
        with open(os.path.join(out, name), "rb") as f:
            assert f.read() == data, name
    record = json.load(open(os.path.join(out, "dist_export.json")))
    assert set(SIDE) <= set(record["side_files"])


def test_revision_then_overwrite_removes_only_the_side_files_we_wrote(tmp_path, hub):
    out = str(tmp_path / "out")
    run_cli("export", "--model", "acme/q3", "--recipe", "fp8-pc-pt", "--out", out, env=hub)
    first = _weight(out)
    with open(os.path.join(out, "LICENSE"), "ab") as f:  # changed by the user: no longer ours to delete
        f.write(b"user note\n")
    with open(os.path.join(out, "NOTES.txt"), "w") as f:  # never ours
        f.write("keep")
    args = ("export", "--model", "acme/q3", "--revision", "bare", "--recipe", "fp8-pc-pt", "--out", out, "--overwrite")
    refused = run_cli(*args, env=hub, check=False)  # files that are not ours: refused unless explicitly allowed
    assert refused.returncode == 1 and "LICENSE" in refused.stderr.splitlines()[-1], refused.stderr[-2000:]
    assert (first == _weight(out)).all()
    run_cli(*args, "--allow-foreign-files", env=hub)
    assert not (first == _weight(out)).all(), "--revision bare exported the main snapshot"
    left = set(os.listdir(out))
    assert not left & {"README.md", "qwen.tiktoken", "tokenization_acme.py", "tokenizer_config.json"}
    assert {"LICENSE", "NOTES.txt"} <= left


def test_missing_revision_offline_is_one_line(tmp_path, hub):
    proc = run_cli("export", "--model", "acme/q3", "--revision", "nope", "--out", str(tmp_path / "o"), env=hub,
                   check=False)
    lines = [ln for ln in proc.stderr.splitlines() if "error" in ln]
    assert proc.returncode == 1 and len(lines) == 1 and "acme/q3@nope" in lines[0] and "HF_HUB_OFFLINE" in lines[0]


def test_no_model_announces_the_demo():
    proc = run_cli("plan", "--world-size", "2")
    assert "no --model given: using the built-in DEMO model synthetic:llama-tiny" in proc.stderr


def test_python_api_takes_a_revision(tmp_path, hub):
    """export(..., revision=) and calibrate(..., revision=) pick the named snapshot (a fresh process: the HF cache
    location is read when huggingface_hub is imported)."""
    import subprocess
    import sys

    from helpers import REPO

    out, calib = str(tmp_path / "out"), str(tmp_path / "c.safetensors")
    code = ("import dist_export; from dist_export.calibration.run import calibrate; "
            f"dist_export.export('acme/q3', {out!r}, revision='bare', recipe='fp8-pc-pt'); "
            f"calibrate('acme/q3', 'fp8', {calib!r}, revision='bare', random_tokens=True, num_samples=2, seq_len=8)")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO, env={**os.environ, **hub}, timeout=300)
    bare = os.path.join(hub["HF_HUB_CACHE"], "models--acme--q3", "snapshots", "b" * 40)
    with safe_open(os.path.join(bare, "model.safetensors"), "pt") as f:
        want = f.get_tensor("model.embed_tokens.weight")  # excluded: copied byte for byte from the snapshot
    assert (_weight(out) == want).all()
    from dist_export.storage.header import model_signature
    from dist_export.sources.checkpoint import SourceCheckpoint

    with safe_open(calib, "pt") as f:
        assert f.metadata()["model_signature"] == model_signature(SourceCheckpoint(bare).tensors)

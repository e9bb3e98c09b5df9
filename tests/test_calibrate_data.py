"""`calibrate` with honest data (issue 18): chat JSONL rendered with the tokenizer's template, the data choice
recorded in the calibration file, strings accepted for model and recipe, --num-samples 0 refused in one line."""
from __future__ import annotations

import json
import shutil

import pytest
from safetensors import safe_open

from helpers import model_dir, run_cli
from dist_export.calibration.run import calibrate
from userkit import make_tokenizer


def _meta(path):
    with safe_open(path, "pt") as f:
        return f.metadata()


def test_chat_jsonl_calibrates_and_is_recorded(tmp_path):
    src = tmp_path / "m"
    shutil.copytree(model_dir("synthetic:llama-tiny"), src)
    make_tokenizer(str(src), words=200)
    data = tmp_path / "chat.jsonl"
    rows = [{"messages": [{"role": "user", "content": "w1 w2 w3"}, {"role": "assistant", "content": "w4 w5"}]},
            {"messages": [{"role": "user", "content": "w7 w8"}]}]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = str(tmp_path / "c.safetensors")
    amax = calibrate(str(src), "fp8", out, data=str(data), num_samples=2, seq_len=16)
    assert amax and all(float(v) > 0 for v in amax.values())
    record = json.loads(_meta(out)["data"])
    assert record["kind"] == "chat" and record["samples"] == 2 and record["name"] == "chat.jsonl"
    # <|user|> w1 w2 w3 <|assistant|> w4 w5 + <|user|> w7 w8: 7 + 3 tokens, template rendered, not raw JSON
    assert record["tokens"] == 10


def test_string_model_and_recipe_without_data_record_random_tokens(tmp_path):
    out = str(tmp_path / "c.safetensors")
    calibrate("synthetic:llama-tiny", "fp8", out, random_tokens=True, num_samples=2, seq_len=8)
    record = json.loads(_meta(out)["data"])
    assert record == {"kind": "random-tokens", "seed": 0, "samples": 2, "tokens": 16, "seq_len": 8}


def test_num_samples_zero_is_one_line(tmp_path):
    proc = run_cli("calibrate", "--model", "synthetic:llama-tiny", "--recipe", "fp8", "--out",
                   str(tmp_path / "c.safetensors"), "--num-samples", "0", check=False)
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert proc.returncode == 2 and len(lines) == 1
    assert "--num-samples: expected a positive integer, got '0'" in lines[0]


def test_api_without_a_data_choice_is_one_line_and_writes_nothing(tmp_path):
    """The Python API chooses no data silently (as the CLI's required --data | --random-tokens): without data and
    without random_tokens=True it refuses before loading anything, and names both ways out; both at once too."""
    from dist_export.api import export

    out = tmp_path / "c.safetensors"
    with pytest.raises(ValueError, match=r"calibration needs data: pass data=.*random_tokens=True"):
        calibrate("synthetic:llama-tiny", "fp8", str(out), num_samples=2, seq_len=8)
    with pytest.raises(ValueError, match="not both"):
        calibrate("synthetic:llama-tiny", "fp8", str(out), data="x.txt", random_tokens=True)
    with pytest.raises(ValueError, match="random_tokens must be True or False"):
        calibrate("synthetic:llama-tiny", "fp8", str(out), random_tokens="yes")
    assert not out.exists()
    with pytest.raises(ValueError, match=r"calibration needs data: pass data=.*random_tokens=True"):
        export("synthetic:llama-tiny", str(tmp_path / "o"), recipe="fp8", calibration={"num_samples": 2})
    assert not (tmp_path / "o").exists()


def test_export_calibration_with_random_tokens_records_them(tmp_path):
    """calibration={"random_tokens": True} is the explicit test-only choice; the export's record says so."""
    from dist_export.api import export

    out = tmp_path / "o"
    export("synthetic:llama-tiny", str(out), recipe="fp8",
           calibration={"random_tokens": True, "num_samples": 2, "seq_len": 8, "seed": 3})
    record = json.loads((out / "dist_export.json").read_text())
    assert record["calibration_data"] == {"kind": "random-tokens", "seed": 3, "samples": 2, "tokens": 16,
                                          "seq_len": 8}

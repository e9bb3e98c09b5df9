"""`dist-export plan --json` (issue 17): per-rank items/cost/bytes and max/mean, through the real CLI process."""
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _plan_json(model: str, *extra: str) -> dict:
    env = dict(os.environ, PYTHONPATH=ROOT)
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    out = subprocess.run([sys.executable, "-m", "dist_export", "plan", "--model", model, "--metadata-only",
                          "--recipe", "nvfp4-mse", "--world-size", "8", "--json", *extra],
                         capture_output=True, text=True, env=env, timeout=300, check=True).stdout
    return json.loads(out)


def test_qwen3_8b_json_item_level_within_5_percent_and_sums_match():
    d = _plan_json("synthetic:qwen3-qwen3-8b")
    assert d["world_size"] == 8 and len(d["item_level"]["ranks"]) == 8
    assert d["item_level"]["imbalance"] <= 1.05
    # the same items and bytes, only distributed differently
    for key in ("items", "bytes_in", "bytes_out"):
        assert sum(r[key] for r in d["item_level"]["ranks"]) == sum(r[key] for r in d["executed"]["ranks"])
    assert sum(r["items"] for r in d["executed"]["ranks"]) == d["items"]
    costs = [r["cost"] for r in d["executed"]["ranks"]]
    assert d["executed"]["imbalance"] == pytest.approx(max(costs) / (sum(costs) / len(costs)))


def test_moe_small_json_every_rank_has_work_item_level_only():
    d = _plan_json("synthetic:qwen3-moe-small")
    assert d["item_level"]["idle_ranks"] == []
    assert d["executed"]["idle_ranks"] == list(range(1, 8))  # one shard today: the gap the issue names


def test_two_nodes_keep_each_shard_on_one_node():
    d = _plan_json("synthetic:qwen3-qwen3-8b", "--nnodes", "2")
    assert [r["node"] for r in d["item_level"]["ranks"]] == [0] * 4 + [1] * 4
    assert d["item_level"]["imbalance"] <= 1.05


def test_run_summary_has_measured_seconds_per_rank_and_max_mean(tmp_path):
    from dist_export.api import export

    s = export("synthetic:qwen3-moe-tiny", str(tmp_path / "out"), recipe="fp8-block")
    b = s["seconds_balance"]
    assert b["seconds"] == [r["seconds"] for r in s["ranks"]] and len(b["seconds"]) == 1
    assert b["imbalance"] == pytest.approx(1.0) and b["slowest_rank"] == 0

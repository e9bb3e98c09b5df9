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


def test_qwen3_8b_json_within_5_percent_and_sums_match():
    d = _plan_json("synthetic:qwen3-qwen3-8b")
    ex = d["executed"]
    assert d["world_size"] == 8 and d["nnodes"] == 1 and len(ex["ranks"]) == 8
    assert ex["imbalance"] <= 1.05 and ex["idle_ranks"] == []
    assert sum(r["items"] for r in ex["ranks"]) == d["items"]
    costs = [r["cost"] for r in ex["ranks"]]
    assert ex["imbalance"] == pytest.approx(max(costs) / (sum(costs) / len(costs)))


def test_moe_small_json_every_rank_has_work():
    d = _plan_json("synthetic:qwen3-moe-small")
    assert d["shards"] == 1  # one shard: before item ownership, ranks 1-7 idled
    assert d["executed"]["idle_ranks"] == [] and all(r["items"] > 0 for r in d["executed"]["ranks"])


def test_two_nodes_keep_each_shard_on_one_node():
    d = _plan_json("synthetic:qwen3-qwen3-8b", "--nnodes", "2")
    assert d["nnodes"] == 2
    assert [r["node"] for r in d["executed"]["ranks"]] == [0] * 4 + [1] * 4
    assert d["executed"]["imbalance"] <= 1.05


def test_plan_puts_each_shard_on_one_node_and_every_item_on_one_rank():
    from dist_export.output_formats import get_output_format
    from dist_export.plan import build_plan
    from dist_export.recipe import load_recipe
    from dist_export.sources.synthetic import synthetic_metadata

    tensors = synthetic_metadata("synthetic:qwen3-qwen3-8b")
    plan = build_plan(tensors, load_recipe("nvfp4-mse"), get_output_format("vllm-fq"), 8, 1 << 30, nnodes=2)
    for s in plan.shards:
        assert {r // 4 for r in s.ranks} == {s.node}, s.filename
    owned = [n for r in range(8) for n in plan.owned_items(r)]
    assert sorted(owned) == sorted(plan.items)  # every item once
    # the layout does not depend on the world: the same files, tensors and order at world size 1
    one = build_plan(tensors, load_recipe("nvfp4-mse"), get_output_format("vllm-fq"), 1, 1 << 30)
    assert one.layout_digest() == plan.layout_digest() and one.digest() != plan.digest()


def test_run_summary_has_measured_seconds_per_rank_and_max_mean(tmp_path):
    from dist_export.api import export

    s = export("synthetic:qwen3-moe-tiny", str(tmp_path / "out"), recipe="fp8-block")
    b = s["seconds_balance"]
    assert b["seconds"] == [r["seconds"] for r in s["ranks"]] and len(b["seconds"]) == 1
    assert b["imbalance"] == pytest.approx(1.0) and b["slowest_rank"] == 0

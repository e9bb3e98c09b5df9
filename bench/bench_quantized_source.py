"""Benchmark: export an already-quantized FP8-block source (DeepSeek-V3 shapes, a few layers) against the copy
floor (`cp -r` of the source folder + sync), and measure what re-quantizing it to fp8-block changes.

    python3 bench/bench_quantized_source.py --preset deepseek-v3-2l --work /tmp/qsbench --json out.json

Steps: 1. make-model (FP8-block source; generated on --gen-device, not timed as export); 2. copy floor;
3. `dist-export export --recipe nvfp4-w4a16` (1 rank), timed from launch to exit + sync, with the run summary
(peak host RSS and GPU memory); 4. `--recipe fp8-block --format fp8-block`, then FP8 codes and scales compared
with the source's (docs/sources.md, "Re-quantizing to the source's own scheme").
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def timed(cmd: list[str], env=None) -> float:
    t0 = time.monotonic()
    subprocess.run(cmd, check=True, env=env, cwd=REPO)
    subprocess.run(["sync"], check=True)
    return time.monotonic() - t0


def export(src: str, out: str, recipe: str, fmt: str, summary: str) -> dict:
    env = {**os.environ, "PYTHONPATH": REPO}
    wall = timed([sys.executable, "-m", "dist_export", "export", "--model", src, "--out", out, "--recipe", recipe,
                  "--format", fmt, "--summary-json", summary], env)
    with open(summary) as f:
        s = json.load(f)
    r = s["ranks"][0]
    return {"wall_s": round(wall, 2), "export_stage_s": round(s.get("stage_seconds", {}).get("export") or 0, 2),
            "stage_seconds": s.get("stage_seconds"), "bytes_read": s["bytes_read"],
            "bytes_written": s["bytes_written"], "peak_rss_gb": round(r["peak_rss"] / 1e9, 2),
            "peak_gpu_gb": round(r["peak_gpu"] / 1e9, 2)}


def compare_fp8(src: str, out: str) -> dict:
    import torch
    from safetensors import safe_open

    def tensors(folder):
        index = os.path.join(folder, "model.safetensors.index.json")
        if os.path.exists(index):
            with open(index) as f:
                return json.load(f)["weight_map"]
        with safe_open(os.path.join(folder, "model.safetensors"), "pt") as f:
            return {k: "model.safetensors" for k in f.keys()}

    a_map, b_map = tensors(src), tensors(out)
    n_w = same_w = n_s = same_s = 0
    max_rel = 0.0
    for name in sorted(a_map):
        if not name.endswith("weight_scale_inv"):
            continue
        w = name[: -len("_scale_inv")]
        with safe_open(os.path.join(src, a_map[w]), "pt") as fa, safe_open(os.path.join(out, b_map[w]), "pt") as fb:
            same_w += int(torch.equal(fa.get_tensor(w).view(torch.uint8), fb.get_tensor(w).view(torch.uint8)))
            n_w += 1
        with safe_open(os.path.join(src, a_map[name]), "pt") as fa, \
                safe_open(os.path.join(out, b_map[name]), "pt") as fb:
            sa, sb = fa.get_tensor(name), fb.get_tensor(name)
        n_s += sa.numel()
        same_s += int((sa == sb).sum())
        max_rel = max(max_rel, float((sb / sa - 1).abs().max()))
    return {"fp8_weights": n_w, "fp8_weights_byte_identical": same_w, "scales": n_s, "scales_identical": same_s,
            "scale_max_rel_diff": max_rel}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--preset", default="deepseek-v3-2l")
    p.add_argument("--work", required=True)
    p.add_argument("--json", required=True)
    p.add_argument("--gen-device", default="cuda")
    args = p.parse_args()
    sys.path.insert(0, REPO)
    from dist_export.sources.synthetic import make_model

    shutil.rmtree(args.work, ignore_errors=True)
    os.makedirs(args.work)
    src = os.path.join(args.work, "src")
    t0 = time.monotonic()
    make_model("deepseek-v3", args.preset, src, device=args.gen_device)
    subprocess.run(["sync"], check=True)
    result = {"preset": args.preset, "make_model_s": round(time.monotonic() - t0, 2),
              "source_gb": round(sum(os.path.getsize(os.path.join(src, f)) for f in os.listdir(src)) / 1e9, 2)}
    def save():
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)

    save()
    result["copy_floor_s"] = round(timed(["cp", "-r", src, os.path.join(args.work, "floor")]), 2)
    shutil.rmtree(os.path.join(args.work, "floor"))
    save()
    result["nvfp4_w4a16"] = export(src, os.path.join(args.work, "o1"), "nvfp4-w4a16", "vllm-fq",
                                   os.path.join(args.work, "s1.json"))
    shutil.rmtree(os.path.join(args.work, "o1"))
    save()
    result["fp8_block"] = export(src, os.path.join(args.work, "o2"), "fp8-block", "fp8-block",
                                 os.path.join(args.work, "s2.json"))
    result["fp8_block_vs_source"] = compare_fp8(src, os.path.join(args.work, "o2"))
    save()
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()

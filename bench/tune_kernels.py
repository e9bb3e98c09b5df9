"""Scratch: time the search kernels' tile shapes on one GPU (python bench/tune_kernels.py)."""
import json
import sys
import os
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import torch
from triton.testing import do_bench
from dist_export.numerics.kernels import search
from dist_export.numerics.mse import candidate_ratios
w = (torch.randn(12288, 4096, device="cuda") * 0.02).to(torch.bfloat16)
gs = w.float().abs().amax() / 2688
r = candidate_ratios(64, "cuda")
for blocks in (32, 64, 128, 256):
    for warps in (1, 2, 4, 8):
        if blocks * 16 // (warps * 32) < 1:
            continue
        t = do_bench(lambda: search.search_nvfp4(w, gs, r, blocks, warps), warmup=10, rep=50, return_mode="median")
        print(json.dumps({"k": "nvfp4", "blocks": blocks, "warps": warps, "ms": t}), flush=True)
base = w.float().abs().reshape(12288, 32, 128).amax(-1)
for el in (1024, 2048, 4096, 8192):
    for warps in (2, 4, 8):
        t = do_bench(lambda: search.search_int(w, base, r, 128, 7.0, -8.0, el, warps), warmup=10, rep=50,
                     return_mode="median")
        print(json.dumps({"k": "int4", "elements": el, "warps": warps, "ms": t}), flush=True)

"""Tile sweep of the NVFP4 word kernel (fold and packed encoder) on one GPU: which rows x blocks per program and
warps per program move the most bytes per second. Launch constants change no value (each element's arithmetic and
each 16-block's max are the same whatever the tile), and this script checks it: every configuration's outputs must
equal the default configuration's bit for bit, else the row says so.

    python bench/sweep_nvfp4_tiles.py --out bench/results/nvfp4-tiles.json

Fractions are of a 4 GiB device-to-device copy timed in the same run (as bench/bench_kernels.py counts them).
"""
from __future__ import annotations

import argparse
import datetime
import itertools
import json
import os
import platform
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

import torch  # noqa: E402

SHAPES = [(12288, 4096)]  # the largest qwen3-8b weight (the target shape)
TILES_R = [4, 8, 16, 32]
TILES_B = [8, 16, 32]
WARPS = [2, 4, 8]


def copy_bandwidth(do_bench) -> float:
    a = torch.empty(1 << 31, dtype=torch.int16, device="cuda")
    b = torch.empty_like(a)
    t = do_bench(lambda: b.copy_(a), warmup=20, rep=200, return_mode="median") / 1e3
    return 2 * a.numel() * 2 / t


def outputs(fold_mod, w, gamax):
    packed, scales, gs, bad = fold_mod.encode_nvfp4(w, gamax, None)
    return [fold_mod.fold_nvfp4(w, gamax, None, w.dtype), packed, scales.view(torch.uint8), gs, bad]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    from triton.testing import do_bench

    from dist_export.numerics.kernels import fold as fold_mod

    default = (fold_mod.NVW_TR, fold_mod.NVW_TB, fold_mod.NVW_WARPS)
    bw = copy_bandwidth(do_bench)
    rows = []
    for shape in SHAPES:
        g = torch.Generator(device="cuda").manual_seed(0)
        w = torch.randn(shape, generator=g, device="cuda").to(torch.bfloat16)
        gamax = w.abs().amax().float()
        ref = outputs(fold_mod, w, gamax)
        n = w.numel()
        for tr, tb, nw in itertools.product(TILES_R, TILES_B, WARPS):
            if tr * tb * 8 < 32 * nw:  # fewer words than threads
                continue
            fold_mod.NVW_TR, fold_mod.NVW_TB, fold_mod.NVW_WARPS = tr, tb, nw
            try:
                same = all(torch.equal(a, b) for a, b in zip(outputs(fold_mod, w, gamax), ref))
                t_enc = do_bench(lambda: fold_mod.encode_nvfp4(w, gamax, None), warmup=10, rep=60,
                                 return_mode="median") / 1e3
                t_fold = do_bench(lambda: fold_mod.fold_nvfp4(w, gamax, None, w.dtype), warmup=10, rep=60,
                                  return_mode="median") / 1e3
            except Exception as e:  # a tile the compiler refuses (registers, shared memory): say so, go on
                rows.append({"shape": list(shape), "tr": tr, "tb": tb, "warps": nw, "error": str(e)[:200]})
                continue
            row = {"shape": list(shape), "tr": tr, "tb": tb, "warps": nw, "bit_exact_vs_default": same,
                   "encode_ms": t_enc * 1e3, "encode_frac_copy_bw": n * (2 + 0.5 + 1 / 16) / t_enc / bw,
                   "fold_ms": t_fold * 1e3, "fold_frac_copy_bw": n * 4 / t_fold / bw}
            rows.append(row)
            print(json.dumps(row), flush=True)
        fold_mod.NVW_TR, fold_mod.NVW_TB, fold_mod.NVW_WARPS = default
    with open(args.out, "w") as f:
        json.dump({"machine": f"{torch.cuda.get_device_name()} ({platform.node()})",
                   "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                   "git": os.environ.get("DIST_EXPORT_GIT", "unknown"), "command": " ".join(sys.argv),
                   "copy_bw": bw, "default": default, "rows": rows}, f, indent=1)
    for shape in SHAPES:
        ok = [r for r in rows if r["shape"] == list(shape) and r.get("bit_exact_vs_default")]
        for key in ("encode_frac_copy_bw", "fold_frac_copy_bw"):
            best = max(ok, key=lambda r: r[key])
            dflt = [r for r in ok if (r["tr"], r["tb"], r["warps"]) == default]
            print(f"{shape} {key}: best {best[key]:.2f} at tr={best['tr']} tb={best['tb']} warps={best['warps']}; "
                  f"default {dflt[0][key] if dflt else float('nan'):.2f}")
    bad = [r for r in rows if r.get("bit_exact_vs_default") is False]
    print(f"configurations not bit-exact vs the default: {len(bad)}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())

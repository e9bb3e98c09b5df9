"""Microbenchmark of the numerics kernels on one GPU: seconds per GB of bf16 weights and the fraction of HBM
bandwidth reached, per format, against the torch path on the same GPU (and a device-to-device copy).

    python bench/bench_kernels.py --out bench/results/kernels.json

For every (format, weight shape): time the Triton kernel and the pure-torch path (`DIST_EXPORT_KERNELS=0`) with
`triton.testing.do_bench_cudagraph` (replays of a captured CUDA graph: device time without the Python launch
cost, median; `with_launch_s` is the same call timed with events, launch included), check the two give the
same bits, and count the bytes each kernel must move (weight read + outputs written). Fractions are of the copy bandwidth
measured in the same run (a 4 GiB device-to-device copy) and of the H200's nominal 4.8 TB/s.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

import torch  # noqa: E402

NOMINAL_HBM = 4.8e12
# qwen3-8b's largest matrices (gate/up, down) and an attention projection
SHAPES = [(12288, 4096), (4096, 12288), (4096, 4096)]
CASES = [  # name, spec args, what runs, output bytes per element
    ("fp8-tensor fold", ("fp8", "tensor", None), "fake", 2.0),
    ("fp8-block128 fold", ("fp8", "block", 128), "fake", 2.0),
    ("fp8-block128 encode", ("fp8", "block", 128), "quant", 1.0),
    ("int4-g128 fold", ("int4", "group", 128), "fake", 2.0),
    ("nvfp4 fold", ("nvfp4", "group", 16), "fake", 2.0),
    ("nvfp4 encode", ("nvfp4", "group", 16), "quant", 0.5 + 1 / 16),
    ("nvfp4 mse64 search", ("nvfp4", "group", 16, "mse", 64), "search", 4 / 16),
    ("int4-g128 mse64 search", ("int4", "group", 128, "mse", 64), "search", 4 / 128),
    ("nvfp4 mse256 search", ("nvfp4", "group", 16, "mse", 256), "search", 4 / 16),
    ("nvfp4 mse512 search", ("nvfp4", "group", 16, "mse", 512), "search", 4 / 16),  # recipe nvfp4-mse-wide
]


def git_version() -> str:
    if os.environ.get("DIST_EXPORT_GIT"):  # a copy without .git (the GPU machine's carried tree)
        return os.environ["DIST_EXPORT_GIT"]
    try:
        return subprocess.run(["git", "describe", "--always", "--dirty"], capture_output=True, text=True,
                              cwd=os.path.dirname(HERE)).stdout.strip() or "unknown"
    except OSError:
        return "unknown"


def copy_bandwidth() -> float:
    from triton.testing import do_bench

    a = torch.empty(4 << 30, dtype=torch.uint8, device="cuda")
    b = torch.empty_like(a)
    t = do_bench(lambda: b.copy_(a), warmup=50, rep=300, return_mode="median") / 1e3
    return 2 * a.numel() / t


def runners(spec, what, w, amax, block_amax):
    """(kernel fn, torch fn) with the same result."""
    from dist_export.numerics import registry
    from dist_export.numerics.kernels import formats as kf
    from dist_export.numerics.mse import search_block_amax

    fmt = registry.get_format(spec.fmt)
    kern = {"fp8": kf.FP8, "int4": kf.INT, "int8": kf.INT, "nvfp4": kf.NVFP4}[spec.fmt]
    if what == "fake":
        return (lambda: kern.fake_quant(w, spec, amax, block_amax),
                lambda: fmt.fake_quant(w.float(), spec, amax, block_amax).to(w.dtype))
    if what == "quant" and spec.fmt == "nvfp4":  # the encoder without the adapter's one host sync (graph-safe)
        from dist_export.numerics.kernels.fold import encode_nvfp4

        return (lambda: encode_nvfp4(w, amax, block_amax),
                lambda: fmt.quantize(w.float(), spec, amax, block_amax), kern.quantize)
    if what == "quant":
        return (lambda: kern.quantize(w, spec, amax, block_amax),
                lambda: fmt.quantize(w.float(), spec, amax, block_amax))
    return (lambda: kern.search(w, spec, amax), lambda: search_block_amax(w, spec, amax))


def same(a, b) -> bool:
    if isinstance(a, dict):
        return all(same(a[k], b[k]) for k in b)
    if isinstance(a, tuple):
        return all((x is None and y is None) or same(x, y) for x, y in zip(a, b))
    a, b = a.contiguous().reshape(-1), b.contiguous().reshape(-1)
    return a.dtype == b.dtype and bool(torch.equal(a.view(torch.uint8), b.view(torch.uint8)))


def bench_case(name, spec_args, what, out_bpe, shape, copy_bw, torch_too=True):
    from triton.testing import do_bench, do_bench_cudagraph

    from dist_export.numerics import QuantSpec, compute_amax

    spec = QuantSpec(*spec_args)
    g = torch.Generator(device="cuda").manual_seed(0)
    w = (torch.randn(shape, generator=g, device="cuda") * 0.02).to(torch.bfloat16)
    amax = compute_amax(w, spec)
    kern, ref, *check = runners(spec, what, w, amax, None)
    try:  # CUDA-graph replays: the kernel's device time without the Python launch cost
        t_k = do_bench_cudagraph(kern, rep=100, return_mode="median") / 1e3
        timing = "cudagraph"
    except Exception:  # noqa: BLE001 - something in the path is not capturable
        t_k = do_bench(kern, warmup=25, rep=200, return_mode="median") / 1e3
        timing = "events"
    t_launch = do_bench(kern, warmup=25, rep=200, return_mode="median") / 1e3
    row = {"case": name, "shape": list(shape), "kernel_s": t_k, "timing": timing, "with_launch_s": t_launch}
    gb = w.numel() * 2 / 1e9
    moved = w.numel() * (2 + out_bpe)
    row.update(kernel_s_per_gb=t_k / gb, kernel_bytes=moved, kernel_bw=moved / t_k,
               frac_copy_bw=moved / t_k / copy_bw, frac_nominal=moved / t_k / NOMINAL_HBM)
    if torch_too:
        os.environ["DIST_EXPORT_KERNELS"] = "0"
        try:
            t0 = time.perf_counter()
            want = ref()
            torch.cuda.synchronize()
            if time.perf_counter() - t0 > 0.05:  # a slow torch path (the searches): one more call, timed alone
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                ref()
                end.record()
                end.synchronize()
                t_t = start.elapsed_time(end) / 1e3
            else:
                t_t = do_bench(ref, warmup=3, rep=30, return_mode="median") / 1e3
        finally:
            os.environ.pop("DIST_EXPORT_KERNELS")
        row.update(torch_s=t_t, torch_s_per_gb=t_t / gb, speedup=t_t / t_launch,
                   bit_exact=same((check[0] if check else kern)(w, spec, amax, None) if check else kern(), want))
    return row


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=None)
    ap.add_argument("--shapes", default=",".join(f"{r}x{c}" for r, c in SHAPES),
                    help="comma list of RxC weight shapes; the torch path is timed on the first only")
    ap.add_argument("--cases", default=None, help="comma list of substrings: only the cases whose name has one")
    args = ap.parse_args()
    shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")]
    cases = [c for c in CASES if args.cases is None or any(k in c[0] for k in args.cases.split(","))]
    copy_bw = copy_bandwidth()
    rows = []
    for name, spec_args, what, out_bpe in cases:
        for i, shape in enumerate(shapes):
            row = bench_case(name, spec_args, what, out_bpe, shape, copy_bw, torch_too=(i == 0))
            rows.append(row)
            print(json.dumps(row), flush=True)
            if args.out:  # after every row: a run stopped by a time limit keeps what it measured
                save(args.out, rows, copy_bw)
    if args.out:
        save(args.out, rows, copy_bw)
    return 0


def save(path: str, rows: list, copy_bw: float) -> None:
    result = {"machine": {"gpu": torch.cuda.get_device_name(0), "host": platform.node(), "torch": torch.__version__,
                          "triton": __import__("triton").__version__},
              "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
              "git": git_version(), "command": " ".join(["python"] + sys.argv),
              "copy_bw": copy_bw, "rows": rows}
    with open(f"{path}.tmp", "w") as f:
        json.dump(result, f, indent=1)
    os.replace(f"{path}.tmp", path)


if __name__ == "__main__":
    sys.exit(main())

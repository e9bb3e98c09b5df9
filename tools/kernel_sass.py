"""Compile the fold / encoder kernels for an H100/H200 (sm_90) on a machine WITHOUT a GPU and count what one
program executes, per element: SASS instructions (static: all of them, with the slow-path subroutine of the IEEE
divisions that normal inputs never enter, and the kernel body up to its last EXIT; both bound what runs),
global loads and stores and their widths, shared-memory traffic (layout
conversions) and atomics. A CPU-side check of a kernel change before GPU time is spent; NOT a performance
measurement (that is bench/bench_kernels.py on a GPU).

    python3 tools/kernel_sass.py            # needs `pip install triton` (its wheel carries ptxas and cuobjdump)

The launch specialisation is the one a 12288x4096 bf16 weight gets (pointers and sizes divisible by 16, strides
equal to 1 turned into constants), as Triton's JIT would apply it on the GPU.
"""
from __future__ import annotations

import collections
import os
import re
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.pop("TRITON_INTERPRET", None)

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

BIN = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")


def compile_sm90(fn, args: dict, constexprs: dict, num_warps: int = 4):
    """args: name -> (Triton type, value or None). Ints equal to 1 become constants, ints and pointers divisible
    by 16 get the divisibility hint (as the JIT does for a real launch). Returns (ttgir, ptx, sass)."""
    sig, attrs, cx = {}, {}, dict(constexprs)
    for i, name in enumerate(fn.arg_names):
        if name in cx:
            sig[name] = "constexpr"
            continue
        typ, val = args[name]
        if typ.startswith("*"):
            sig[name], attrs[(i,)] = typ, [["tt.divisibility", 16]]
        elif typ == "i32" and val == 1:
            sig[name], cx[name] = "constexpr", 1
        else:
            sig[name] = typ
            if typ == "i32" and val is not None and val % 16 == 0:
                attrs[(i,)] = [["tt.divisibility", 16]]
    k = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=cx, attrs=attrs),
                       target=GPUTarget("cuda", 90, 32), options={"enable_fp_fusion": False, "num_warps": num_warps})
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(k.asm["cubin"])
        f.flush()
        sass = subprocess.run([os.path.join(BIN, "cuobjdump"), "-sass", f.name], capture_output=True, text=True,
                              check=True).stdout
    return k.asm["ttgir"], k.asm["ptx"], sass


def stats(ttgir: str, ptx: str, sass: str, elements: int, threads: int) -> dict:
    ops = collections.Counter(re.findall(r"/\*[0-9a-f]{4}\*/\s+(?:@!?U?P\w+\s+)?([A-Z0-9_]+)", sass))
    lines = re.findall(r"/\*([0-9a-f]{4})\*/\s+(?:@!?U?P\w+\s+)?([A-Z0-9_]+)", sass)
    last_exit = max(i for i, (_, op) in enumerate(lines) if op == "EXIT")
    per_thread = elements / threads
    return {"instr_per_elem": sum(ops.values()) / per_thread, "main_per_elem": (last_exit + 1) / per_thread,
            "layout_conversions": ttgir.count("convert_layout"),
            "shared_ld_st": ops["LDS"] + ops["STS"], "global_loads": ops["LDG"], "global_stores": ops["STG"],
            "atomics": ops["RED"] + ops["ATOM"] + ops["ATOMG"],
            "load_widths": sorted(set(re.findall(r"ld\.global\.(\S+?)\s", ptx))),
            "store_widths": sorted(set(re.findall(r"st\.global\.(\S+?)\s", ptx)))}


def main() -> int:
    from dist_export.numerics.kernels import fold

    R, C = 12288, 4096
    ints = lambda **kv: {k: ("i32", v) for k, v in kv.items()}  # noqa: E731
    ptr = lambda *names, t="*fp32": {n: (t, 0) for n in names}  # noqa: E731
    tile = dict(TR=fold.TILE_R, NBT=1, CB=128, CH=128)
    cases = []
    tensor, block = (fold.WHOLE, fold.WHOLE, 0, 0), (128, 128, 32, 1)
    for name, (br, bc, ssr, ssb), fake in [("fp8 tensor fold", tensor, True), ("fp8 block-128 fold", block, True),
                                           ("fp8 block-128 encode", block, False)]:
        a = {"x_ptr": ("*bf16", 0), **ptr("amax_ptr", "inv_ptr"), **ptr("y_ptr", t="*i16" if fake else "*u8"),
             **ints(R=R, C=C, sx=C, sy=C, SSR=ssr, SSB=ssb)}
        cx = dict(BR=br, BC=bc, FAKE=fake, BF16=fake, EVEN=True, WIDE=False, SCALAR=ssr == 0, **tile)
        cases.append((name, fold._fp8_kernel, a, cx, 2048))
    a = {"x_ptr": ("*bf16", 0), **ptr("amax_ptr"), **ptr("y_ptr", t="*i16"), **ints(R=R, C=C, sx=C, sy=C, SSR=32, SSB=1),
         "MAXB": ("fp32", None), "MINB": ("fp32", None)}
    cases.append(("int4 group-128 fold", fold._int_kernel, a, dict(BC=128, BF16=True, EVEN=True, WIDE=False, SCALAR=False, **tile), 2048))
    for name, fake in [("nvfp4 fold", True), ("nvfp4 encode", False)]:
        a = {"w_ptr": ("*i32", 0), **ptr("gamax_ptr", "bamax_ptr", "gs_ptr"), **ptr("y_ptr", t="*i32" if fake else "*u8"),
             **ptr("scale_ptr", t="*u8"), **ptr("bad_ptr", t="*i32"), **ints(R=R, W=C // 2, sw=C // 2, sy=C // 2, NB=C // 16)}
        cx = dict(HAS_BAMAX=False, DT=0, FAKE=fake, TR=fold.NVW_TR, TB=fold.NVW_TB, EVEN=True, WIDE=False)
        cases.append((name, fold._nvfp4_word_kernel, a, cx, fold.NVW_TR * fold.NVW_TB * 16))
    print("| kernel (12288x4096 bf16, sm_90) | SASS instr per element: all (static) / kernel body | layout conversions | "
          "shared ld+st per thread | global loads / stores per thread | load / store widths | atomics |")
    print("|---|---|---|---|---|---|---|")
    for name, fn, a, cx, elements in cases:
        s = stats(*compile_sm90(fn, a, cx), elements, 128)
        print(f"| {name} | {s['instr_per_elem']:.1f} / {s['main_per_elem']:.1f} | {s['layout_conversions']} | {s['shared_ld_st']} | "
              f"{s['global_loads']} / {s['global_stores']} | {', '.join(s['load_widths'])} / "
              f"{', '.join(s['store_widths'])} | {s['atomics']} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())

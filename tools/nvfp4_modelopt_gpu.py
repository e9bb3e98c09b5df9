"""GPU diagnostic (issue 15): our NVFP4 fold against ModelOpt's own CUDA NVFP4 fake quant, weight by weight.

Runs on one CUDA device, in the user's process (no ranks). For every enabled NVFP4 weight quantizer of a tiny
ModelOpt-calibrated model it compares, bit for bit: ModelOpt's `quantizer(W)` (its Triton kernel), our
`numerics.fake_quant` with the quantizer mapped by `sources.quantizers`, and replicas of ModelOpt's kernel
arithmetic that change one operation at a time (global scale reciprocal, approximate vs IEEE fp32 division),
to name the operation that makes the two differ. Prints one JSON line.
"""
import copy
import json

import torch
import triton
import triton.language as tl

import modelopt.torch.quantization as mtq
import transformers

from dist_export.numerics import fake_quant
from dist_export.sources.quantizers import amax_in_our_layout, weight_spec
from dist_export.sources.synthetic import ensure_synthetic


@triton.jit
def _e2m1(a):
    return tl.where(a <= 0.25, 0.0, tl.where(a < 0.75, 0.5, tl.where(a <= 1.25, 1.0, tl.where(
        a < 1.75, 1.5, tl.where(a <= 2.5, 2.0, tl.where(a < 3.5, 3.0, tl.where(a <= 5.0, 4.0, 6.0)))))))


@triton.jit
def _replica(x_ptr, y_ptr, gs_ptr, n_blocks, RN_SCALE: tl.constexpr, RN_ELEM: tl.constexpr):
    """ModelOpt's fp4_fake_quant_kernel arithmetic for one block of 16 per program; RN_* pick IEEE division."""
    b = tl.program_id(0)
    offs = b * 16 + tl.arange(0, 16)
    x = tl.load(x_ptr + offs).to(tl.float32)
    gs = tl.load(gs_ptr)
    gs = tl.where(gs > 0.0, gs, 1e-12)
    bmax = tl.max(tl.abs(x), axis=0)
    if RN_SCALE:
        s = tl.math.div_rn(bmax, 6.0 * gs)
    else:
        s = bmax / (6.0 * gs)
    s = tl.minimum(s, 448.0).to(tl.float8e4nv).to(tl.float32) * gs
    s = tl.where(s >= 1e-5, s, 1.0)
    if RN_ELEM:
        a = tl.math.div_rn(tl.abs(x), s)
    else:
        a = tl.abs(x) / s
    q = _e2m1(a) * s
    tl.store(y_ptr + offs, tl.where(x >= 0, q, -q).to(y_ptr.dtype.element_ty))


def replica(w, gamax, reciprocal_gs, rn_scale, rn_elem):
    g = gamax.float().cuda()
    gs = g * (1.0 / 2688.0) if reciprocal_gs else g / torch.full_like(g, 2688.0)
    x = w.contiguous().reshape(-1)
    y = torch.empty_like(x)
    _replica[(x.numel() // 16,)](x, y, gs.reshape(1), x.numel() // 16, RN_SCALE=rn_scale, RN_ELEM=rn_elem)
    return y.reshape(w.shape)


def bits(t):
    return t.contiguous().view(torch.int16)


def run(name, cfg_name):
    folder = ensure_synthetic(f"synthetic:{name}")
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16).eval().cuda()
    data = torch.randint(0, model.config.vocab_size, (4, 16), generator=torch.Generator().manual_seed(0)).cuda()
    with torch.no_grad():
        model = mtq.quantize(model, copy.deepcopy(getattr(mtq, cfg_name)), lambda m: [m(data[i:i + 1]) for i in range(4)])
    variants = {"ours": None,
                "replica_modelopt": (True, False, False),       # torch CUDA scalar div = reciprocal multiply, approx fp32 div
                "replica_exact_gs": (False, False, False),
                "replica_rn_divs": (True, True, True),
                "replica_exact_all": (False, True, True)}       # should equal ours
    diff = {k: 0 for k in variants}
    total = 0
    gs_ulp = 0
    first = {}
    with torch.no_grad():
        for mname, mod in model.named_modules():
            q = getattr(mod, "weight_quantizer", None)
            if q is None or not q.is_enabled or not hasattr(mod, "weight") or mod.weight.dim() != 2:
                continue
            w = mod.weight.detach()
            theirs = q(w)
            spec = weight_spec(q, tuple(w.shape), mname)
            amax = amax_in_our_layout(q, spec, tuple(w.shape), mname)
            g = amax.float().cuda()
            gs_ulp += int((g / torch.full_like(g, 2688.0)).view(torch.int32).item() != (g / 2688.0).view(torch.int32).item())
            total += w.numel()
            for k, v in variants.items():
                mine = fake_quant(w, spec, amax) if v is None else replica(w, amax, *v)
                n = int((bits(mine) != bits(theirs)).sum())
                diff[k] += n
                if n and k not in first:
                    first[k] = mname
    return {"model": name, "config": cfg_name, "elements": total, "differing": diff, "first_layer": first,
            "layers_where_cuda_scalar_div_differs_from_exact": gs_ulp}


@triton.jit
def _cast(s_ptr, y_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    m = offs < n
    s = tl.load(s_ptr + offs, mask=m)
    tl.store(y_ptr + offs, s.to(tl.float8e4nv).to(tl.float32), mask=m)


def e4m3_cast_check():
    """Triton's fp32 -> float8e4nv against torch's float8_e4m3fn cast on every fp32 in [2**-12, 448]."""
    lo, hi = torch.tensor(2.0**-12).view(torch.int32).item(), torch.tensor(448.0).view(torch.int32).item()
    s = torch.arange(lo, hi + 1, 7, dtype=torch.int32, device="cuda").view(torch.float32)
    y = torch.empty_like(s)
    _cast[(triton.cdiv(s.numel(), 1024),)](s, y, s.numel(), BLOCK=1024)
    t = s.to(torch.float8_e4m3fn).float()
    bad = (y != t).nonzero().flatten()
    cpu = s.cpu().to(torch.float8_e4m3fn).float().cuda()
    return {"checked": s.numel(), "differ": int(bad.numel()), "torch_cuda_vs_cpu_differ": int((cpu != t).sum()),
            "examples": [[s[i].item(), y[i].item(), t[i].item()] for i in bad[:5].tolist()]}


if __name__ == "__main__":  # one JSON line: the replicas per model and config, then the e4m3 cast check
    out = [run(n, c) for n in ("llama-tiny", "qwen3-moe-tiny") for c in ("NVFP4_DEFAULT_CFG", "W4A16_NVFP4_CFG")]
    print(json.dumps({"torch": torch.__version__, "triton": triton.__version__, "gpu": torch.cuda.get_device_name(),
                      "results": out, "e4m3_cast": e4m3_cast_check()}))

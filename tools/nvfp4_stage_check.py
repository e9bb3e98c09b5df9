"""GPU diagnostic (issue 15), second step: where our NVFP4 fold differs between CUDA and CPU, and which of them
equals a replica of ModelOpt's kernel with IEEE divisions. One process, one device; prints one JSON line."""
import copy
import json

import torch

import modelopt.torch.quantization as mtq
import transformers

from dist_export.numerics import fake_quant
from dist_export.numerics.nvfp4 import block_scales
from dist_export.sources.quantizers import amax_in_our_layout, weight_spec
from dist_export.sources.synthetic import ensure_synthetic
from nvfp4_modelopt_gpu import bits, replica

folder = ensure_synthetic("synthetic:llama-tiny")
model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16).eval().cuda()
data = torch.randint(0, model.config.vocab_size, (4, 16), generator=torch.Generator().manual_seed(0)).cuda()
with torch.no_grad():
    model = mtq.quantize(model, copy.deepcopy(mtq.NVFP4_DEFAULT_CFG), lambda m: [m(data[i:i + 1]) for i in range(4)])
c = {k: 0 for k in ("cuda_vs_cpu", "cpu_vs_exact_replica", "cuda_vs_exact_replica", "cpu_vs_modelopt",
                    "bmax_cuda_vs_cpu", "s_e4m3_cuda_vs_cpu", "sq_cuda_vs_cpu", "gs_cuda_vs_cpu")}
with torch.no_grad():
    for name, mod in model.named_modules():
        q = getattr(mod, "weight_quantizer", None)
        if q is None or not q.is_enabled or getattr(mod, "weight", None) is None or mod.weight.dim() != 2:
            continue
        w = mod.weight.detach()
        spec = weight_spec(q, tuple(w.shape), name)
        amax = amax_in_our_layout(q, spec, tuple(w.shape), name)
        theirs = q(w).cpu()
        gpu, cpu = fake_quant(w, spec, amax).cpu(), fake_quant(w.cpu(), spec, amax)
        rep = replica(w, amax, False, True, True).cpu()
        c["cuda_vs_cpu"] += int((bits(gpu) != bits(cpu)).sum())
        c["cpu_vs_exact_replica"] += int((bits(cpu) != bits(rep)).sum())
        c["cuda_vs_exact_replica"] += int((bits(gpu) != bits(rep)).sum())
        c["cpu_vs_modelopt"] += int((bits(cpu) != bits(theirs)).sum())
        sg = block_scales(w.float(), amax.cuda(), None)
        sc = block_scales(w.float().cpu(), amax, None)
        for key, a, b in zip(("s_e4m3", "sq", "gs"), sg, sc):
            c[f"{key}_cuda_vs_cpu"] += int((a.cpu().reshape(-1).view(torch.int32) != b.reshape(-1).view(torch.int32)).sum())
        bg = w.float().abs().reshape(-1, 16).amax(1).cpu()
        bc = w.float().cpu().abs().reshape(-1, 16).amax(1)
        c["bmax_cuda_vs_cpu"] += int((bg != bc).sum())
print(json.dumps(c))

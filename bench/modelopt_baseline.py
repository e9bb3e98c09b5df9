"""NVIDIA ModelOpt's own path on the same model and recipe: load with transformers on one GPU, quantize with
max calibration on a few random batches, then `export_hf_vllm_fq_checkpoint`. Prints one JSON line, or a JSON
line with "error" saying exactly why it could not run."""
from __future__ import annotations

import argparse
import json
import resource
import sys
import time
import traceback


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--recipe", required=True)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    try:
        import modelopt
        import modelopt.torch.quantization as mtq
        import torch
        from modelopt.torch.export.plugins.vllm_fakequant_hf import export_hf_vllm_fq_checkpoint
        from transformers import AutoModelForCausalLM
    except Exception as e:  # noqa: BLE001
        print(json.dumps({"error": f"cannot import ModelOpt: {type(e).__name__}: {e}"}))
        return 0
    cfgs = {"fp8-block": "FP8_2D_BLOCKWISE_WEIGHT_ONLY_CFG", "nvfp4-mse": "NVFP4_DEFAULT_CFG",
            "nvfp4-w4a16": "NVFP4_DEFAULT_CFG", "int4-w4a16": "INT4_BLOCKWISE_WEIGHT_ONLY_CFG",
            "int4-w4a16-mse": "INT4_BLOCKWISE_WEIGHT_ONLY_CFG"}
    try:
        cfg = dict(getattr(mtq, cfgs[args.recipe]))
        if args.recipe.endswith("-mse"):
            cfg["algorithm"] = {"method": "mse"}
        t0 = time.monotonic()
        model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.bfloat16, device_map="cuda")
        t_load = time.monotonic() - t0

        def loop(m):
            g = torch.Generator().manual_seed(0)
            for _ in range(2):
                m(torch.randint(0, m.config.vocab_size, (1, 128), generator=g).cuda())

        tq = time.monotonic()
        model = mtq.quantize(model, cfg, loop)
        torch.cuda.synchronize()
        t_quant = time.monotonic() - tq
        te = time.monotonic()
        export_hf_vllm_fq_checkpoint(model, export_dir=args.out)
        t_export = time.monotonic() - te
        print(json.dumps({"modelopt": modelopt.__version__, "config": cfgs[args.recipe], "load_seconds": t_load,
                          "quantize_seconds": t_quant, "export_seconds": t_export,
                          "wall_seconds": time.monotonic() - t0,
                          "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
                          "peak_gpu": torch.cuda.max_memory_allocated()}))
    except Exception as e:  # noqa: BLE001
        print(json.dumps({"error": f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}",
                          "trace": traceback.format_exc()[-1500:]}))
    return 0


if __name__ == "__main__":
    sys.exit(main())

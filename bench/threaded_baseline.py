"""The design dist_export replaces, for comparison: one process, one worker thread per GPU for the quantize
step, then one serial write of the whole state dict (as the exporter that motivated dist_export does).

It uses dist_export's own numerics so the work per tensor is the same; only the orchestration differs.
Prints one JSON line: {"wall_seconds", "quantize_seconds", "write_seconds", "peak_rss", "peak_gpu"}.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import threading
import time

import torch
from huggingface_hub import split_torch_state_dict_into_shards
from safetensors.torch import save_file


sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # this checkout's dist_export


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--recipe", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--gpus", type=int, default=max(torch.cuda.device_count(), 1))
    args = ap.parse_args()

    from dist_export.sources.checkpoint import SourceCheckpoint
    from dist_export.quantize import device_outputs
    from dist_export.runtime.dist import DistContext
    from dist_export.plan import build_plan
    from dist_export.recipe import load_recipe
    from dist_export.output_formats import get_output_format

    t0 = time.monotonic()
    source = SourceCheckpoint(args.model)
    fmt = get_output_format("vllm-fq")
    plan = build_plan(source.tensors, load_recipe(args.recipe), fmt, 1, 1 << 62)
    if plan.groups:
        from dist_export.groups import measure_group_amax, merge_group_amax

        group_amax = merge_group_amax(plan, [measure_group_amax(DistContext(), plan, source)])
    else:
        group_amax = {}
    state = {name: source.read(item.meta) for name, item in plan.items.items()}  # the whole model in memory
    names = [n for n, i in plan.items.items() if i.quantized]
    devices = [torch.device("cuda", g) for g in range(args.gpus)] if torch.cuda.is_available() else [torch.device("cpu")]

    def worker(k: int) -> None:
        ctx = DistContext(device=devices[k])
        if devices[k].type == "cuda":
            torch.cuda.set_device(devices[k])
        for name in names[k::len(devices)]:
            item = plan.items[name]
            outs = device_outputs(ctx, item, state[name].to(devices[k]), fmt, {}, group_amax)
            state[name] = outs[0][1].to("cpu")

    tq = time.monotonic()
    threads = [threading.Thread(target=worker, args=(k,)) for k in range(len(devices))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    quantize_s = time.monotonic() - tq
    tw = time.monotonic()
    os.makedirs(args.out, exist_ok=True)
    split = split_torch_state_dict_into_shards(state, max_shard_size="5GB")
    for filename, tensor_names in split.filename_to_tensors.items():
        save_file({n: state[n].contiguous() for n in tensor_names}, os.path.join(args.out, filename),
                  metadata={"format": "pt"})
    if split.is_sharded:
        with open(os.path.join(args.out, "model.safetensors.index.json"), "w") as f:
            json.dump({"metadata": split.metadata, "weight_map": split.tensor_to_filename}, f)
    os.sync()
    write_s = time.monotonic() - tw
    peak_gpu = max((torch.cuda.max_memory_allocated(d) for d in devices if d.type == "cuda"), default=0)
    print(json.dumps({"wall_seconds": time.monotonic() - t0, "quantize_seconds": quantize_s, "write_seconds": write_s,
                      "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "peak_gpu": peak_gpu}))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Benchmark dist_export against the I/O floor and the alternatives, on one machine, in one run.

    python bench/bench_export.py                                  # GPU machine: qwen3-8b shape, 1..N GPUs
    python bench/bench_export.py --preset small --arch llama --device cpu --ranks 1,2   # CPU / CI-sized

Steps: (a) write a synthetic checkpoint (`--arch/--preset`, default qwen3 / qwen3-8b, 16.4 GB bf16);
(b) the I/O floor: copy the source folder to a new folder on the same disk, then `sync`; (c) `dist-export export`
at every rank count (`--nproc-per-node N`, or torchrun with `--launcher torchrun`), for a cheap recipe (fp8-block) and a compute-heavy one (nvfp4-mse);
(d) the thread-per-GPU design (bench/threaded_baseline.py) and ModelOpt's `export_hf_vllm_fq_checkpoint`
(bench/modelopt_baseline.py; if it cannot run, the reason is recorded); (e) wall time (each command followed by
`sync`, so written data is on disk for every tool), GB/s, per-rank peak host RSS and peak GPU memory.
Results go to `--results` (JSON); `bench/report.py` turns them into docs/benchmarks.md and a PNG plot.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)


def sh(cmd, env=None, check=True) -> tuple[float, subprocess.CompletedProcess]:
    """Run cmd then `sync`; wall seconds include the sync."""
    t0 = time.monotonic()
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, **(env or {})}, cwd=REPO)
    os.sync()
    dt = time.monotonic() - t0
    if check and proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
    return dt, proc


def folder_bytes(path: str) -> int:
    return sum(os.path.getsize(os.path.join(path, f)) for f in os.listdir(path))


def gpu_count() -> int:
    try:
        import torch

        return torch.cuda.device_count()
    except ImportError:
        return 0


def machine_info() -> dict:
    info = {"python": platform.python_version(), "host": platform.node(), "cpus": os.cpu_count(),
            "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")}
    try:
        import torch
        import transformers

        info.update(torch=torch.__version__, transformers=transformers.__version__)
        if torch.cuda.is_available():
            info["gpus"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    except ImportError:
        pass
    return info


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", default="qwen3")
    ap.add_argument("--preset", default="qwen3-8b")
    ap.add_argument("--workdir", default="/tmp/dist_export_bench")
    ap.add_argument("--ranks", default=None, help="comma list; default 1..number of GPUs (or 1,2 on CPU)")
    ap.add_argument("--recipes", default="fp8-block,nvfp4-mse", help="cheap first, compute-heavy second")
    ap.add_argument("--format", default="vllm-fq")
    ap.add_argument("--device", default=None, choices=["cpu", "cuda"])
    ap.add_argument("--no-baselines", action="store_true", help="same as --baselines none")
    ap.add_argument("--baselines", default="threads,modelopt",
                    help="comma list of the alternatives to run: threads, modelopt, or none")
    ap.add_argument("--launcher", default="builtin", choices=["builtin", "torchrun"],
                    help="how dist_export starts N>1 ranks: its own --nproc-per-node, or torchrun --standalone")
    ap.add_argument("--repeat", type=int, default=1, help="dist_export runs per (recipe, ranks); the report "
                                                           "uses the median")
    ap.add_argument("--results", default=os.path.join(HERE, "results.json"))
    ap.add_argument("--max-shard-size", default="1GB")
    ap.add_argument("--make-device", default=None, choices=["cpu", "cuda"],
                    help="where make-model generates the source weights (default: cuda when a GPU is visible, "
                         "seconds instead of minutes for qwen3-8b; the values differ from a cpu-generated model)")
    ap.add_argument("--baseline-recipes", default=None,
                    help="comma list: run the alternatives (--baselines) only for these recipes (default: all)")
    ap.add_argument("--no-render", action="store_true", help="do not render docs/benchmarks/<results name>.md")
    ap.add_argument("--deadline", type=float, default=None,
                    help="unix time: a run that would not finish by then (estimated from the recipe's previous "
                         "run, or 2x the copy floor) is skipped and listed under 'skipped' in the results")
    ap.add_argument("--threads-per-rank", default="auto",
                    help="OMP/torch threads per rank: a number, or auto = 4 with GPUs, cpus // ranks on CPU")
    args = ap.parse_args()
    baselines = set() if args.no_baselines else set(args.baselines.split(",")) - {"none", ""}
    unknown = baselines - {"threads", "modelopt"}
    if unknown:
        ap.error(f"--baselines: unknown {sorted(unknown)}; valid: threads, modelopt, none")

    gpus = gpu_count() if args.device != "cpu" else 0
    ranks = [int(r) for r in args.ranks.split(",")] if args.ranks else (list(range(1, gpus + 1)) or [1, 2])
    os.makedirs(args.workdir, exist_ok=True)
    src = os.path.join(args.workdir, f"src-{args.arch}-{args.preset}")
    results = {"machine": machine_info(), "git": os.environ.get("DIST_EXPORT_GIT", ""),
               "model": f"{args.arch}-{args.preset}", "format": args.format,
               "command": " ".join([sys.executable, *sys.argv]), "runs": []}

    # (a) the source checkpoint
    if not os.path.isfile(os.path.join(src, "config.json")):
        shutil.rmtree(src, ignore_errors=True)
        make_device = args.make_device or ("cuda" if gpus else "cpu")
        dt, _ = sh([sys.executable, "-m", "dist_export", "make-model", "--arch", args.arch, "--preset", args.preset,
                    "--out", src, "--device", make_device])
        results["make_model"] = {"seconds": dt, "device": make_device}
        print(f"make-model (--device {make_device}): {dt:.1f} s", flush=True)
    results["source_bytes"] = folder_bytes(src)

    # (b) the I/O floor: copy + sync on the same disk
    dst = os.path.join(args.workdir, "copy")
    shutil.rmtree(dst, ignore_errors=True)
    dt, _ = sh(["cp", "-r", src, dst])
    results["copy_floor_seconds"] = dt
    shutil.rmtree(dst, ignore_errors=True)
    print(f"I/O floor (cp -r + sync): {dt:.2f} s for {results['source_bytes'] / 1e9:.2f} GB", flush=True)
    save(args.results, results)

    def threads(n: int) -> str:
        if args.threads_per_rank != "auto":
            return args.threads_per_rank
        return "4" if gpus else str(max(1, (os.cpu_count() or 1) // n))

    results["threads_per_rank"] = args.threads_per_rank
    results["launcher"] = args.launcher
    results["skipped"] = []
    baseline_recipes = set(args.baseline_recipes.split(",")) if args.baseline_recipes else None
    last_wall: dict = {}

    def fits(what: str, key, floors: float = 2.0) -> bool:
        """False (and the run listed as skipped) when it would not finish by --deadline."""
        if args.deadline is None:
            return True
        floor = results["copy_floor_seconds"]
        estimate = last_wall.get(key, max(floors * floor, floor + 8.0))  # 8 s: start-up and exit at least
        if time.time() + estimate <= args.deadline:
            return True
        results["skipped"].append(f"{what}: about {estimate:.0f} s, {max(0.0, args.deadline - time.time()):.0f} s "
                                  f"left before --deadline")
        print(f"skipped (deadline): {what}", flush=True)
        save(args.results, results)
        return False

    for recipe in args.recipes.split(","):
        with_baselines = baselines if baseline_recipes is None or recipe in baseline_recipes else set()
        for n in ranks:
            env = {"OMP_NUM_THREADS": threads(n)}
            for trial in range(args.repeat):
                if not fits(f"dist_export {recipe} {n} rank(s) run {trial + 1}", (recipe, n)):
                    continue
                run = run_dist_export(args, src, recipe, n, env)
                run["trial"] = trial
                if "error" not in run:
                    last_wall[(recipe, n)] = run["wall_seconds"]
                results["runs"].append(run)
                save(args.results, results)
                print(json.dumps(run), flush=True)
            if "threads" in with_baselines and fits(f"threads {recipe} {n}", ("threads", recipe, n)):
                out = os.path.join(args.workdir, f"thr-{recipe}-{n}")
                dt, proc = sh([sys.executable, os.path.join(HERE, "threaded_baseline.py"), "--model", src,
                               "--recipe", recipe, "--out", out, "--gpus", str(n)], env=env, check=False)
                rec = _last_json(proc) or {"error": proc.stderr[-500:]}
                results["runs"].append({"tool": "threads", "recipe": recipe, "ranks": n, "wall_seconds": dt, **rec})
                save(args.results, results)
                print(json.dumps(results["runs"][-1]), flush=True)
                shutil.rmtree(out, ignore_errors=True)
        if "modelopt" in with_baselines and gpus and fits(f"modelopt {recipe}", ("modelopt", recipe), 3.0):
            out = os.path.join(args.workdir, f"modelopt-{recipe}")
            dt, proc = sh([sys.executable, os.path.join(HERE, "modelopt_baseline.py"), "--model", src, "--recipe",
                           recipe, "--out", out], check=False)
            rec = _last_json(proc) or {"error": proc.stderr[-500:]}
            results["runs"].append({"tool": "modelopt", "recipe": recipe, "ranks": 1, "wall_seconds": dt, **rec})
            save(args.results, results)
            print(json.dumps(results["runs"][-1]), flush=True)
            shutil.rmtree(out, ignore_errors=True)

    save(args.results, results)
    print(f"results: {args.results}")
    if args.no_render:
        return 0
    try:
        from report import render

        render(args.results)
    except ImportError as e:
        print(f"report not rendered here ({e}); run bench/report.py {args.results}")
    return 0


def save(path: str, results: dict) -> None:
    """Written after every run, so a run killed by a time limit still leaves what it measured."""
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(results, f, indent=1)
    os.replace(tmp, path)


def run_dist_export(args, src: str, recipe: str, n: int, env: dict) -> dict:
    out = os.path.join(args.workdir, f"out-{recipe}-{n}")
    shutil.rmtree(out, ignore_errors=True)
    os.sync()  # the deletion's write-back is not charged to the next run
    summary = os.path.join(args.workdir, f"summary-{recipe}-{n}.json")
    if n > 1 and args.launcher == "torchrun":
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={n}",
               "-m", "dist_export", "export"]
    else:
        cmd = [sys.executable, "-m", "dist_export", "export"] + (["--nproc-per-node", str(n)] if n > 1 else [])
    cmd += ["--model", src, "--recipe", recipe, "--format", args.format, "--out", out, "--no-verify",
            "--max-shard-size", args.max_shard_size, "--summary-json", summary]
    if args.device:
        cmd += ["--device", args.device]
    dt, proc = sh(cmd, env=env, check=False)
    if proc.returncode != 0:  # recorded, and the benchmark goes on with the next run
        shutil.rmtree(out, ignore_errors=True)
        return {"tool": "dist_export", "recipe": recipe, "ranks": n, "wall_seconds": dt,
                "error": f"exit {proc.returncode}: {proc.stderr.strip()[-1500:]}"}
    with open(summary) as f:
        s = json.load(f)
    run = {"tool": "dist_export", "recipe": recipe, "ranks": n, "wall_seconds": dt,
           "export_seconds": s["wall_seconds"], "stage_seconds": s.get("stage_seconds", {}),
           "bytes_written": s["bytes_written"], "gb_per_s": s["bytes_written"] / dt / 1e9,
           "peak_rss_per_rank": [r["peak_rss"] for r in s["ranks"]],
           "peak_gpu_per_rank": [r["peak_gpu"] for r in s["ranks"]],
           "largest_shard": max(os.path.getsize(os.path.join(out, f)) for f in os.listdir(out)
                                if f.endswith(".safetensors"))}
    shutil.rmtree(out, ignore_errors=True)
    return run


def _last_json(proc) -> dict | None:
    for line in reversed(proc.stdout.strip().splitlines()):
        try:
            return json.loads(line)
        except json.JSONDecodeError:
            continue
    return None


if __name__ == "__main__":
    sys.path.insert(0, HERE)
    sys.exit(main())

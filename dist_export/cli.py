"""Command line: `dist-export {export,calibrate,make-model,verify,plan}` (also `python -m dist_export`).

Thin by design: parse, set up logging with the rank, call the stage, turn a user's mistake into one line on
stderr and a non-zero exit.
"""
from __future__ import annotations

import argparse
import json
import importlib
import logging
import os
import sys

from .version import __version__

log = logging.getLogger("dist_export")


def _recipe_help() -> str:
    from .recipe_names import available_recipes

    return (f"one of {', '.join(available_recipes())}, a ModelOpt / llm-compressor name of one "
            f"(`dist-export recipes`), or a .yaml path")


def _formats() -> list[str]:
    from .options import BUILTIN_OUTPUT_FORMATS

    return sorted(BUILTIN_OUTPUT_FORMATS)


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


MODEL_HELP = ("a checkpoint folder, a Hugging Face Hub id org/name (from the HF cache first; HF_HUB_OFFLINE=1 "
              "never downloads; only safetensors and side files are fetched) or synthetic:<arch>-<preset>; "
              "without it the built-in demo model synthetic:llama-tiny (random weights), with a warning")


def _add_model(p):
    p.add_argument("--model", default=None, help=MODEL_HELP)
    p.add_argument("--revision", default=None, help="branch, tag or commit of a Hub id (default: main)")


def _add_quantizer_state(p):
    """--quantizer-state and --modelopt-kernels, the same for `export` and `plan`."""
    p.add_argument("--quantizer-state", default=None, metavar="FILE",
                   help="the quantizers of a ModelOpt-calibrated model, from dist_export.save_quantizer_state(model, "
                        "FILE); --model is the checkpoint folder that model was loaded from (or saved to)")
    p.add_argument("--modelopt-kernels", action="store_true",
                   help="with --quantizer-state: run each weight through its own ModelOpt quantizer on the rank "
                        "(bit for bit ModelOpt's export on that device; needs ModelOpt, --format vllm-fq) instead of "
                        "dist_export's exact arithmetic")


def _add_kv_cache(p, what: str):
    """--kv-cache, the same for `export`, `calibrate` and `plan`."""
    from .options import KV_CACHE_CHOICES

    p.add_argument("--kv-cache", default=None, choices=KV_CACHE_CHOICES,
                   help=f"fp8: quantize the KV cache (one static FP8 scale per attention layer for K and one for V, "
                        f"max|key| / max|value| after RoPE from calibration, / 448; written as compressed-tensors "
                        f"kv_cache_scheme + k_scale/v_scale, modelopt kv_cache_quant_algo FP8, vllm-fq k_bmm/"
                        f"v_bmm quantizer state; --format fp8-block has no slot for it); none: keep it in the model "
                        f"dtype; {what} (default: the recipe's own kv_cache key, none in every packaged recipe)")


def _add_export(sub):
    from .options import DEFAULT_RECIPE, DEFAULTS

    p = sub.add_parser("export", help="quantize and export a checkpoint (run under torchrun for several ranks)")
    _add_model(p)
    p.add_argument("--recipe", default=DEFAULTS.recipe, metavar="RECIPE",
                   help=f"{_recipe_help()}; with --quantizer-state the saved quantizers are the recipe and a recipe "
                        f"given too must agree with them (default: {DEFAULT_RECIPE})")
    _add_quantizer_state(p)
    p.add_argument("--out", required=True, help="output folder (new or empty)")
    p.add_argument("--format", default=DEFAULTS.format, choices=_formats(), help="output format")
    p.add_argument("--calib", default=DEFAULTS.calib, help="calibration file from `dist-export calibrate`")
    _add_kv_cache(p, "the calibration file must be made with the same --kv-cache")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an earlier export in --out (only the files its record names; a folder holding any "
                        "other file is refused)")
    p.add_argument("--resume", action="store_true", help="finish an interrupted export, reusing checked shards")
    p.add_argument("--allow-nonfinite", action="store_true",
                   help="copy unquantized tensors (norms, biases, embeddings, excluded weights) even when they hold "
                        "NaN or inf (recorded in dist_export.json); by default that is an error naming the tensor")
    p.add_argument("--allow-foreign-files", action="store_true",
                   help="export into a folder holding files dist_export did not write; they are kept untouched")
    p.add_argument("--device", choices=["cpu", "cuda"], default=DEFAULTS.device, help="default: cuda if available")
    p.add_argument("--max-shard-size", default=DEFAULTS.max_shard_size, help="largest output file")
    _add_timeouts(p)
    p.add_argument("--no-verify", action="store_true", help="skip the structural check of the staged export before it is published")
    p.add_argument("--summary-json", default=None, help="write the run summary (timings, bytes, RSS) here")
    p.add_argument("--nproc-per-node", type=int, default=1, metavar="N",
                   help="start N ranks on this machine (one per GPU) without torchrun")


def _add_timeouts(p):
    """--hang-timeout / --dead-timeout, the same for `export` and `calibrate`."""
    from .options import DEFAULTS

    p.add_argument("--hang-timeout", type=float, default=DEFAULTS.hang_timeout,
                   help="seconds without progress before a rank counts as hung")
    p.add_argument("--dead-timeout", type=float, default=DEFAULTS.dead_timeout,
                   help="seconds without heartbeat before a rank counts as dead; also the most a rank waits "
                        "at start-up for its peers to form the process group")


def _add_calibrate(sub):
    p = sub.add_parser("calibrate", help="max-calibrate activation amax for a recipe's static input quantizers "
                                         "(data-parallel under a launcher: each rank a slice of the samples)")
    _add_model(p)
    p.add_argument("--recipe", required=True, metavar="RECIPE", help=_recipe_help())
    p.add_argument("--out", required=True, help="calibration file to write (.safetensors)")
    _add_kv_cache(p, "fp8 records the K/V amax too, for an export with --kv-cache fp8")
    data = p.add_mutually_exclusive_group(required=True)
    data.add_argument("--data", default=None, help="a .txt file (one sample per line), a .jsonl file (`text` or "
                      "chat `messages`, rendered with the tokenizer's chat template) or a dataset folder")
    data.add_argument("--random-tokens", action="store_true",
                      help="seeded random token ids instead of data: for tests only (useless scales)")
    p.add_argument("--num-samples", type=_positive_int, default=16, help="calibration samples")
    p.add_argument("--seq-len", type=_positive_int, default=128, help="tokens per sample (longer ones are cut)")
    p.add_argument("--batch-size", type=_positive_int, default=1,
                   help="samples per forward (right-padded; padded tokens are not observed)")
    p.add_argument("--seed", type=int, default=0, help="seed of --random-tokens")
    p.add_argument("--device", choices=["cpu", "cuda"], default=None, help="default: cuda if available")
    p.add_argument("--device-map", default=None, help='e.g. "auto": one process spreads the model over the GPUs '
                                                      '(transformers device_map)')
    p.add_argument("--trust-remote-code", action="store_true", help="let transformers import the model's own code")
    _add_timeouts(p)
    p.add_argument("--nproc-per-node", type=int, default=1, metavar="N",
                   help="start N ranks on this machine, each calibrating its share of the samples")


def _add_make_model(sub):
    from .sources.archs import ARCHS

    p = sub.add_parser("make-model", help="write a synthetic HF checkpoint with deterministic random weights")
    p.add_argument("--arch", required=True, choices=sorted(ARCHS))
    p.add_argument("--preset", default="tiny", help="tiny, small, or a real model's shape (e.g. qwen3-8b)")
    p.add_argument("--out", required=True, help="folder to write the checkpoint into")
    p.add_argument("--seed", type=int, default=0, help="seed of the random weights")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"], help="weight dtype")
    p.add_argument("--max-shard-size", default="4GB", help="largest safetensors file")
    p.add_argument("--source-format", default=None, choices=["fp8-block", "mxfp4", "compressed-tensors"],
                   help="write the checkpoint already quantized (FP8 128x128 blocks, gpt-oss MXFP4 experts, or "
                        "compressed-tensors W8A16), as such models ship; default: the preset's own")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"],
                   help="generate the weights there (cuda: much faster for large presets; the values then follow "
                        "the CUDA random generator, so they differ from a cpu-generated model of the same seed)")


def _add_verify(sub):
    p = sub.add_parser("verify", help="check an exported folder; with --source recompute every tensor")
    p.add_argument("dir")
    p.add_argument("--source", default=None, help="source model (folder or synthetic:...) to recompute against")
    p.add_argument("--json", default=None, help="write the report as JSON to this file ('-' for stdout)")


def _add_plan(sub):
    from .options import DEFAULT_RECIPE, DEFAULTS

    p = sub.add_parser("plan", help="print the shard layout and per-rank balance for a world size (no writes)")
    _add_model(p)
    p.add_argument("--recipe", default=DEFAULTS.recipe, metavar="RECIPE",
                   help=f"{_recipe_help()}; with --quantizer-state it must agree with the saved quantizers "
                        f"(default: {DEFAULT_RECIPE}, or the saved quantizers)")
    _add_quantizer_state(p)
    p.add_argument("--format", default=DEFAULTS.format, choices=_formats(), help="output format")
    _add_kv_cache(p, "plans the K/V scales as export does")
    p.add_argument("--world-size", type=_positive_int, default=8, help="simulated world size (ignored under torchrun)")
    p.add_argument("--max-shard-size", default=DEFAULTS.max_shard_size, help="largest output file")
    p.add_argument("--metadata-only", action="store_true",
                   help="for synthetic:... models: plan from the shapes alone, without generating the weights")
    p.add_argument("--json", action="store_true",
                   help="print per-rank items, cost, bytes and node with the max/mean cost imbalance as JSON")
    p.add_argument("--nnodes", type=_positive_int, default=1, help="simulated node count (world size = nnodes * "
                   "ranks per node; a shard's writers are all on one node; ignored under torchrun)")


def _add_recipes(sub):
    sub.add_parser("recipes", help="list the recipes with their ModelOpt and llm-compressor names",
                   description="List the packaged recipes; each one also answers to the ModelOpt and llm-compressor "
                               "names shown (same quantization).")


EXAMPLES = """examples:
  dist-export export --model org/name --recipe fp8-block --out out/fp8       # Hub id (HF cache, HF_HUB_OFFLINE)
  dist-export export --model models/q3moe --recipe FP8_DYNAMIC --out out/q3  # a ModelOpt / llm-compressor name
  dist-export export --nproc-per-node 8 --model /models/Qwen3-8B --recipe nvfp4-w4a16 --out out/q8
  dist-export recipes                                                         # every recipe and its aliases
"""


class _HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """The default in every --help line that has one (not for flags and unset options), examples kept as written."""

    def _get_help_string(self, action):
        text = action.help or ""
        default = action.default
        if "default" in text or any(default is v for v in (None, False, argparse.SUPPRESS)) or not action.option_strings:
            return text
        return f"{text} (default: {default})" if text else f"default: {default}"


class _Parser(argparse.ArgumentParser):
    """A usage mistake is one line on stderr, in the same form as every other error, and exit code 2."""

    def error(self, message):
        rank = os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0"))
        self.exit(2, f"[rank {rank}] error: {self.prog}: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="dist-export", description="Export quantized HF LLMs on every GPU at once.",
                                     epilog=EXAMPLES, formatter_class=_HelpFormatter)
    parser.add_argument("--version", action="version", version=f"dist_export {__version__}")
    verbose = _Parser(add_help=False)
    verbose.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS,
                         help="INFO logs on every rank (before or after the command)")
    parser.add_argument("-v", "--verbose", action="store_true", default=False, help="INFO logs on every rank")
    sub = parser.add_subparsers(dest="command", required=True)
    real_add_parser = sub.add_parser

    def add_parser(name, **kw):  # every command takes -v, shows defaults, and the examples
        kw.setdefault("epilog", EXAMPLES)
        return real_add_parser(name, parents=[verbose], formatter_class=_HelpFormatter, **kw)

    sub.add_parser = add_parser
    for add in (_add_export, _add_calibrate, _add_make_model, _add_verify, _add_plan, _add_recipes):
        add(sub)
    return parser


def cmd_export(args) -> int:
    from .api import export
    from .runtime.dist import launcher_env

    if args.summary_json:
        _check_summary_path(args.summary_json)  # before the export: a run that fails here has published nothing
    summary = export(args.model, args.out, revision=args.revision, recipe=args.recipe, format=args.format,
                     calib=args.calib, kv_cache=args.kv_cache, overwrite=args.overwrite, resume=args.resume,
                     allow_foreign_files=args.allow_foreign_files, allow_nonfinite=args.allow_nonfinite,
                     device=args.device,
                     max_shard_size=args.max_shard_size, hang_timeout=args.hang_timeout,
                     dead_timeout=args.dead_timeout, verify=not args.no_verify,
                     quantizer_state=args.quantizer_state, modelopt_kernels=args.modelopt_kernels)
    layout = launcher_env()
    if args.summary_json and (layout is None or layout["rank"] == 0):  # torchrun, Slurm or one process: rank 0
        with open(args.summary_json, "w") as f:
            json.dump(summary, f, indent=1)
    return 0


def _check_summary_path(path: str) -> None:
    folder = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path):
        raise ValueError(f"--summary-json {path} is a folder; pass a file name")
    if not os.path.isdir(folder):
        raise ValueError(f"--summary-json {path}: the folder {folder} does not exist; create it or pass another path")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise ValueError(f"--summary-json {path}: the folder {folder} is not writable; pass another path")


def cmd_calibrate(args) -> int:
    from .calibration.run import calibrate

    calibrate(args.model, args.recipe, args.out, data=args.data, random_tokens=args.random_tokens,
              num_samples=args.num_samples, seq_len=args.seq_len, seed=args.seed, device_map=args.device_map, trust_remote_code=args.trust_remote_code,
              batch_size=args.batch_size, revision=args.revision, device=args.device, kv_cache=args.kv_cache,
              hang_timeout=args.hang_timeout, dead_timeout=args.dead_timeout)
    return 0


def cmd_make_model(args) -> int:
    from .options import parse_size
    from .sources.synthetic import make_model

    if args.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise ValueError("make-model --device cuda: no CUDA device is visible; use --device cpu")
    make_model(args.arch, args.preset, args.out, seed=args.seed, dtype=args.dtype,
               max_shard_size=parse_size(args.max_shard_size), source_format=args.source_format, device=args.device)
    return 0


def cmd_verify(args) -> int:
    from .api import resolve_model
    from .verify import format_report, verify_export

    source = resolve_model(args.source) if args.source else None
    report = verify_export(args.dir, source_dir=source)
    text = json.dumps(report, indent=1)
    if args.json == "-":
        print(text)  # stdout holds the JSON alone; the readable report goes to stderr
        print(format_report(report), file=sys.stderr)
    else:
        print(format_report(report))
        if args.json:
            with open(args.json, "w") as f:
                f.write(text)
    return 0 if report["ok"] else 1


def cmd_plan(args) -> int:
    """Plan only (no tensor data is read or written). Under torchrun every rank plans and the ranks check
    that they agree, as a real export does; otherwise --world-size is simulated."""
    from .api import OpenedSource, plan_inputs, resolve_model
    from .options import ExportOptions
    from .plan import rank_loads
    from .runtime.dist import init_distributed

    ctx = init_distributed("cpu")
    world = ctx.world_size if ctx.is_distributed else args.world_size
    if world < 1:
        raise ValueError(f"--world-size must be at least 1, got {world}")
    opts = ExportOptions(recipe=args.recipe, format=args.format, max_shard_size=args.max_shard_size,
                         quantizer_state=args.quantizer_state, modelopt_kernels=args.modelopt_kernels,
                         kv_cache=args.kv_cache)

    def open_source():
        if args.model and args.model.startswith("synthetic:") and args.metadata_only:
            from types import SimpleNamespace

            from .sources.synthetic import synthetic_metadata

            return OpenedSource(None, SimpleNamespace(tensors=synthetic_metadata(args.model)), args.model)
        from .sources.checkpoint import SourceCheckpoint

        src_dir = resolve_model(args.model, args.revision)
        return OpenedSource(src_dir, SourceCheckpoint(src_dir), args.model)

    try:
        nnodes = ctx.nnodes if ctx.is_distributed else args.nnodes
        inputs = ctx.agree("plan", lambda: plan_inputs(open_source, None, opts, world, nnodes),
                           lambda i: i.plan.digest())
        plan = inputs.plan
        quantized = sum(item.quantized for item in plan.items.values())
        for warning in plan.warnings if ctx.is_rank0 else ():
            log.warning("%s", warning)
        if ctx.is_rank0 and args.json:
            from .plan import plan_summary

            print(json.dumps({**plan_summary(plan, inputs.output_format), "recipe": inputs.recipe.name,
                              "kv_cache": inputs.recipe.kv_cache or "none", "quantized_items": quantized}, indent=1))
        elif ctx.is_rank0:
            kv = f" + {inputs.recipe.kv_cache} KV cache" if inputs.recipe.kv_cache else ""
            print(f"recipe {inputs.recipe.name}{kv}: {len(plan.items)} items ({quantized} quantized), "
                  f"{len(plan.shards)} shards, {plan.total_size / 1e9:.3f} GB out, "
                  f"{len(plan.groups)} shared-amax groups, world size {world} on {nnodes} node(s)"
                  + (f", {world} ranks agree on digest {plan.digest()[:12]}" if ctx.is_distributed else ""))
            loads = rank_loads(plan, inputs.output_format)
            mean_cost = sum(d["cost"] for d in loads) / len(loads)
            for d in loads:
                print(f"  rank {d['rank']} (node {d['node']}): {d['items']} items in {d['shards']} shards, in "
                      f"{d['bytes_in'] / 1e9:.3f} GB, out {d['bytes_out'] / 1e9:.3f} GB, cost "
                      f"{d['cost'] / mean_cost if mean_cost else 0:.3f} x mean")
    finally:
        ctx.close()
    return 0


def cmd_recipes(args) -> int:
    from .recipe import load_recipe, packaged_recipes
    from .recipe_names import recipes_listing

    print("\n".join(recipes_listing({n: load_recipe(n).description for n in packaged_recipes()})))
    return 0


def _one_line(e: BaseException, args) -> str:
    """One line for the user; disk errors get the remedy that fits them."""
    import errno

    root = e
    while root.__cause__ is not None and not isinstance(root, OSError):
        root = root.__cause__
    msg = str(e).splitlines()[0] if str(e) else type(e).__name__
    if isinstance(root, OSError) and root.errno in (errno.ENOSPC, errno.EDQUOT):
        out = getattr(args, "out", "the output folder")
        return (f"{msg}: the disk holding {out} is full; free space (finished shards are kept) and rerun with "
                f"--resume, or choose another --out")
    if isinstance(root, OSError) and not isinstance(e, (ValueError, RuntimeError)) and root.errno is not None:
        return f"{msg}: check the path and its permissions"
    return msg


def _interrupted_line(args) -> str:
    """What an interrupted command leaves behind, and how to go on."""
    out = getattr(args, "out", None)
    if args.command == "calibrate":
        return f"interrupted: {out} was not written; rerun the same command"
    if args.command != "export" or out is None:
        return "interrupted"
    from .layout import INDEX_NAME, SINGLE_NAME

    if any(os.path.exists(os.path.join(out, n)) for n in (INDEX_NAME, SINGLE_NAME)):
        return f"interrupted: {out} holds a complete, published export (`dist-export verify {out}` checks it)"
    return (f"interrupted: no index was written; finished shards are kept in {out}: rerun the same command with "
            f"--resume to finish (or --overwrite to start over)")


COMMANDS = {"export": cmd_export, "calibrate": cmd_calibrate, "make-model": cmd_make_model, "verify": cmd_verify,
            "plan": cmd_plan, "recipes": cmd_recipes}


def _interrupt_once() -> None:
    """The first Ctrl-C unwinds the command (one line below); later ones are ignored: a rank of `--nproc-per-node`
    gets the terminal's SIGINT and the launcher's forwarded one, and a second KeyboardInterrupt raised while the
    first is handled would end in a traceback."""
    import signal
    import threading

    from .runtime.signals import ignore_from_now_on

    def once(signum, frame):
        ignore_from_now_on(signal.SIGINT)
        raise KeyboardInterrupt

    current = signal.getsignal(signal.SIGINT)
    if threading.current_thread() is threading.main_thread() and (
            current is signal.default_int_handler or getattr(current, "loading", False)):
        signal.signal(signal.SIGINT, once)


def _default_sigterm() -> None:
    """The loading-time SIGTERM line (launch.die_with_launcher) ends here: from now on the start-up guard and the
    monitor handle SIGTERM, and outside them it is the default (no line claiming start-up)."""
    import signal

    if getattr(signal.getsignal(signal.SIGTERM), "loading", False):
        signal.signal(signal.SIGTERM, signal.SIG_DFL)


# The modules each command loads (torch and friends: seconds), imported while Ctrl-C still ends the process at
# once (__main__), so a KeyboardInterrupt is never raised inside an import.
HEAVY = {"export": ".api", "plan": ".api", "calibrate": ".calibration.run", "verify": ".verify",
         "make-model": ".sources.synthetic", "recipes": ".recipe"}


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    from .runtime.launch import die_with_launcher

    die_with_launcher()  # a rank of `--nproc-per-node`: ends with the launcher, even a SIGKILLed one
    args = build_parser().parse_args(argv)
    from .runtime.log import setup_logging

    rank = int(os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0")))
    setup_logging(rank, args.verbose)
    try:
        if getattr(args, "nproc_per_node", 1) != 1:
            from .runtime.launch import launch_local, strip_option

            return launch_local(strip_option(argv, "--nproc-per-node"), args.nproc_per_node)
        importlib.import_module(HEAVY[args.command], __package__)
        _interrupt_once()
        _default_sigterm()
        return COMMANDS[args.command](args)
    except (ValueError, FileNotFoundError, RuntimeError, OSError) as e:
        msg = _one_line(e, args)
        print(f"[rank {rank}] error: {msg}", file=sys.stderr, flush=True)
        if os.environ.get("DIST_EXPORT_DEBUG"):
            raise
        return 1
    except KeyboardInterrupt:
        if rank == 0 or args.verbose:  # one line for the job (every rank got the terminal's Ctrl-C)
            print(f"[rank {rank}] {_interrupted_line(args)}", file=sys.stderr, flush=True)
        return 130


def run() -> None:
    """Entry point of `dist-export` and `python -m dist_export`: every file the commands write is closed and
    fsynced before they return, so the process ends at once (`os._exit`) instead of tearing the interpreter
    and torch down one module at a time, which takes longer than a small export."""
    rc = main()
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(rc)


if __name__ == "__main__":
    run()

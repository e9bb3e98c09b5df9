"""Export options: every default of `export()` and `dist-export export`, once.

Read by `api.py` (the orchestrator, on every rank) and `cli.py` (flag defaults and help). A new export option is a
field here plus its CLI flag; nothing else repeats its default.
"""
from __future__ import annotations

from dataclasses import dataclass, fields

DEFAULT_MODEL = "synthetic:llama-tiny"
DEFAULT_RECIPE = "fp8-block"  # recipe=None: a ModelOpt-quantized model's own quantizers, else this one
# Output formats shipped with dist_export: --format name -> module of dist_export/output_formats that registers
# it (imported on first use). Kept here, free of torch, so `--help` and the launcher parent stay light.
BUILTIN_OUTPUT_FORMATS = {"vllm-fq": "vllm_fq", "fp8-block": "fp8_block", "modelopt": "modelopt",
                          "compressed-tensors": "compressed_tensors"}
# KV-cache quantization a recipe may ask for (`kv_cache:`): FP8 E4M3 with one static scale per attention layer for
# K and one for V (amax of the key/value states after RoPE, from calibration); vLLM stores the cache as x / scale.
KV_CACHE_FORMATS = ("fp8",)
# `--kv-cache` / export(kv_cache=...): one of those, or "none" (the KV cache in the model dtype, whatever the recipe)
KV_CACHE_CHOICES = ("none", *KV_CACHE_FORMATS)


def check_timeouts(hang_timeout, dead_timeout) -> None:
    """--hang-timeout / --dead-timeout (export and calibrate): positive, finite seconds."""
    for name, value in (("hang_timeout", hang_timeout), ("dead_timeout", dead_timeout)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < float("inf"):
            raise ValueError(f"{name} must be a positive, finite number of seconds, got {value!r}")


def check_kv_cache_choice(kv_cache) -> None:
    """None (as the recipe says) or one of KV_CACHE_CHOICES; anything else is one line listing them."""
    if kv_cache is not None and (not isinstance(kv_cache, str) or kv_cache not in KV_CACHE_CHOICES):
        raise ValueError(f"kv_cache {kv_cache!r} is not supported; valid: {list(KV_CACHE_CHOICES)} (or None: as "
                         f"the recipe says)")


@dataclass(frozen=True, kw_only=True)
class ExportOptions:
    """What to export and how; the same options for a checkpoint folder and an in-memory model.

    Attributes:
        recipe: recipe name (see `dist-export recipes` / `dist_export/configs`), a .yaml path or a `Recipe`;
            None: the model's own ModelOpt quantizers where it has them (or `quantizer_state`), else fp8-block.
            Given together with quantizers, it must agree with them (the first disagreement stops the export).
        format: output format name (`vllm-fq`, `fp8-block`, `modelopt`, ...).
        calib: calibration file from `dist-export calibrate` (static activation recipes need one).
        kv_cache: "fp8" quantizes the KV cache (static FP8 per-tensor K/V scale per attention layer, from
            calibration: the calibration must be made with the same setting), "none" keeps it in the model dtype;
            None: as the recipe says (its `kv_cache:` key). The recipe recorded in dist_export.json carries it.
        calibration: calibrate in this run instead, on every rank (each a slice of the samples): a dict of
            `data` (text / JSONL / dataset folder; None: random tokens, for tests), `num_samples`, `seq_len`,
            `batch_size`, `seed`, `tokenizer` (needed with `data` for an in-memory model), `trust_remote_code`.
        overwrite: replace an earlier export in the output folder (only files its record names, checksums
            matching; a folder holding any other file is refused unless `allow_foreign_files`).
        resume: finish an interrupted export, reusing shards whose checksums match the record.
        allow_foreign_files: export into a folder that holds files dist_export did not write; they are kept
            untouched (one at a name the export writes is still refused).
        device: "cpu" or "cuda"; None picks cuda when one is visible.
        max_shard_size: largest output file, as bytes or text such as "500MB" or "1GB".
        hang_timeout: seconds without progress before a rank counts as hung.
        dead_timeout: seconds without a heartbeat before a rank counts as dead; also the most a rank waits at
            start-up for every peer to reach the rendezvous and the process group to form.
        verify: run the structural check of the staged export before publishing it (a defect publishes nothing).
        quantizer_state: a file from `dist_export.save_quantizer_state(model, path)` (the quantizers of a
            ModelOpt-calibrated model, exported from its checkpoint folder on every rank); an in-memory ModelOpt
            model fills it with the same content read from the model.
        nproc_per_node: for a ModelOpt-quantized in-memory model, run N worker processes (one per GPU) that
            export the folder the model was loaded from with its quantizers (sources/workers.py).
        modelopt_kernels: with the model's own quantizers, run each weight through its ModelOpt quantizer on the
            rank (bit for bit ModelOpt's own export on that device; ModelOpt needed on every rank, vllm-fq only)
            instead of dist_export's exact arithmetic (formats.md).
        allow_nonfinite: copy tensors that are not quantized (norms, biases, embeddings, excluded weights) even when
            they hold NaN or inf; by default such a tensor is an error naming it (a quantized weight with NaN/inf is
            refused either way). Recorded as `allow_nonfinite: true` in the record's fingerprint (a resume must
            match it).
        fault: test hook, a `runtime.faults.Fault` (None reads DIST_EXPORT_FAULT from the environment).
    """

    recipe: object = None
    format: str = "vllm-fq"
    calib: str | None = None
    kv_cache: str | None = None
    calibration: dict | None = None
    overwrite: bool = False
    resume: bool = False
    allow_foreign_files: bool = False
    device: str | None = None
    max_shard_size: object = "1GB"
    hang_timeout: float = 45.0
    dead_timeout: float = 20.0
    verify: bool = True
    fault: object = None
    quantizer_state: object = None
    nproc_per_node: int | None = None
    modelopt_kernels: bool = False
    allow_nonfinite: bool = False

    def __post_init__(self):
        if self.overwrite and self.resume:
            raise ValueError("--overwrite and --resume exclude each other: --resume keeps finished shards, "
                             "--overwrite replaces them; pass one")
        if self.calibration is not None and not isinstance(self.calibration, dict):
            raise ValueError(f"calibration must be a dict of calibrate() options (data, num_samples, ...), got "
                             f"{type(self.calibration).__name__}")
        if self.calibration is not None and self.calib is not None:
            raise ValueError("pass calib (a calibration file) or calibration (calibrate in this run), not both")
        if self.device not in (None, "cpu", "cuda"):
            raise ValueError(f"device {self.device!r} is not one of 'cpu', 'cuda' (or None for automatic)")
        check_timeouts(self.hang_timeout, self.dead_timeout)
        parse_size(self.max_shard_size)  # a bad size is refused before anything starts
        if self.nproc_per_node is not None and (isinstance(self.nproc_per_node, bool) or
                                                not isinstance(self.nproc_per_node, int) or self.nproc_per_node < 1):
            raise ValueError(f"nproc_per_node must be a positive integer, got {self.nproc_per_node!r}")
        if self.kv_cache is not None:
            check_kv_cache_choice(self.kv_cache)
            if self.quantizer_state is not None:
                raise ValueError("the model's quantizers decide its KV cache (ModelOpt's k_bmm/v_bmm quantizers, "
                                 "--quantizer-state or a ModelOpt-quantized model): do not pass --kv-cache as well")
        if self.quantizer_state is not None and self.calib is not None:
            raise ValueError("the model's quantizers carry its calibration (--quantizer-state or a ModelOpt-quantized "
                             "model): do not pass --calib as well")

    @property
    def shard_bytes(self) -> int:
        return parse_size(self.max_shard_size)

    @classmethod
    def from_kwargs(cls, kwargs: dict) -> "ExportOptions":
        """Options from `export(**kwargs)`; an unknown name is one line listing the valid ones."""
        valid = {f.name for f in fields(cls)}
        unknown = sorted(set(kwargs) - valid)
        if unknown:
            raise TypeError(f"export() got unknown option(s) {', '.join(unknown)}; valid: {', '.join(sorted(valid))}")
        return cls(**kwargs)


def parse_size(text) -> int:
    """Bytes from an int or text such as "500MB", "2GB", "1GiB" or "1048576"."""
    if isinstance(text, int) and not isinstance(text, bool):
        if text <= 0:
            raise ValueError(f"size must be positive, got {text}")
        return text
    units = {"KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}
    t = str(text).strip().upper()
    for u in sorted(units, key=len, reverse=True):
        if t.endswith(u):
            number, scale = t[: -len(u)], units[u]
            break
    else:
        number, scale = (t[:-1] if t.endswith("B") else t), 1
    try:
        size = int(float(number) * scale)
    except (ValueError, OverflowError):  # OverflowError: "infGB", "1e400"
        raise ValueError(f"cannot parse size {text!r}; use e.g. 500MB, 2GB or a byte count") from None
    if size <= 0:
        raise ValueError(f"size must be positive, got {text!r}")
    return size


DEFAULTS = ExportOptions()

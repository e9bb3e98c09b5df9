"""Output formats, registered by name. Each format says, from metadata alone, which tensors an item becomes,
produces them from the item's weight, adds what the folder needs (quantization_config, extra files), names the
files it adds (`file_names`: a foreign file at one of them is refused, a source's copy is never carried; what
--overwrite removes is what the export record names, storage/outdir.py) and checks its own part
of an exported folder for `verify` (`check_folder`).

Adding a format adds a module here that calls `register_output_format`; nothing else changes.

Asked by every rank at plan time (which tensors an item becomes) and in the execute stage (encoding); rank 0 writes
the extra files at commit.
"""
from __future__ import annotations

import torch

from ..plan import Item, OutSpec

_OUTPUT_FORMATS: dict[str, "OutputFormat"] = {}


class OutputFormat:
    """Base class: subclasses override the hooks. Instances are stateless and shared by all ranks."""

    name = ""
    file_names: tuple[str, ...] = ()  # every name `extra_files` may write (basenames in the export folder)
    carries_kv_cache = False  # whether the layout stores KV-cache scales (recipe.kv_cache); planning refuses else

    def check_items(self, items: list[Item], recipe) -> list[str] | None:
        """Refuse (ValueError) any quantizer this format cannot describe, before any I/O. Returns warning lines
        (legal but likely wrong for this format): they join the plan's warnings, logged once by rank 0, since
        every rank plans the same items."""

    def outputs(self, item: Item) -> list[OutSpec]:
        return [OutSpec(item.name, item.meta.dtype, item.meta.shape)]

    def produce(self, item: Item, w: torch.Tensor, amax, block_amax, input_amax) -> list[tuple[str, torch.Tensor]]:
        """Tensors for `item`, in the order of `outputs(item)` (on w's device)."""
        raise NotImplementedError

    folds_pre_quant_scale = False  # can store a weight with a ModelOpt pre-quant scale (AWQ) folded in
    carries_quantizer_state = False  # writes every ModelOpt quantizer (KV cache, outputs) in its state file

    def fold_pre_quant_scale(self, item: Item, outputs, scale: torch.Tensor):
        """Outputs of `item` with the input pre-quant scale folded into the weight (weight-only AWQ)."""
        raise ValueError(f"--format {self.name} cannot store {item.name} with its pre-quant scale (AWQ) folded; "
                         f"use --format vllm-fq")

    def kv_outputs(self, item: Item) -> list[OutSpec]:
        """The KV-cache scale tensors a k_proj / v_proj item with `item.kv` adds (after `outputs(item)`)."""
        return []

    def kv_tensors(self, item: Item, kv_amax: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
        """Those tensors from the calibrated amax (0-d float32, on the item's device), in `kv_outputs` order."""
        return []

    def update_config(self, config: dict, plan, recipe) -> dict:
        return config

    def extra_files(self, plan, recipe, calib: dict) -> dict[str, bytes]:
        """{filename: content} written by rank 0 at commit (before the index); every name is in `file_names`."""
        return {}

    def check_folder(self, out_dir: str, metas: dict, config: dict, rep) -> None:
        """`verify`: check this format's part of an exported folder (its scales, its extra files), reporting
        through `rep.defect(msg)`, `rep.warnings` and `rep.extra`. Every registered format is asked; a format
        checks only what is there (a file of its, its `quant_method`), so a folder of another format passes."""

    def load_hint(self, out_dir: str) -> str:
        """How a user loads the export (one line, the closing report's last)."""
        return f"vllm serve {out_dir}"


def register_output_format(output_format: OutputFormat) -> OutputFormat:
    if output_format.name in _OUTPUT_FORMATS:
        raise ValueError(f"output format {output_format.name!r} registered twice")
    _OUTPUT_FORMATS[output_format.name] = output_format
    return output_format


def get_output_format(name: str) -> OutputFormat:
    _load_builtin()
    try:
        return _OUTPUT_FORMATS[name]
    except KeyError:
        raise ValueError(f"unknown --format {name!r}; valid: {sorted(_OUTPUT_FORMATS)}") from None


def output_format_names() -> list[str]:
    _load_builtin()
    return sorted(_OUTPUT_FORMATS)


def output_formats() -> list[OutputFormat]:
    """Every registered format, in name order."""
    _load_builtin()
    return [_OUTPUT_FORMATS[n] for n in sorted(_OUTPUT_FORMATS)]


def format_file_names() -> tuple[str, ...]:
    """The names any registered format adds to an export folder (sorted)."""
    return tuple(sorted({n for output_format in output_formats() for n in output_format.file_names}))


def _load_builtin() -> None:
    """Import the shipped formats (each registers itself); a module that registers another name is a bug."""
    import importlib

    from ..options import BUILTIN_OUTPUT_FORMATS

    for name, module in BUILTIN_OUTPUT_FORMATS.items():
        importlib.import_module(f"{__name__}.{module}")
        if name not in _OUTPUT_FORMATS:
            raise RuntimeError(f"output_formats/{module}.py did not register the output format {name!r}")


def positive_finite(out_dir: str, meta, rep) -> None:
    """`verify` helper: a stored scale tensor must be finite and positive."""
    from ..storage.reader import read_tensor

    t = read_tensor(out_dir, meta).float()
    if not torch.isfinite(t).all() or (t <= 0).any():
        rep.defect(f"{meta.name}: scales must be finite and positive")


def refuse_expert_stacks(items, format_name: str) -> None:
    """Real-quant layouts name scales after `<module>.weight`: stacked 3-D experts and `weightN` tensors have no
    such name, so they are refused rather than written under names no engine loads."""
    stacks = [i.name for i in items if i.quantized and (i.stacked or not i.name.endswith(".weight"))]
    if stacks:
        raise ValueError(f"--format {format_name} cannot store stacked 3-D experts yet (e.g. {stacks[0]}); export "
                         f"them with --format vllm-fq, or exclude them in the recipe")


def unquantized_linear_modules(plan) -> list[str]:
    """Excluded 2-D weights that are Linear layers in the serving model (embeddings are not Linear).

    `lm_head` is always listed: a tied checkpoint stores no lm_head tensor, but the serving model still builds
    an lm_head Linear that must stay unquantized.
    """
    names = {m for m, _ in plan.excluded if "embed" not in m.split(".")[-1]}
    return sorted(names | {"lm_head"})

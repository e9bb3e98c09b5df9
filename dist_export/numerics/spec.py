"""What a numeric format and a quantizer are: the format table and a small frozen description, shared by
recipes, planners and kernels.

A `NumericFormat` is a registered numeric format: its pure tensor functions and its facts (what it allows,
how its amax and packing work, how ModelOpt describes it), registered by the format's own module (`fp8.py`,
`integer.py`, `nvfp4.py`, or a module of the user's). A `QuantSpec` names the numeric format and the granularity
of its amax. It carries no tensors, so it can be hashed, compared across ranks and written into plans and
manifests. What a format allows (granularities, its block size, MSE search) is the registered format's fact;
anything else is refused when the spec is made, that is when a recipe is loaded. Torch-free; any stage.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable, Optional


@dataclass(frozen=True)
class NumericFormat:
    """A numeric format: its pure tensor functions and the facts every other module reads.

    Attributes:
        granularities: the weight granularities it supports; the first is a recipe's default.
        block_size: the one block size it uses ("group" of 16 for NVFP4): a recipe's default and the only valid
            value; None: the recipe chooses (required for "group"/"block").
        tensor_amax: its weight amax is the tensor amax at every granularity (NVFP4's global scale); block amax
            (max or MSE-searched) is taken from the data. Shared-amax groups apply to such formats.
        values_per_byte: codes packed per byte along the last dim (NVFP4: 2); the last dim must divide.
        search_fold: `(blocks [r, nb, bs], candidate block amax [K, r, nb], spec, amax) -> folds [K, r, nb, bs]`,
            the elementwise fold the MSE scale search tries (`mse.py`); None: no MSE search for this format.
        activations: it can quantize inputs (activations) in vLLM's fake-quant worker.
        modelopt_num_bits: ModelOpt's `num_bits` for it ((4, 3) E4M3, (2, 1) E2M1, 8, 4).
        modelopt_block_sizes: ModelOpt's `block_sizes` of its quantizers when the format fixes them (NVFP4's
            dynamic E4M3-scaled blocks of 16), else None.
        cpu_input_reason: why ModelOpt 0.47's vLLM worker cannot run its input quantizer on CPU, or None.
    """

    name: str
    fake_quant: Callable
    quantize: Optional[Callable[..., dict]] = None
    dequantize: Optional[Callable] = None
    kernels: Optional[object] = None  # kernels.formats.FormatKernels, or None (torch path everywhere)
    granularities: tuple[str, ...] = ("tensor",)
    block_size: Optional[int] = None
    tensor_amax: bool = False
    values_per_byte: int = 1
    search_fold: Optional[Callable] = None
    activations: bool = False
    modelopt_num_bits: object = None
    modelopt_block_sizes: Optional[dict] = None
    cpu_input_reason: Optional[str] = None

    @property
    def default_granularity(self) -> str:
        return self.granularities[0]


_FORMATS: dict[str, NumericFormat] = {}


def register_format(fmt: NumericFormat) -> NumericFormat:
    if fmt.name in _FORMATS:
        raise ValueError(f"format {fmt.name!r} registered twice")
    _FORMATS[fmt.name] = fmt
    return fmt


def attach_kernels(name: str, kernels) -> None:
    """Give the registered format `name` its GPU kernels (called by `kernels/formats.py`, which imports the
    formats' torch helpers, so the formats themselves never import their kernels)."""
    _FORMATS[name] = replace(get_format(name), kernels=kernels)


def get_format(name: str) -> NumericFormat:
    try:
        return _FORMATS[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown format {name!r}; valid formats: {sorted(_FORMATS)}") from None


def format_names() -> list[str]:
    return sorted(_FORMATS)


def format_for_modelopt_bits(num_bits) -> Optional[NumericFormat]:
    """The registered format ModelOpt describes with `num_bits` (a tuple for floats), or None."""
    bits = tuple(num_bits) if isinstance(num_bits, (list, tuple)) else num_bits
    return next((f for f in _FORMATS.values() if f.modelopt_num_bits == bits), None)


@dataclass(frozen=True)
class QuantSpec:
    """One quantizer's numeric description.

    Attributes:
        fmt: a registered numeric format: "fp8" (E4M3), "int8", "int4" or "nvfp4" (E2M1 values, E4M3 block
            scales of 16, fp32 global scale), or one a module registered.
        granularity: "tensor" (one amax), "channel" (one per output row), "group" (groups of
            `block_size` along the last dim) or "block" (square 2-D blocks of `block_size`). NVFP4 is always
            ("group", 16); its amax is the global tensor amax.
        block_size: group or block edge for "group"/"block", else None.
        scale_search: "max" (amax = max|W|) or "mse" (per-block search for the scale with least squared error).
        mse_candidates: number of candidate scales tried by the "mse" search.
    """

    fmt: str
    granularity: str = "tensor"
    block_size: int | None = None
    scale_search: str = "max"
    mse_candidates: int = 64

    def __post_init__(self) -> None:
        fmt = get_format(self.fmt)
        valid = fmt.granularities
        if self.granularity not in valid:
            raise ValueError(
                f"format {self.fmt!r} does not support granularity {self.granularity!r}; valid: {list(valid)}"
            )
        needs_block = self.granularity in ("group", "block")
        if needs_block and (not isinstance(self.block_size, int) or isinstance(self.block_size, bool)
                            or self.block_size <= 0):
            raise ValueError(f"granularity {self.granularity!r} needs a positive integer block_size")
        if not needs_block and self.block_size is not None:
            raise ValueError(f"granularity {self.granularity!r} takes no block_size (got {self.block_size})")
        if fmt.block_size is not None and self.block_size != fmt.block_size:
            raise ValueError(f"{self.fmt} uses blocks of {fmt.block_size}, got block_size={self.block_size}")
        if self.scale_search not in ("max", "mse"):
            raise ValueError(f"unknown scale_search {self.scale_search!r}; valid: ['max', 'mse']")
        if self.scale_search == "mse" and fmt.search_fold is None:
            raise ValueError(f"scale_search 'mse' is not implemented for {self.fmt!r}")
        if self.mse_candidates < 1:
            raise ValueError(f"mse_candidates must be >= 1, got {self.mse_candidates}")

    def amax_shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        """Shape of the stored amax for a weight of `shape` (metadata only; output formats and the ModelOpt
        quantizer mapping use it)."""
        if get_format(self.fmt).tensor_amax and self.scale_search == "max":
            return ()
        if self.granularity == "tensor":
            return ()
        if self.granularity == "channel":
            return (shape[0], 1)
        b = self.block_size
        if self.granularity == "group":
            return (*shape[:-1], -(-shape[-1] // b))
        return (-(-shape[0] // b), -(-shape[1] // b))

"""What a quantizer is: a small frozen description, shared by recipes, planners and kernels.

A `QuantSpec` names the numeric format and the granularity of its amax. It carries no tensors, so it can be
hashed, compared across ranks and written into plans and manifests.
"""
from __future__ import annotations

from dataclasses import dataclass


# Valid granularities per format; anything else is refused when a recipe is loaded.
VALID_GRANULARITIES = {
    "fp8": ("tensor", "channel", "block"),
    "int8": ("tensor", "channel", "group"),
    "int4": ("tensor", "channel", "group"),
    "nvfp4": ("group",),
}


@dataclass(frozen=True)
class QuantSpec:
    """One quantizer's numeric description.

    Attributes:
        fmt: "fp8" (E4M3), "int8", "int4" or "nvfp4" (E2M1 values, E4M3 block scales of 16, fp32 global scale).
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
        if self.fmt not in VALID_GRANULARITIES:
            raise ValueError(f"unknown format {self.fmt!r}; valid formats: {sorted(VALID_GRANULARITIES)}")
        valid = VALID_GRANULARITIES[self.fmt]
        if self.granularity not in valid:
            raise ValueError(
                f"format {self.fmt!r} does not support granularity {self.granularity!r}; valid: {list(valid)}"
            )
        needs_block = self.granularity in ("group", "block")
        if needs_block and (not isinstance(self.block_size, int) or self.block_size <= 0):
            raise ValueError(f"granularity {self.granularity!r} needs a positive integer block_size")
        if not needs_block and self.block_size is not None:
            raise ValueError(f"granularity {self.granularity!r} takes no block_size (got {self.block_size})")
        if self.fmt == "nvfp4" and self.block_size != 16:
            raise ValueError(f"nvfp4 uses blocks of 16, got block_size={self.block_size}")
        if self.scale_search not in ("max", "mse"):
            raise ValueError(f"unknown scale_search {self.scale_search!r}; valid: ['max', 'mse']")
        if self.scale_search == "mse" and self.fmt not in ("nvfp4", "int4", "int8"):
            raise ValueError(f"scale_search 'mse' is implemented for nvfp4, int4 and int8, not {self.fmt!r}")
        if self.mse_candidates < 1:
            raise ValueError(f"mse_candidates must be >= 1, got {self.mse_candidates}")

    def amax_shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        """Shape of the stored amax for a weight of `shape` (metadata only; output formats and the ModelOpt
        quantizer mapping use it)."""
        if self.fmt == "nvfp4" and self.scale_search == "max":
            return ()
        if self.granularity == "tensor":
            return ()
        if self.granularity == "channel":
            return (shape[0], 1)
        b = self.block_size
        if self.granularity == "group":
            return (*shape[:-1], -(-shape[-1] // b))
        return (-(-shape[0] // b), -(-shape[1] // b))

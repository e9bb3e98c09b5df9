"""NVFP4: E2M1 values in blocks of 16 along the last dim, E4M3 block scale, fp32 global scale.

Fake quant follows the reference GPU kernel exactly (formats.md section 5):
    gs = gamax / (6*448)  (1e-12 if <= 0);  s = min(bmax / (6*gs), 448);  sq = float(e4m3(s)) * gs
    sq = 1.0 where sq < 1e-5;  q = E2M1 rounding of |x|/sq by the threshold table;  y = where(x>=0, q, -q)*sq (+0.0 for an input of -0.0)

Real quant rule (documented choice, bit-exact with the fold): the stored block scale is e4m3(s), the same E4M3
value the fold multiplies by, and `weight_scale_2` is gs; then (code value) * (scale * gs) == y for every
element. Blocks where the fold used the 1.0 quirk fold to all zeros (checked); their stored scale is the
smallest positive E4M3 (2**-9) so every stored scale is finite and positive.

Pure functions: every rank, execute stage (registered as a numeric format at import).
"""
from __future__ import annotations

import torch

from .blocks import expand_to, reduce_abs_max
from .constants import F8E4M3_MAX, F4E2M1_MAX, NVFP4_GS_FLOOR, NVFP4_MIN_STORED_SCALE, NVFP4_SQ_FLOOR
from .registry import NumericFormat, register_format
from .spec import QuantSpec

BLOCK = 16
# E2M1 magnitudes by code 0..7; code | 0x8 is the negative.
E2M1_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)


def global_scale(gamax: torch.Tensor) -> torch.Tensor:
    g = gamax.float()
    gs = g / torch.full_like(g, F4E2M1_MAX * F8E4M3_MAX)  # true division, also on CUDA
    return torch.where(gs <= 0, torch.full_like(gs, NVFP4_GS_FLOOR), gs)


def block_multipliers(bmax: torch.Tensor, gs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(e4m3 block scale as float32, sq the fold multiplies by) for block amaxes `bmax` under global scale gs."""
    s = torch.clamp(bmax / (torch.full_like(gs, F4E2M1_MAX) * gs), max=F8E4M3_MAX)
    s_e4m3 = s.to(torch.float8_e4m3fn).float()
    sq = s_e4m3 * gs
    return s_e4m3, torch.where(sq < NVFP4_SQ_FLOOR, torch.ones_like(sq), sq)


def block_scales(x: torch.Tensor, gamax: torch.Tensor, block_amax: torch.Tensor | None):
    """(e4m3 block scale as float32, sq used by the fold, gs), per block of 16."""
    gs = global_scale(gamax)
    bmax = reduce_abs_max(x, "group", BLOCK) if block_amax is None else block_amax.float()
    s_e4m3, sq = block_multipliers(bmax, gs)
    return s_e4m3, sq, gs


def round_e2m1_magnitude(a: torch.Tensor) -> torch.Tensor:
    """|x|/sq -> E2M1 magnitude by the kernel's threshold table:
    0 if a<=0.25 | 0.5 if a<0.75 | 1 if a<=1.25 | 1.5 if a<1.75 | 2 if a<=2.5 | 3 if a<3.5 | 4 if a<=5 | 6.
    Counting the thresholds a has passed gives the code index ("<=" bounds are passed by a > t, "<" by a >= t)."""
    idx = (a > 0.25).to(torch.uint8)
    idx += a >= 0.75
    idx += a > 1.25
    idx += a >= 1.75
    idx += a > 2.5
    idx += a >= 3.5
    idx += a > 5.0
    return torch.tensor(E2M1_VALUES, dtype=a.dtype, device=a.device)[idx.long()]


def _signed_q(x: torch.Tensor, gamax: torch.Tensor, block_amax):
    s_e4m3, sq, gs = block_scales(x, gamax, block_amax)
    sq_el = expand_to(sq, x.shape, "group", BLOCK)
    q = round_e2m1_magnitude(x.abs() / sq_el)
    # As the reference kernel: where(x >= 0, q, -q). An input of -0.0 gives +0.0; a negative x that rounds to
    # q = 0 keeps its sign (-0.0), and so does its real-quant code (sign bit set).
    signed = torch.where(x >= 0, q, -q)
    return signed, sq_el, s_e4m3, sq, gs


def fake_quant_nvfp4(x: torch.Tensor, spec: QuantSpec, amax: torch.Tensor, block_amax=None) -> torch.Tensor:
    signed, sq_el, *_ = _signed_q(x, amax, block_amax)
    return signed * sq_el


def search_fold_nvfp4(xb: torch.Tensor, cand: torch.Tensor, spec: QuantSpec, amax: torch.Tensor) -> torch.Tensor:
    """The fold of blocks xb [r, nb, 16] under candidate block amaxes cand [K, r, nb] and the global amax `amax`
    (the MSE search's candidates): the same arithmetic as `fake_quant_nvfp4` with `block_amax` = a candidate."""
    _, sq = block_multipliers(cand, global_scale(amax))
    sq = sq.unsqueeze(-1)
    x = xb.unsqueeze(0).expand(*cand.shape, xb.shape[-1])
    q = round_e2m1_magnitude(x.abs() / sq)
    return torch.where(x >= 0, q, -q) * sq


def encode_e2m1(signed_q: torch.Tensor) -> torch.Tensor:
    """Signed E2M1 values -> 4-bit codes (uint8, one per element)."""
    table = torch.tensor(E2M1_VALUES, device=signed_q.device)
    mag_code = (signed_q.abs().unsqueeze(-1) == table).to(torch.uint8).argmax(dim=-1).to(torch.uint8)
    sign = torch.signbit(signed_q).to(torch.uint8) << 3
    return mag_code | sign


def pack_nibbles(codes: torch.Tensor) -> torch.Tensor:
    """Two codes per byte along the last dim: low nibble = even column."""
    if codes.shape[-1] % 2:
        raise ValueError(f"NVFP4 packing needs an even last dimension, got {codes.shape[-1]}")
    return codes[..., 0::2] | (codes[..., 1::2] << 4)


def unpack_nibbles(packed: torch.Tensor) -> torch.Tensor:
    low, high = packed & 0xF, packed >> 4
    return torch.stack([low, high], dim=-1).reshape(*packed.shape[:-1], packed.shape[-1] * 2)


def decode_e2m1(codes: torch.Tensor) -> torch.Tensor:
    table = torch.tensor(E2M1_VALUES, device=codes.device)
    mag = table[(codes & 0x7).long()]
    return torch.where((codes & 0x8).bool(), -mag, mag)


def quantize_nvfp4(x: torch.Tensor, spec: QuantSpec, amax: torch.Tensor, block_amax=None) -> dict:
    signed, _sq_el, s_e4m3, sq, gs = _signed_q(x, amax, block_amax)
    quirk = (s_e4m3 * gs) < NVFP4_SQ_FLOOR  # blocks where the fold used sq = 1.0
    if quirk.any():
        folded_nonzero = expand_to(quirk, x.shape, "group", BLOCK) & (signed != 0)
        if folded_nonzero.any():
            raise ValueError(
                "NVFP4 block scale underflows E4M3 while the fold keeps nonzero values; "
                "this tensor cannot be stored as real NVFP4 bit-exactly (use fake quant)"
            )
        s_e4m3 = torch.where(quirk, torch.full_like(s_e4m3, NVFP4_MIN_STORED_SCALE), s_e4m3)
    return {
        "qdata": pack_nibbles(encode_e2m1(signed)),
        "weight_scale": s_e4m3.to(torch.float8_e4m3fn),
        "weight_scale_2": gs.float().reshape(()),
    }


def dequantize_nvfp4(tensors: dict, spec: QuantSpec, shape) -> torch.Tensor:
    values = decode_e2m1(unpack_nibbles(tensors["qdata"]))[..., : shape[-1]]
    block = tensors["weight_scale"].float() * tensors["weight_scale_2"].float()
    return values * expand_to(block, torch.Size(shape), "group", BLOCK)


register_format(NumericFormat(
    "nvfp4", fake_quant_nvfp4, quantize_nvfp4, dequantize_nvfp4, granularities=("group",), block_size=BLOCK,
    tensor_amax=True, values_per_byte=2, search_fold=search_fold_nvfp4, activations=True, modelopt_num_bits=(2, 1),
    modelopt_block_sizes={-1: BLOCK, "type": "dynamic", "scale_bits": (4, 3)},
    cpu_input_reason="NVFP4 activation fake quant asserts a CUDA amax in ModelOpt 0.47 (needs a GPU)"))

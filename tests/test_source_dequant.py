"""Dequantization of already-quantized sources (dist_export/sources/dequant.py), bit-exact against the tools
that load such checkpoints: transformers' FP8-block and MXFP4 dequantization and compressed-tensors' own
decompression (in its consumer venv), plus a plain per-element reference for shapes the block does not divide.
"""
from __future__ import annotations

import json

import pytest
import torch

from dist_export.sources.dequant import (
    cdiv,
    dequantize_ct,
    dequantize_fp8_block,
    dequantize_gpt_oss_mxfp4,
    e8m0_to_float,
    unpack_int32,
)
from dist_export.sources.encode import encode_ct_w8a16, encode_fp8_block, encode_gpt_oss_mxfp4, pack_int32
from ct_tool import run_ct


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(torch.int16)


def _fp8_codes(shape, seed):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g) * 64).clamp(-448, 448).to(torch.float8_e4m3fn)


def _scales(shape, seed):
    g = torch.Generator().manual_seed(seed)
    # magnitudes that differ by 2**10 from block to block, so a wrong block index shows
    return torch.rand(shape, generator=g) * 2.0 ** torch.randint(-12, -2, shape, generator=g).float()


@pytest.mark.parametrize("shape", [(256, 384), (64, 96), (128, 128), (3, 256, 128)])
def test_fp8_block_matches_transformers(shape):
    """Shapes that transformers reads correctly (multiples of 128, or one block per dim)."""
    from transformers.integrations.finegrained_fp8 import Fp8Dequantize

    q = _fp8_codes(shape, 0)
    s = _scales((*shape[:-2], cdiv(shape[-2], 128), cdiv(shape[-1], 128)), 1)
    ref = Fp8Dequantize(None)._dequantize_one(q, s, output_dtype=torch.bfloat16)
    got = dequantize_fp8_block(q, s, (128, 128), torch.bfloat16)
    assert torch.equal(_bits(got), _bits(ref))


@pytest.mark.parametrize("shape,block", [((320, 200), (128, 128)), ((448, 130), (128, 128)), ((7, 9), (4, 2)),
                                         ((2, 129, 257), (128, 128))])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_fp8_block_partial_blocks(shape, block, dtype):
    """Element (i, j) takes scale [i // bm, j // bn]: checked element by element (transformers refuses or
    misreads these shapes; vLLM and DeepSeek's kernel read them this way)."""
    q = _fp8_codes(shape, 2)
    s = _scales((*shape[:-2], cdiv(shape[-2], block[0]), cdiv(shape[-1], block[1])), 3)
    got = dequantize_fp8_block(q, s, block, dtype)
    i = torch.arange(shape[-2])[:, None] // block[0]  # the block row and column of every element
    j = torch.arange(shape[-1])[None, :] // block[1]
    ref = (q.float() * s[..., i, j]).to(dtype)
    assert torch.equal(got.view(torch.uint8), ref.view(torch.uint8))
    assert torch.equal(got[..., -1, -1], (q[..., -1, -1].float() * s[..., -1, -1]).to(dtype))  # the partial corner


def test_fp8_block_refuses_wrong_grid():
    with pytest.raises(ValueError, match="scale grid"):
        dequantize_fp8_block(_fp8_codes((256, 256), 0), torch.ones(1, 2), (128, 128), torch.bfloat16)


def test_e8m0_exact():
    e = torch.arange(256, dtype=torch.int32).to(torch.uint8)
    got = e8m0_to_float(e)
    assert got[0].item() == 2.0**-127 and got[127].item() == 1.0 and got[254].item() == 2.0**127
    assert torch.isinf(got[255])
    assert all(got[i].item() == 2.0 ** (i - 127) for i in range(255))


def test_mxfp4_matches_transformers():
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    g = torch.Generator().manual_seed(0)
    blocks = torch.randint(0, 256, (3, 40, 4, 16), dtype=torch.uint8, generator=g)
    scales = torch.randint(90, 160, (3, 40, 4), dtype=torch.uint8, generator=g)
    scales[0, 0, :3] = torch.tensor([0, 1, 254], dtype=torch.uint8)  # subnormal and extreme powers of two
    ref = convert_moe_packed_tensors(blocks, scales, dtype=torch.bfloat16)
    got = dequantize_gpt_oss_mxfp4(blocks, scales, torch.bfloat16)
    assert got.shape == (3, 128, 40) and torch.equal(_bits(got), _bits(ref))


def test_mxfp4_nibble_order_and_values():
    """Byte 0x21 holds code 1 (0.5) in the low nibble (even element) and code 2 (1.0) in the high nibble."""
    blocks = torch.zeros(1, 1, 1, 16, dtype=torch.uint8)
    blocks[..., 0] = 0x21
    blocks[..., 1] = 0xF9  # low: 9 = -0.5, high: 15 = -6
    y = dequantize_gpt_oss_mxfp4(blocks, torch.full((1, 1, 1), 128, dtype=torch.uint8), torch.float32)
    assert y[0, :4, 0].tolist() == [1.0, 2.0, -1.0, -12.0]


def test_encoders_round_trip():
    g = torch.Generator().manual_seed(5)
    w = (torch.randn(300, 200, generator=g) * 0.02).to(torch.bfloat16)
    e = encode_fp8_block(w)
    assert e["weight"].dtype == torch.float8_e4m3fn and e["weight_scale_inv"].shape == (3, 2)
    back = dequantize_fp8_block(e["weight"], e["weight_scale_inv"], (128, 128), torch.bfloat16)
    assert (back.float() - w.float()).norm() / w.float().norm() < 0.05
    stack = (torch.randn(2, 64, 96, generator=g) * 0.02).to(torch.bfloat16)
    m = encode_gpt_oss_mxfp4(stack)
    assert m["_blocks"].shape == (2, 96, 2, 16) and m["_scales"].shape == (2, 96, 2)
    back = dequantize_gpt_oss_mxfp4(m["_blocks"], m["_scales"], torch.bfloat16)
    assert back.shape == stack.shape and (back.float() - stack.float()).norm() / stack.float().norm() < 0.2
    c = encode_ct_w8a16(w)
    back = dequantize_ct(unpack_int32(c["weight_packed"], 8, 200), c["weight_scale"], None, "channel", None, None,
                         torch.bfloat16)
    assert (back.float() - w.float()).norm() / w.float().norm() < 0.01


@pytest.mark.parametrize("bits", [4, 8])
def test_pack_unpack_round_trip(bits):
    g = torch.Generator().manual_seed(bits)
    lo, hi = -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    q = torch.randint(lo, hi + 1, (5, 37), generator=g).to(torch.int8)
    assert torch.equal(unpack_int32(pack_int32(q, bits), bits, 37), q.to(torch.int16))


_CT_SCRIPT = r"""
import json, sys, torch
from safetensors.torch import load_file, save_file
from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32, unpack_from_int32
from compressed_tensors.quantization import QuantizationArgs
from compressed_tensors.quantization.lifecycle.forward import dequantize
t = load_file(sys.argv[1])
cases = json.loads(sys.argv[2])
out = {}
for i, c in enumerate(cases):
    q = t[f"q{i}"]
    if c["pack"]:
        out[f"packed{i}"] = pack_to_int32(q, c["bits"])
        q = unpack_from_int32(out[f"packed{i}"], c["bits"], q.shape)
    args = QuantizationArgs(num_bits=c["bits"], type=c["type"], strategy=c["strategy"], symmetric=c["zp"] is None,
                            group_size=c.get("group"), block_structure=c.get("block"))
    zp = t.get(f"zp{i}")
    out[f"y{i}"] = dequantize(q, t[f"s{i}"], zp, args).to(torch.bfloat16)
save_file(out, sys.argv[3])
"""


def test_compressed_tensors_dequant_matches_compressed_tensors(tmp_path):
    from safetensors.torch import load_file, save_file

    g = torch.Generator().manual_seed(7)
    cases = [
        dict(bits=8, type="int", strategy="channel", pack=True, zp=None, sdt="bfloat16", shape=(48, 100)),
        dict(bits=4, type="int", strategy="group", group=32, pack=True, zp=None, sdt="bfloat16", shape=(40, 128)),
        dict(bits=8, type="int", strategy="channel", pack=False, zp="int8", sdt="float32", shape=(33, 70)),
        dict(bits=8, type="int", strategy="tensor", pack=False, zp=None, sdt="float16", shape=(16, 48)),
        dict(bits=8, type="float", strategy="block", block=[32, 32], pack=False, zp=None, sdt="bfloat16",
             shape=(64, 96)),
        dict(bits=8, type="float", strategy="channel", pack=False, zp=None, sdt="float32", shape=(20, 64)),
    ]
    tensors, expected_ours = {}, []
    for i, c in enumerate(cases):
        rows, cols = c["shape"]
        sdt = getattr(torch, c["sdt"])
        if c["type"] == "float":
            q = (torch.randn(rows, cols, generator=g) * 50).clamp(-448, 448).to(torch.float8_e4m3fn)
        else:
            lo = -(1 << (c["bits"] - 1))
            q = torch.randint(lo, -lo, (rows, cols), generator=g).to(torch.int8)
        sshape = {"channel": (rows, 1), "tensor": (1,), "group": (rows, cols // c.get("group", 1)),
                  "block": (cdiv(rows, 32), cdiv(cols, 32))}[c["strategy"]]
        s = (torch.rand(sshape, generator=g) * 0.01 + 1e-4).to(sdt)
        zp = torch.randint(-20, 20, sshape, generator=g).to(torch.int8) if c["zp"] else None
        tensors[f"q{i}"], tensors[f"s{i}"] = q, s
        if zp is not None:
            tensors[f"zp{i}"] = zp
        block = tuple(c["block"]) if c.get("block") else None
        qi = unpack_int32(pack_int32(q, c["bits"]), c["bits"], cols) if c["pack"] else q
        expected_ours.append(dequantize_ct(qi, s, zp, c["strategy"], c.get("group"), block, torch.bfloat16))
    save_file(tensors, str(tmp_path / "in.safetensors"))
    run_ct(_CT_SCRIPT, str(tmp_path / "in.safetensors"), json.dumps(cases), str(tmp_path / "out.safetensors"))
    ref = load_file(str(tmp_path / "out.safetensors"))
    for i, c in enumerate(cases):
        if c["pack"]:  # our packing is compressed-tensors' packing, word for word
            assert torch.equal(pack_int32(tensors[f"q{i}"], c["bits"]), ref[f"packed{i}"]), c
        assert torch.equal(_bits(expected_ours[i]), _bits(ref[f"y{i}"])), c

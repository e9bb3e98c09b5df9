"""ModelOpt and llm-compressor names: aliases where the quantization is the same, a clear error naming ours where
it is not."""
from __future__ import annotations

import pytest

from dist_export.recipe_names import EQUIVALENTS, NEAR_MISSES, resolve_alias

KNOWN = sorted(EQUIVALENTS) + ["nvfp4-mse", "int4-w4a16-mse"]


@pytest.mark.parametrize("name, ours", [
    ("FP8_DEFAULT_CFG", "fp8"), ("fp8_pc_pt", "fp8-pc-pt"), ("FP8_DYNAMIC", "fp8-pc-pt"), ("fp8_dynamic", "fp8-pc-pt"),
    ("FP8_BLOCK", "fp8-block"), ("NVFP4_DEFAULT_CFG", "nvfp4"), ("W4A16_NVFP4", "nvfp4-w4a16"),
    ("NVFP4A16", "nvfp4-w4a16"), ("W4A16", "int4-w4a16"), ("int8_wo", "int8-w8a16"), ("W8A8", "int8-w8a8"),
    ("fp8", "fp8"), ("nvfp4-mse", "nvfp4-mse"), ("mxfp8-w8a8", "mxfp8-w8a8"),
])
def test_aliases_resolve_to_the_recipe_with_the_same_quantization(name, ours):
    assert resolve_alias(name, KNOWN) == ours


@pytest.mark.parametrize("name, ours", [("nvfp4_mse", "nvfp4-mse"), ("int8", "int8-w8a8"), ("W8A16", "int8-w8a16"),
                                        ("fp8_pb_wo", "fp8-block"), ("int4_awq", "int4-w4a16"), ("MXFP4", "mxfp4-w4a4"),
                                        ("MXFP8_DEFAULT_CFG", "mxfp8-w8a8"), ("MXFP4_DEFAULT_CFG", "mxfp4-w4a4"),
                                        ("MXFP8A16", "mxfp8-w8a16"), ("mxfp4a16", "mxfp4-w4a16")])
def test_names_with_other_semantics_are_refused_naming_ours(name, ours):
    with pytest.raises(ValueError, match=rf"no exact equivalent here: .* pass --recipe {ours} "):
        resolve_alias(name, KNOWN)


def test_unknown_names_stay_unknown_and_no_name_is_both_alias_and_near_miss():
    assert resolve_alias("my-own", KNOWN) is None
    aliases = {n.lower().replace("-", "_") for tools in EQUIVALENTS.values() for names in tools.values() for n in names}
    assert not aliases & {n.lower().replace("-", "_") for n in NEAR_MISSES}

"""Named numeric constants of the formats (values in comments, as formats.md section 5 gives them).

Pure data: every stage and rank.
"""

F8E4M3_MAX = 448.0  # largest finite float8_e4m3fn
F4E2M1_MAX = 6.0  # largest E2M1 magnitude
NVFP4_GLOBAL_DIVISOR = F4E2M1_MAX * F8E4M3_MAX  # 2688.0: global scale = amax / 2688
AMAX_TINY = 2.0**-24  # an amax at or below this behaves as "all zero"
NVFP4_GS_FLOOR = 1e-12  # global scale used when the tensor amax is 0
NVFP4_SQ_FLOOR = 1e-5  # reference kernel quirk: block scale below this becomes 1.0
NVFP4_MIN_STORED_SCALE = 2.0**-9  # smallest positive E4M3 (subnormal)

"""Calibration: the calibration file format (`file`, read by every rank at plan time), the samples (`data`) and the
`dist-export calibrate` command (`run`, every rank, data-parallel).
"""

"""The calibration's heartbeat (issue 18): `calibrate` runs under the same monitor as an export. Every observed
input and every batch is progress, so a rank inside one long forward is not taken for hung; a rank that really
stops (here: asleep outside any observation) is named as hung by its peer, and a killed rank at once, in one line
that says nothing was written. The counters the bar shows: batches and tokens (padding excluded).
"""
from __future__ import annotations

import os
import re
import time

import pytest
import torch

from helpers import cli_in_process, model_dir, run_cli
from multirank import run_ranks

HANG_S = 1.5  # the heartbeat's hang timeout in these runs (it looks every 1 s)
SLOW_FORWARD_S = 3.5  # each forward takes this long: more than twice HANG_S


def _calibrate_slow_model(ctx, where: str) -> float:
    """Calibrate llama-tiny in memory (fp8: 14 observed Linears) with every forward slowed to SLOW_FORWARD_S:
    `where` "inside" sleeps in each Linear after its input was observed (a long forward that keeps observing),
    "outside" sleeps once before the forward reaches any Linear (a rank that does nothing observable)."""
    import transformers

    from dist_export.calibration.run import calibrate

    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir("synthetic:llama-tiny"),
                                                              dtype=torch.bfloat16).eval()
    linears = [m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and "lm_head" not in n]
    if where == "inside":
        for m in linears:
            m.register_forward_hook(lambda *_: time.sleep(SLOW_FORWARD_S / len(linears)))
    else:
        model.register_forward_pre_hook(lambda *_: time.sleep(SLOW_FORWARD_S))
    start = time.monotonic()
    calibrate(model, "fp8", random_tokens=True, num_samples=4, seq_len=16, ctx=ctx, hang_timeout=HANG_S)
    return time.monotonic() - start


def test_long_forwards_are_progress(tmp_path):
    """Two ranks, each 2 forwards of 3.5 s, hang timeout 1.5 s: observed inputs keep the heartbeat moving, the
    calibration finishes on both ranks."""
    results = run_ranks(2, _calibrate_slow_model, "inside", tmp_path=tmp_path)
    assert [r[0] for r in results] == ["ok", "ok"], results
    assert all(seconds > 2 * SLOW_FORWARD_S for _, seconds in results), results  # longer than the timeout


def test_rank_asleep_outside_observation_is_hung(tmp_path, capfd):
    """The control: the same time asleep where nothing is observed is no progress: a rank names its peer as
    hung within the bound and stops; the other then finds it gone. Every error line is one of those two."""
    start = time.monotonic()
    results = run_ranks(2, _calibrate_slow_model, "outside", tmp_path=tmp_path)
    elapsed = time.monotonic() - start
    assert all(r[0] == "error" for r in results), results
    err = capfd.readouterr().err
    lines = [ln for ln in err.splitlines() if " error: " in ln]
    head, tail = r"\[rank [01]\] error: calibration aborted: rank [01] ", r"; nothing was written$"
    hung, gone = head + r"made no progress for \d+ s \(hung\)" + tail, head + r"died \(process \d+ on \S+ is gone\)" + tail
    assert any(re.match(hung, ln) for ln in lines), err[-3000:]  # the first to look names its peer hung
    assert all(re.match(hung, ln) or re.match(gone, ln) for ln in lines), err[-3000:]  # the other: it is gone
    assert elapsed < 60, elapsed


def test_killed_rank_named_during_calibration(tmp_path):
    """`calibrate --nproc-per-node 2` with rank 1 killed before its 3rd batch: rank 0 names it in one line, exits
    non-zero, and the calibration file is not written."""
    out = str(tmp_path / "c.safetensors")
    proc = run_cli("calibrate", "--nproc-per-node", "2", "--model", model_dir("synthetic:llama-tiny"), "--recipe",
                   "fp8", "--random-tokens", "--num-samples", "16", "--out", out, "--dead-timeout", "4",
                   env={"DIST_EXPORT_FAULT": "kill:1:2", "OMP_NUM_THREADS": "1"}, check=False, timeout=120)
    assert proc.returncode != 0
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("[rank 0] error: ")]
    assert len(lines) == 1 and re.match(r"\[rank 0\] error: calibration aborted: rank 1 died \(process \d+ on \S+ "
                                        r"is gone\); nothing was written$", lines[0]), proc.stderr[-3000:]
    assert not os.path.exists(out)


def test_progress_counts_batches_and_tokens():
    """What the bar is fed: one item per batch, the unpadded tokens as its measure, a step per observed input."""
    import transformers

    from dist_export.calibration.run import observe_samples
    from dist_export.runtime.progress import calibration_progress

    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir("synthetic:llama-tiny"),
                                                              dtype=torch.bfloat16).eval()
    targets = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and "lm_head" not in n]
    samples = [[1, 2, 3], [4, 5, 6, 7, 8], [9], [10, 11]]
    progress = calibration_progress()
    observe_samples(model, targets, samples, 3, 0, progress=progress)
    assert (progress.items, progress.bytes) == (2, 11)  # batches of 3 and 1 samples, 3+5+1+2 real tokens
    assert progress.steps >= 2 * len(targets) + 2  # every observed input, every batch


@pytest.mark.parametrize("option, value", [("--hang-timeout", "nan"), ("--dead-timeout", "inf"),
                                           ("--hang-timeout", "0")])
def test_calibrate_timeouts_must_be_positive_and_finite(tmp_path, capsys, option, value):
    """As for export (docs/bad-inputs.md row 57): one line, before any model load, nothing written."""
    out = tmp_path / "c.safetensors"
    rc, _, err = cli_in_process(capsys, "calibrate", "--model", "synthetic:llama-tiny", "--recipe", "fp8",
                                "--random-tokens", "--out", out, option, value)
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert rc == 1 and lines == [f"[rank 0] error: {option[2:].replace('-', '_')} must be a positive, finite number "
                                 f"of seconds, got {float(value)!r}"], err
    assert not os.listdir(tmp_path)

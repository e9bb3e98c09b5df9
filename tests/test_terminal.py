"""What a user sees in a terminal (issue 18): the CLI under our launcher (2 ranks, gloo) on a pseudo-terminal.

One job-wide bar (every rank's items, appearing once the plan is known), no log line glued to it, never redrawn
after the closing report; the report counts what was quantized and excluded (checked against the source's own
safetensors headers) and says where the export went and how to load it. Ctrl-C of the whole job (SIGINT to its
process group, as a terminal sends it) gives one line with the --resume hint, no traceback, no launcher line, no
temporaries left, and --resume then finishes the export, also when rank 0 sits in a collective (a C call, where
Python runs no signal handler) as the Ctrl-C comes. Other ranks' log records, warnings and error lines stand on
lines of their own beside rank 0's bar (checked on the screen a terminal shows, `userkit.screen_lines`).
`calibrate` shows its job-wide bar (tokens, batches) the same way.
"""
from __future__ import annotations

import fnmatch
import json
import os
import re
import sys

import pytest
from safetensors import safe_open

from helpers import model_dir, run_cli
from userkit import run_in_pty, screen_lines

from dist_export.recipe import DEFAULT_EXCLUDE

LOG_RECORD = re.compile(r"\d\d:\d\d:\d\d \[rank \d+\] [A-Z]+ ")


def _source_weights(src: str) -> tuple[list[str], list[str]]:
    """(quantized, excluded) 2-D `.weight` modules of a checkpoint under fp8-block, from its headers alone."""
    names = []
    for f in sorted(os.listdir(src)):
        if f.endswith(".safetensors"):
            with safe_open(os.path.join(src, f), "pt") as h:
                names += [k for k in h.keys() if k.endswith(".weight") and len(h.get_slice(k).get_shape()) == 2]
    modules = [n[: -len(".weight")] for n in names]
    excluded = [m for m in modules if any(fnmatch.fnmatchcase(m, p) for p in DEFAULT_EXCLUDE)]
    return [m for m in modules if m not in excluded], excluded


def test_bar_and_report_in_a_terminal(tmp_path):
    src = model_dir("synthetic:llama-tiny")
    out, summary_json = str(tmp_path / "out"), str(tmp_path / "summary.json")
    # small shards so rank 1 owns some; rank 0 pauses 3 s at its 2nd item so the bar is drawn mid-job
    rc, text = run_in_pty(["export", "--nproc-per-node", "2", "--model", src, "--out", out, "--max-shard-size",
                           "40kB", "--summary-json", summary_json], env={"DIST_EXPORT_FAULT": "delay:0:1"})
    assert rc == 0, text[-3000:]
    summary = json.load(open(summary_json))
    items = {r["rank"]: r["items"] for r in summary["ranks"]}
    assert items[0] > 0 and items[1] > 0, items  # both ranks worked: the final count must be the sum
    total = items[0] + items[1]
    draws = [m.group(0) for m in re.finditer(r"export: +\d+%\|[^\r\n]*", text)]
    assert draws, f"no progress bar drawn:\n{text[-3000:]}"
    assert f"items {total}/{total}]" in draws[-1] and "100%" in draws[-1], draws[-3:]  # job-wide, not rank 0's
    assert any(f"items {total}/{total}]" not in d for d in draws), "no bar drawn mid-job"
    _records_stand_alone(text)
    # the closing report is last: no bar after it
    report = text[text.index("exported "):]
    assert "%|" not in report, report
    quantized, excluded = _source_weights(src)
    assert f"quantized: {len(quantized)} modules" in report, report
    assert f"{len(excluded)} excluded weight(s)" in report and "*embed_tokens" in report, report
    assert f"-> {out}" in report and f"MODELOPT_STATE_PATH={out}/vllm_fq_modelopt_state.pth" in report, report
    assert "verify: " in report and "no defects" in report
    q = summary["quantization"]
    assert sum(r["modules"] for r in q["quantized"]) == len(quantized)
    assert [(r["pattern"], r["modules"]) for r in q["excluded"]] == [("*embed_tokens", len(excluded))]
    assert summary["output_bytes"] == sum(os.path.getsize(os.path.join(out, f)) for f in os.listdir(out)
                                          if f.endswith(".safetensors"))


def _records_stand_alone(text: str) -> None:
    """On the screen, every log record starts a line of its own: nothing is glued behind a bar draw."""
    for line in screen_lines(text):
        hit = LOG_RECORD.search(line)
        assert hit is None or hit.start() == 0, f"log line glued to something: {line!r}"


@pytest.mark.parametrize("hung_rank", [0, 1])
def test_ctrl_c_then_resume(tmp_path, hung_rank):
    """hung_rank 0: rank 0 hangs in Python (sleep) before its 3rd item and rank 1, done, waits in a collective;
    hung_rank 1: the other way round, so rank 0 is blocked inside gloo's collective when Ctrl-C comes (the
    interrupt is sent once the bar counts all of rank 0's items and rank 1's first 2)."""
    src = model_dir("synthetic:llama-tiny")
    out = str(tmp_path / "out")
    args = ["export", "--nproc-per-node", "2", "--model", src, "--out", out, "--max-shard-size", "40kB"]
    when = "items "
    if hung_rank == 1:
        plan = json.loads(run_cli("plan", "--model", src, "--world-size", "2", "--max-shard-size", "40kB",
                                  "--json").stdout)
        when = f"items {plan['executed']['ranks'][0]['items'] + 2}/{plan['items']}]"
    rc, text = run_in_pty(args, env={"DIST_EXPORT_FAULT": f"hang:{hung_rank}:2"}, interrupt_on=when)
    assert rc == 130, text[-3000:]
    lines = [ln for ln in re.split(r"[\r\n]+", text) if "interrupted" in ln]
    assert len(lines) == 1 and lines[0].startswith("[rank 0] interrupted: no index was written") and \
        "--resume" in lines[0], lines
    assert "Traceback" not in text and "[launcher]" not in text and "error" not in text.lower(), text[-3000:]
    # an interrupted run removes what it created; a folder it made itself may be gone altogether
    found = os.listdir(out) if os.path.isdir(out) else []
    left = [f for f in found if f.endswith(".tmp") or f.endswith(".staged")]
    assert not left and "model.safetensors.index.json" not in found, found
    run_cli(*args, "--resume")
    assert os.path.exists(os.path.join(out, "model.safetensors.index.json"))
    assert run_cli("verify", out, "--source", src).returncode == 0


@pytest.mark.parametrize("env, modules, want", [
    ({"DIST_EXPORT_PROGRESS": "0"}, {}, None),
    ({"DIST_EXPORT_PROGRESS": "1"}, {}, "terminal"),
    ({}, {"ipykernel": object()}, "notebook"),  # stderr is not a terminal here (pytest captures it)
    ({}, {}, None),
])
def test_bar_mode(monkeypatch, env, modules, want):
    from dist_export.runtime.progress import bar_mode

    monkeypatch.delenv("DIST_EXPORT_PROGRESS", raising=False)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    for k, v in modules.items():
        monkeypatch.setitem(sys.modules, k, v)
    monkeypatch.setattr(sys, "stderr", open(os.devnull, "w"))
    assert bar_mode() == want


def test_other_ranks_lines_beside_the_bar(tmp_path):
    """Rank 1 writes a log warning, a Python warning and a plain stderr line while rank 0's bar is on the screen
    (fault `talk`: 2 s into its 2nd item): each stands on a line of its own, whole, and the bar is drawn again
    below them."""
    src = model_dir("synthetic:llama-tiny")
    rc, text = run_in_pty(["export", "--nproc-per-node", "2", "--model", src, "--out", str(tmp_path / "out"),
                           "--max-shard-size", "40kB"], env={"DIST_EXPORT_FAULT": "talk:1:1"})
    assert rc == 0, text[-3000:]
    first_bar = re.search(r"export: +\d+%\|", text)
    assert first_bar and first_bar.start() < text.index("injected log line"), "rank 1 spoke before the bar was up"
    screen = screen_lines(text)
    wanted = {"injected log line": r"\d\d:\d\d:\d\d \[rank 1\] WARNING dist_export\.runtime\.faults: injected",
              "UserWarning: injected Python warning": r"\d\d:\d\d:\d\d \[rank 1\] WARNING py\.warnings: \S+faults\.py",
              "injected stderr line": r"\[rank 1\] injected stderr line while processing "}
    rows = {}
    for marker, start in wanted.items():
        hits = [i for i, line in enumerate(screen) if marker in line]
        assert len(hits) == 1, (marker, hits, screen)
        line = screen[hits[0]]
        assert re.match(start, line) and "%|" not in line, f"{marker}: not a line of its own: {line!r}"
        rows[marker] = hits[0]
    assert screen[rows["UserWarning: injected Python warning"] + 2].startswith("[rank 1] injected stderr"), \
        "a blank line after the warning"  # its text, its source line, then the next line
    bars = [i for i, line in enumerate(screen) if re.match(r"export: +\d+%\|", line)]
    assert bars and bars[-1] > max(rows.values()), "the bar was not drawn again below rank 1's lines"
    _records_stand_alone(text)


def test_calibration_bar_in_a_terminal(tmp_path):
    """`calibrate` at 2 ranks: one job-wide bar of tokens with the batches of both ranks (16 samples of 128
    tokens at batch size 1), drawn mid-run (rank 0 pauses 3 s before its 4th batch), closed at 16/16 before the
    closing line."""
    src = model_dir("synthetic:llama-tiny")
    out = str(tmp_path / "calib.safetensors")
    rc, text = run_in_pty(["calibrate", "--nproc-per-node", "2", "--model", src, "--recipe", "fp8", "--random-tokens",
                           "--out", out], env={"DIST_EXPORT_FAULT": "delay:0:3"})
    assert rc == 0 and os.path.exists(out), text[-3000:]
    draws = [m.group(0) for m in re.finditer(r"calibrate: +\d+%\|[^\r\n]*", text)]
    assert draws and "batches 16/16]" in draws[-1] and "100%" in draws[-1] and "2.05k/2.05k" in draws[-1], draws[-3:]
    mid = [int(m.group(1)) for d in draws for m in [re.search(r"batches (\d+)/16\]", d)] if m]
    assert any(0 < k < 16 for k in mid), draws
    closing = text[text.index("calibrated 14 input quantizers on 16 samples"):]
    assert "%|" not in closing
    _records_stand_alone(text)


def test_progress_lines_without_a_terminal(tmp_path):
    """Slurm logs / CI: no bar, a progress line every DIST_EXPORT_LOG_EVERY seconds with the job-wide counts."""
    src = model_dir("synthetic:llama-tiny")
    proc = run_cli("export", "--nproc-per-node", "2", "--model", src, "--out", str(tmp_path / "out"),
                   "--max-shard-size", "40kB", env={"DIST_EXPORT_FAULT": "delay:0:1", "DIST_EXPORT_LOG_EVERY": "0.5"})
    assert "%|" not in proc.stderr and "\r" not in proc.stderr
    progress = [ln for ln in proc.stderr.splitlines() if "progress:" in ln]
    assert progress and all("[rank 0]" in ln for ln in progress), proc.stderr[-2000:]
    counts = [tuple(map(int, re.search(r"(\d+)/(\d+) items", ln).groups())) for ln in progress]
    # while rank 0 sleeps after its 1st item, the count holds rank 1's finished items too (job-wide)
    assert all(total == 20 for _, total in counts) and any(1 < done < 20 for done, _ in counts), counts
    assert proc.stderr.rstrip().splitlines()[-1].startswith("  load it: "), proc.stderr[-1000:]

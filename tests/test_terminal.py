"""What a user sees in a terminal (issue 18): the CLI under our launcher (2 ranks, gloo) on a pseudo-terminal.

One job-wide bar (every rank's items, appearing once the plan is known), no log line glued to it, never redrawn
after the closing report; the report counts what was quantized and excluded (checked against the source's own
safetensors headers) and says where the export went and how to load it. Ctrl-C of the whole job (SIGINT to its
process group, as a terminal sends it) gives one line with the --resume hint, no traceback, no launcher line, no
temporaries left, and --resume then finishes the export.
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
from userkit import run_in_pty

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
    # every log record starts a line of its own: nothing is glued behind a bar draw
    for seg in re.split(r"[\r\n]+", text):
        hit = LOG_RECORD.search(seg)
        assert hit is None or hit.start() == 0, f"log line glued to something: {seg!r}"
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


def test_ctrl_c_then_resume(tmp_path):
    src = model_dir("synthetic:llama-tiny")
    out = str(tmp_path / "out")
    args = ["export", "--nproc-per-node", "2", "--model", src, "--out", out, "--max-shard-size", "40kB"]
    # rank 0 hangs before its 3rd item; Ctrl-C once the bar shows progress
    rc, text = run_in_pty(args, env={"DIST_EXPORT_FAULT": "hang:0:2"}, interrupt_on="items ")
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

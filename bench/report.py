"""Render bench results (JSON from bench_export.py) as a markdown table and a PNG plot.

    python bench/report.py bench/results-h200x2.json     # -> docs/benchmarks/results-h200x2.{md,png}
"""
from __future__ import annotations

import json
import os
import statistics
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
DOCS = os.path.join(os.path.dirname(HERE), "docs", "benchmarks")


def _gb(x) -> str:
    return f"{x / 1e9:.1f}" if isinstance(x, (int, float)) else "-"


def table(res: dict) -> str:
    floor = res["copy_floor_seconds"]
    lines = [f"Model `{res['model']}` ({res['source_bytes'] / 1e9:.2f} GB), format `{res['format']}`; "
             f"I/O floor (cp -r + sync): **{floor:.2f} s**.", "",
             "| tool | recipe | ranks/GPUs | wall s | x floor | GB/s written | peak RSS GB (max rank) | peak GPU GB (max) | note |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in res["runs"]:
        rss = max(r.get("peak_rss_per_rank") or [r.get("peak_rss", 0)])
        gpu = max(r.get("peak_gpu_per_rank") or [r.get("peak_gpu", 0)])
        note = (r.get("error") or "").strip().splitlines()[-1:] or [""]
        note = note[0]
        if r["tool"] == "threads" and "quantize_seconds" in r:
            note = f"quantize {r['quantize_seconds']:.1f} s, write {r['write_seconds']:.1f} s"
        if r["tool"] == "modelopt" and "export_seconds" in r:
            note = f"load {r['load_seconds']:.1f} s, quantize {r['quantize_seconds']:.1f} s, export {r['export_seconds']:.1f} s"
        if r["tool"] == "dist_export":
            st = r.get("stage_seconds") or {}
            note = (f"start-up {st['start-up']:.1f} s, export stage {r['export_seconds']:.1f} s; "
                    if st.get("start-up") is not None else "") + f"largest shard {_gb(r['largest_shard'])} GB"
        gbps = r.get("gb_per_s", res["source_bytes"] / r["wall_seconds"] / 1e9 if "error" not in r else 0)
        wall = f"{r['wall_seconds']:.2f}" if "error" not in r else "failed"
        lines.append(f"| {r['tool']} | {r['recipe']} | {r['ranks']} | {wall} | {r['wall_seconds'] / floor:.2f} | "
                     f"{gbps:.2f} | {_gb(rss)} | {_gb(gpu)} | {note.replace('|', '/')[:160]} |")
    return "\n".join(lines + ["", *summary_table(res)])


def walls(res: dict) -> dict:
    """(tool, recipe) -> {ranks: [wall seconds of every run that did not fail]}."""
    out: dict = {}
    for r in res["runs"]:
        if "error" not in r:
            out.setdefault((r["tool"], r["recipe"]), {}).setdefault(r["ranks"], []).append(r["wall_seconds"])
    return out


def medians(res: dict) -> dict:
    """(tool, recipe) -> {ranks: median wall seconds}."""
    return {k: {n: statistics.median(v) for n, v in sorted(by_n.items())} for k, by_n in walls(res).items()}


def summary_table(res: dict) -> list[str]:
    """Median wall time per tool, recipe and rank count, with the speed-up over 1 rank and the I/O floor ratio."""
    floor = res["copy_floor_seconds"]
    lines = ["| tool | recipe | ranks | runs | median wall s | speed-up vs 1 rank | x floor |", "|---|---|---|---|---|---|---|"]
    for (tool, recipe), by_n in sorted(walls(res).items()):
        med = {n: statistics.median(v) for n, v in by_n.items()}
        for n in sorted(by_n):
            speedup = f"{med[1] / med[n]:.2f}x" if 1 in med else "-"
            lines.append(f"| {tool} | {recipe} | {n} | {len(by_n[n])} | {med[n]:.2f} | {speedup} | "
                         f"{med[n] / floor:.2f} |")
    return lines


def plot(res: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for (tool, recipe), by_n in sorted(medians(res).items()):
        pts = sorted(by_n.items())
        style = {"dist_export": "-o", "threads": "--s", "modelopt": "x"}[tool]
        ax.plot([p[0] for p in pts], [p[1] for p in pts], style, label=f"{tool} {recipe}", markersize=8)
    ax.axhline(res["copy_floor_seconds"], color="gray", linestyle=":", label="I/O floor (copy + sync)")
    ax.set_xlabel("ranks (GPUs)")
    ax.set_ylabel("export wall time (median), s")
    ax.set_title(f"{res['model']} -> {res['format']} on {res['machine'].get('gpus', ['CPU'])[0]}")
    ranks = sorted({r["ranks"] for r in res["runs"]})
    ax.set_xticks(ranks)
    ax.set_ylim(bottom=0)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def render(results_path: str) -> str:
    with open(results_path) as f:
        res = json.load(f)
    os.makedirs(DOCS, exist_ok=True)
    stem = os.path.splitext(os.path.basename(results_path))[0]
    md = table(res)
    m = res["machine"]
    header = (f"Machine: {', '.join(m.get('gpus', ['CPU only']))} ({m.get('cpus')} CPUs), torch {m.get('torch')}, "
              f"transformers {m.get('transformers')}, date {m.get('date')}.\nCommand: `{res['command']}`\n\n")
    with open(os.path.join(DOCS, f"{stem}.md"), "w") as f:
        f.write(header + md + "\n")
    try:
        plot(res, os.path.join(DOCS, f"{stem}.png"))
    except ImportError:
        print("matplotlib missing: no plot")
    print(header + md)
    return md


if __name__ == "__main__":
    render(sys.argv[1])

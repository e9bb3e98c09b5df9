"""Reliability: killed, hung and raising ranks end the job within a bound and name the rank; --resume after a
kill gives the bytes of an uninterrupted run (also at another world size); one export per folder at a time;
a manifest from other inputs is refused; verify catches tampered shards.

Fault runs use small timeouts (--dead-timeout 4 --hang-timeout 6). Runs that must succeed keep the defaults, so
a heavily loaded CI machine (2 cores, `pytest -n 2`) never turns a starved heartbeat into a false failure.
"""
from __future__ import annotations

import glob
import hashlib
import json
import os
import random
import re
import shutil
import struct
import subprocess
import sys
import time

import pytest

from helpers import REPO, cli_in_process, folder_hashes, model_dir, run_cli, run_torchrun

MODEL = "synthetic:qwen3-moe-tiny"
RECIPE = "int4-w4a16"
SHARD = "40KB"  # 9 shards: every rank of 3 owns several
FAST = ("--dead-timeout", "4", "--hang-timeout", "6")
INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
LOCK = ".dist_export.lock"

# Kill runs: seeded (rank, item) per run; the resume runs at world size 2 for 4 of the 10.
KILL_RUNS = 10
KILL_SEED = 20240607
RESUME_WS = [3, 2, 3, 2, 3, 3, 2, 3, 2, 3]
KILL_BOUND_S = 60.0


def _src() -> str:
    return model_dir(MODEL)


def export_args(out, *extra, recipe=RECIPE):
    return ("export", "--model", _src(), "--recipe", recipe, "--max-shard-size", SHARD, "--out", str(out), *extra)


def fault_run(out: str, fault: str):
    """A 3-rank torchrun export with DIST_EXPORT_FAULT=fault and short timeouts: (proc, seconds, context for
    assertion messages)."""
    proc, elapsed = timed(run_torchrun, 3, *export_args(out, *FAST), env={"DIST_EXPORT_FAULT": fault},
                          timeout=120, check=False)
    print(f"{fault}: exit {proc.returncode} after {elapsed:.1f} s")
    return proc, elapsed, f"{fault}, stderr tail:\n{tail(proc.stderr)}"


def timed(fn, *args, **kwargs):
    t0 = time.monotonic()
    proc = fn(*args, **kwargs)
    return proc, time.monotonic() - t0


def error_lines(stderr: str, rank: int | None = None) -> list[str]:
    """dist_export's own one-line errors: `[rank N] error: ...`."""
    pat = re.compile(r"^\[rank (\d+)\] error: ")
    return [ln for ln in stderr.splitlines() if (m := pat.match(ln)) and (rank is None or int(m.group(1)) == rank)]


def assert_unpublished(out) -> None:
    for name in (INDEX, SINGLE):
        assert not os.path.exists(os.path.join(out, name)), f"a failed run left {name} in {out}"


def tail(text: str, n: int = 3000) -> str:
    return text[-n:]


cli = cli_in_process  # (exit code, stdout, stderr) of `dist-export ARGV` run in this process


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """An uninterrupted single-process export: the bytes every resumed run must reproduce."""
    from dist_export.api import export

    out = str(tmp_path_factory.mktemp("reference") / "ws1")
    export(_src(), out, recipe=RECIPE, max_shard_size=SHARD)
    hashes = folder_hashes(out)
    assert INDEX in hashes and len([f for f in hashes if f.startswith("model-")]) >= 6, hashes
    return out, hashes


# --- 1. killed rank at a random item, then --resume -------------------------------------------------------

def _kill_schedule():
    from dist_export.options import parse_size
    from dist_export.sources.checkpoint import SourceCheckpoint
    from dist_export.plan import build_plan
    from dist_export.recipe import load_recipe
    from dist_export.output_formats import get_output_format

    plan = build_plan(SourceCheckpoint(_src()).tensors, load_recipe(RECIPE), get_output_format("vllm-fq"), 3,
                      parse_size(SHARD))
    items_of = [len(plan.owned_items(r)) for r in range(3)]
    rng = random.Random(KILL_SEED)
    runs = []
    for i in range(KILL_RUNS):
        rank, n = rng.randrange(3), rng.randint(0, 8)
        assert n < items_of[rank], f"test setup: rank {rank} owns only {items_of[rank]} items"
        runs.append((rank, n, RESUME_WS[i]))
    return runs


KILL_CHUNK = 2  # runs per test, so that pytest-xdist spreads the runs over its workers


@pytest.mark.parametrize("chunk", range(-(-KILL_RUNS // KILL_CHUNK)))
def test_kill_random_rank_then_resume(chunk, reference, tmp_path):
    """10 runs (2 per test, so xdist spreads them): SIGKILL rank r before its n-th item in a 3-rank torchrun job;
    the job ends non-zero within the bound, no index appears, torchrun's failure report names rank r as killed,
    and --resume (world size 3, or 2 for 4 of the runs) gives the reference bytes."""
    ref_dir, ref = reference
    runs = _kill_schedule()
    mine = list(enumerate(runs))[chunk * KILL_CHUNK:(chunk + 1) * KILL_CHUNK]
    for i, (rank, n, resume_ws) in mine:
        out = str(tmp_path / f"run{i}")
        fault = f"kill:{rank}:{n}"
        proc, elapsed, ctx = fault_run(out, fault)
        print(f"run {i}: resume at world size {resume_ws}")
        ctx = f"run {i}: {ctx}"
        assert proc.returncode != 0, ctx
        assert elapsed < KILL_BOUND_S, f"took {elapsed:.1f} s; {ctx}"
        # torchrun's failure report: the entry of rank r (standalone: rank == local_rank) says SIGKILL.
        killed = re.compile(rf"rank\s*:\s*{rank} \(local_rank: {rank}\)\s*\n\s*exitcode\s*:\s*-9 \(pid: \d+\)"
                            rf"\s*\(SIGKILL\)")
        assert killed.search(proc.stderr), f"stderr does not name rank {rank} as killed; {ctx}"
        # no surviving rank blames another rank for the failure
        for line in error_lines(proc.stderr):
            for other in re.findall(r"\brank (\d+) (?:made no progress|stopped sending|never reported)", line):
                assert int(other) == rank, f"wrong rank named: {line}; {ctx}"
        assert_unpublished(out)

        resume = run_torchrun(resume_ws, *export_args(out, "--resume"), timeout=180, check=False)
        assert resume.returncode == 0, f"resume at world size {resume_ws} after {fault} failed:\n{tail(resume.stderr)}"
        got = folder_hashes(out)
        assert got == ref, (f"run {i} ({fault}, resume ws {resume_ws}): differs from the uninterrupted export in "
                            f"{sorted(k for k in set(got) | set(ref) if got.get(k) != ref.get(k))}")


def test_kill_while_every_rank_writes_one_shard_then_resume(tmp_path):
    """One shard file (default shard size) written by all 3 ranks at once; rank 1 is killed mid-way: nothing is
    published (no model.safetensors, no staged file, no temporary), and --resume at world size 2 gives the bytes
    of a single-process export."""
    from dist_export.api import export

    ref_dir = str(tmp_path / "ref")
    export(_src(), ref_dir, recipe=RECIPE)
    ref = folder_hashes(ref_dir)
    assert SINGLE in ref and INDEX not in ref
    out = str(tmp_path / "out")
    proc, elapsed = timed(run_torchrun, 3, "export", "--model", _src(), "--recipe", RECIPE, "--out", out, *FAST,
                          env={"DIST_EXPORT_FAULT": "kill:1:10"}, timeout=120, check=False)
    assert proc.returncode != 0 and elapsed < KILL_BOUND_S, tail(proc.stderr)
    assert_unpublished(out)
    left = [f for f in os.listdir(out) if f.endswith((".tmp", ".staged"))]
    assert not left, f"a killed run left {left}"
    resume = run_torchrun(2, "export", "--model", _src(), "--recipe", RECIPE, "--out", out, "--resume",
                          timeout=180, check=False)
    assert resume.returncode == 0, tail(resume.stderr)
    assert folder_hashes(out) == ref


def test_resume_reuses_exactly_the_completed_shared_shards(reference, tmp_path):
    """3 ranks write most shards together; rank 1 is killed before its last item. Only shards whose every part
    was fsynced and recorded were renamed (each has its record): --resume at world size 2 reuses exactly them,
    after checking every tensor's bytes, and gives the reference bytes."""
    from dist_export.options import parse_size
    from dist_export.output_formats import get_output_format
    from dist_export.plan import build_plan
    from dist_export.recipe import load_recipe
    from dist_export.sources.checkpoint import SourceCheckpoint

    plan = build_plan(SourceCheckpoint(_src()).tensors, load_recipe(RECIPE), get_output_format("vllm-fq"), 3,
                      parse_size(SHARD))
    shared = [s.filename for s in plan.shards if len(s.writers) > 1]
    assert len(shared) * 2 > len(plan.shards), f"test setup: only {shared} have several writers"
    out = str(tmp_path / "out")
    proc, _, ctx = fault_run(out, f"kill:1:{len(plan.owned_items(1)) - 1}")
    assert proc.returncode != 0, ctx
    assert_unpublished(out)
    records = os.path.join(out, ".dist_export", "shards")
    done = sorted(s.filename for s in plan.shards if os.path.isfile(os.path.join(records, s.filename + ".json")))
    on_disk = sorted(f for f in os.listdir(out) if f.startswith("model-") and f.endswith(".safetensors"))
    # the record is written before the rename, so a writer killed in between leaves a record without its file
    assert set(on_disk) <= set(done), f"shards renamed without their record: {sorted(set(on_disk) - set(done))}"
    print(f"completed before the kill: {len(on_disk)} of {len(plan.shards)} shards")
    summary = tmp_path / "summary.json"
    resume = run_torchrun(2, *export_args(out, "--resume", "--summary-json", str(summary)), timeout=180, check=False)
    assert resume.returncode == 0, tail(resume.stderr)
    assert json.loads(summary.read_text())["reused_shards"] == len(on_disk)
    assert folder_hashes(out) == reference[1]


def test_survivors_name_killed_rank(tmp_path):
    """README: a killed rank makes every rank exit 'with one line naming the rank'. dist_export's own error
    line (`[rank N] error: ...`, N a survivor) must name the killed rank."""
    out = str(tmp_path / "out")
    proc, elapsed, _ = fault_run(out, "kill:2:5")
    assert proc.returncode != 0 and elapsed < KILL_BOUND_S
    lines = error_lines(proc.stderr, 0) + error_lines(proc.stderr, 1)
    assert any(re.search(r"\brank 2\b", ln) for ln in lines), (
        f"no survivor's error line names rank 2 ({elapsed:.1f} s); their lines: {lines}")


# --- 2. hung rank ------------------------------------------------------------------------------------------

def test_hung_rank_detected_within_bound(tmp_path):
    out = str(tmp_path / "out")
    proc, elapsed, ctx = fault_run(out, "hang:1:2")
    assert proc.returncode != 0, ctx
    assert elapsed < 30, f"hung rank detected only after {elapsed:.1f} s; {ctx}"
    hung = [ln for ln in error_lines(proc.stderr)
            if re.match(r"\[rank [02]\] error: export aborted: rank 1 made no progress for \d+ s \(hung\)", ln)]
    assert hung, f"no survivor names rank 1 as hung; {ctx}"
    for line in error_lines(proc.stderr):
        assert not re.search(r"\brank [02] (made no progress|stopped sending|never reported)", line), line
    assert_unpublished(out)


# --- 3. raising rank -----------------------------------------------------------------------------------------

def test_raising_rank_one_clear_error(tmp_path):
    out = str(tmp_path / "out")
    proc, elapsed, ctx = fault_run(out, "raise:1:0")
    assert proc.returncode != 0, ctx
    for survivor in (0, 2):
        lines = error_lines(proc.stderr, survivor)
        assert len(lines) == 1, f"rank {survivor} printed {len(lines)} error lines: {lines}; {ctx}"
        assert re.search(r"failed on rank 1: RuntimeError: injected fault", lines[0]), lines[0]
    assert_unpublished(out)


# --- 4. one export per folder --------------------------------------------------------------------------------

def test_second_export_into_same_folder_refused(reference, tmp_path, capsys):
    ref_dir, ref = reference
    out = str(tmp_path / "out")
    lock = os.path.join(out, LOCK)
    err1 = open(tmp_path / "first.stderr", "w")
    first = subprocess.Popen([sys.executable, "-m", "dist_export", *export_args(out, "--hang-timeout", "600")],
                             cwd=REPO, env={**os.environ, "DIST_EXPORT_FAULT": "hang:0:3"},
                             stdout=subprocess.DEVNULL, stderr=err1)
    try:
        deadline = time.monotonic() + 90
        # the holder writes "pid N on host" into the lock file once it holds the flock
        while not (os.path.isfile(lock) and open(lock).read().startswith("pid")):
            assert first.poll() is None, f"the first export ended early ({first.returncode})"
            assert time.monotonic() < deadline, "the first export never took the lock"
            time.sleep(0.1)
        (rc, _, err), elapsed = timed(cli, capsys, *export_args(out, "--resume"))
        assert rc != 0
        lines = error_lines(err)
        assert len(lines) == 1 and "another export is writing into" in lines[0] and out in lines[0], err
        assert f"pid {first.pid}" in lines[0], lines[0]
        assert elapsed < 10, f"refusal took {elapsed:.1f} s"
        assert first.poll() is None, "the refused export disturbed the running one"
        assert_unpublished(out)
    finally:
        first.kill()
        first.wait(30)
        err1.close()
    # the killed holder's lock dies with it: a resume takes over and finishes
    rc, _, err = cli(capsys, *export_args(out, "--resume"))
    assert rc == 0, tail(err)
    assert folder_hashes(out) == ref
    print(f"second export refused after {elapsed:.1f} s")


# --- 5. --resume with a manifest from other inputs -------------------------------------------------------------

def test_resume_with_other_recipe_refused(reference, tmp_path, capsys):
    ref_dir, ref = reference
    out = str(tmp_path / "out")
    killed = run_cli(*export_args(out), env={"DIST_EXPORT_FAULT": "kill:0:20"}, timeout=120, check=False)
    assert killed.returncode == -9, killed.stderr
    assert_unpublished(out)
    kept = sorted(glob.glob(os.path.join(out, "model-*.safetensors")))
    assert kept, "test setup: the killed run finished no shard"
    manifest = os.path.join(out, ".dist_export", "manifest.json")
    before = {p: hashlib.sha256(open(p, "rb").read()).hexdigest() for p in [*kept, manifest]}

    rc, _, err = cli(capsys, *export_args(out, "--resume", recipe="int8-w8a16"))
    assert rc != 0
    lines = error_lines(err)
    assert len(lines) == 1, err
    assert "made from other inputs" in lines[0], lines[0]
    differs = re.search(r"differs in: ([^)]*)\)", lines[0])
    assert differs and "recipe" in differs.group(1).split(", "), lines[0]
    assert_unpublished(out)
    assert {p: hashlib.sha256(open(p, "rb").read()).hexdigest() for p in before} == before, \
        "the refused resume changed the unfinished export"
    # the refusal left the unfinished export intact: the right inputs still resume it
    rc, _, err = cli(capsys, *export_args(out, "--resume"))
    assert rc == 0, tail(err)
    assert folder_hashes(out) == ref


# --- 6./7. verify ------------------------------------------------------------------------------------------------

def _copy(reference, tmp_path) -> str:
    out = str(tmp_path / "export")
    shutil.copytree(reference[0], out)
    return out


def _shard2(out) -> str:
    (path,) = glob.glob(os.path.join(out, "model-00002-of-*.safetensors"))
    return path


def _verify(capsys, *args) -> tuple[int, str]:
    rc, out, err = cli(capsys, "verify", *args)
    return rc, out + err


def _defects(stdout: str) -> list[str]:
    return [ln.strip() for ln in stdout.splitlines() if ln.strip().startswith("DEFECT:")]


def test_verify_catches_flipped_byte(reference, tmp_path):
    out = _copy(reference, tmp_path)
    path = _shard2(out)
    with open(path, "r+b") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
        name, entry = max(((k, v) for k, v in header.items() if k != "__metadata__"),
                          key=lambda kv: kv[1]["data_offsets"][1] - kv[1]["data_offsets"][0])
        begin, end = entry["data_offsets"]
        pos = 8 + n + (begin + end) // 2
        f.seek(pos)
        b = f.read(1)
        f.seek(pos)
        f.write(bytes([b[0] ^ 0xFF]))
    proc = run_cli("verify", out, timeout=120, check=False)  # the real command and its exit status
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert any(os.path.basename(path) in d for d in _defects(proc.stdout)), \
        f"flipped byte in {name} ({os.path.basename(path)}) not reported:\n{proc.stdout}"


def test_verify_catches_removed_tensor(reference, tmp_path, capsys):
    from safetensors.torch import load_file, save_file

    out = _copy(reference, tmp_path)
    path = _shard2(out)
    tensors = load_file(path)
    victim = sorted(tensors)[len(tensors) // 2]
    del tensors[victim]
    save_file(tensors, path, metadata={"format": "pt"})  # the index still lists the victim
    rc, text = _verify(capsys, out, "--source", _src())
    assert rc == 1, text
    assert any(victim in d for d in _defects(text)), f"{victim} not named:\n{text}"


def _add_extra_tensor(out, consistent: bool) -> str:
    import torch
    from safetensors.torch import load_file, save_file

    path = _shard2(out)
    extra = "model.extra_proj.weight"
    tensors = load_file(path)
    tensors[extra] = torch.ones(8, 16, dtype=torch.bfloat16)
    save_file(tensors, path, metadata={"format": "pt"})
    index_path = os.path.join(out, INDEX)
    with open(index_path) as f:
        index = json.load(f)
    index["weight_map"][extra] = os.path.basename(path)
    if consistent:  # a careful forger: total_size and the export record's checksum match the new shard
        index["metadata"]["total_size"] += 8 * 16 * 2
        rec_path = os.path.join(out, "dist_export.json")
        with open(rec_path) as f:
            record = json.load(f)
        data = open(path, "rb").read()
        (n,) = struct.unpack("<Q", data[:8])
        header = json.loads(data[8:8 + n])
        record["shards"][os.path.basename(path)] = {
            "size": len(data), "header_sha256": hashlib.sha256(data[:8 + n]).hexdigest(),
            "tensors": {k: hashlib.sha256(data[8 + n + v["data_offsets"][0]:8 + n + v["data_offsets"][1]]).hexdigest()
                        for k, v in header.items() if k != "__metadata__"}}
        with open(rec_path, "w") as f:
            json.dump(record, f)
    with open(index_path, "w") as f:
        json.dump(index, f, indent=2)
    return extra


def test_verify_catches_extra_tensor(reference, tmp_path, capsys):
    out = _copy(reference, tmp_path)
    extra = _add_extra_tensor(out, consistent=False)
    rc, text = _verify(capsys, out, "--source", _src())
    assert rc == 1, text
    assert any(extra in d for d in _defects(text)), f"{extra} not named:\n{text}"


def test_verify_catches_consistently_forged_extra_tensor(reference, tmp_path, capsys):
    """Index total_size and the record's checksum forged to match: only the recompute against the source
    can tell, and it names the tensor."""
    out = _copy(reference, tmp_path)
    extra = _add_extra_tensor(out, consistent=True)
    rc, text = _verify(capsys, out, "--source", _src())
    assert rc == 1, text
    assert any(extra in d for d in _defects(text)), f"{extra} not named:\n{text}"


def test_verify_json_report_ok(reference):
    proc = run_cli("verify", reference[0], "--json", "-", timeout=120, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    start = proc.stdout.find("\n{")
    report = json.loads(proc.stdout if proc.stdout.startswith("{") else proc.stdout[start + 1:])
    assert report["ok"] is True and report["defects"] == [], report
    assert report["tensors"] == len(json.load(open(os.path.join(reference[0], INDEX)))["weight_map"])


def test_verify_json_stdout_is_pure_json(reference, capsys):
    rc, out, _ = cli(capsys, "verify", reference[0], "--json", "-")
    assert rc == 0
    assert json.loads(out)["ok"] is True

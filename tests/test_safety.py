"""Never touch what is not ours (issue 13): who owns the output folder, and no link is ever followed.

Each test is one attack from the issue, run through the real command line (`dist_export.cli.main` in this
process where that is enough, a subprocess where an export must run concurrently), with real user files, real
symlinks and real checkpoints in the folder. Each asserts the exit code, the one-line message, and that nothing
outside what dist_export wrote was touched (byte for byte, same mode, links left as links). docs/bad-inputs.md
lists the cases.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import stat
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import save_file

from helpers import REPO, cli_in_process, model_dir

MODEL = "synthetic:llama-tiny"
RECIPE = "int4-w4a16"
INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
ERROR = "[rank 0] error:"


# ----------------------------------------------------------------------------------------------- helpers


def tree(path) -> dict[str, tuple]:
    """Every entry under `path` (links not followed): relative name -> (kind, mode, sha256 or link target)."""
    out = {}
    path = str(path)
    for root, dirs, files in os.walk(path):
        for name in dirs + files:
            full = os.path.join(root, name)
            rel = os.path.relpath(full, path)
            st = os.lstat(full)
            if stat.S_ISLNK(st.st_mode):
                out[rel] = ("link", os.readlink(full))
            elif stat.S_ISREG(st.st_mode):
                with open(full, "rb") as f:
                    out[rel] = ("file", stat.S_IMODE(st.st_mode), hashlib.sha256(f.read()).hexdigest())
            elif stat.S_ISDIR(st.st_mode):
                out[rel] = ("dir",)
    return out


def cli(capsys, *argv) -> tuple[int, str]:
    """`dist-export ARGV` in this process; returns (exit code, stderr)."""
    rc, _, err = cli_in_process(capsys, *argv)
    return rc, err


def export(capsys, out, *args, model=MODEL, recipe=RECIPE) -> tuple[int, str]:
    return cli(capsys, "export", "--out", out, "--device", "cpu", "--model", model, "--recipe", recipe, *args)


def refused(rc: int, err: str, *names: str) -> str:
    """Non-zero exit and one `[rank 0] error:` line, the last line, naming every one of `names`."""
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert rc != 0, f"exit 0 where a refusal was expected:\n{err[-2000:]}"
    assert lines and lines[-1].startswith(ERROR), f"last line is not the error line:\n{err[-2000:]}"
    assert [ln for ln in lines if ERROR in ln] == [lines[-1]], f"more than one error line:\n{err[-2000:]}"
    assert "Traceback" not in err, err[-2000:]
    for n in names:
        assert n in lines[-1], f"error line does not name {n!r}: {lines[-1]!r}"
    return lines[-1]


def copy_model(parent, name="src", model=MODEL) -> str:
    dst = os.path.join(str(parent), name)
    shutil.copytree(model_dir(model), dst)
    return dst


def published(out) -> bool:
    return any(os.path.lexists(os.path.join(str(out), n)) for n in (INDEX, SINGLE))


def record(out) -> dict:
    with open(os.path.join(str(out), "dist_export.json")) as f:
        return json.load(f)


@pytest.fixture
def finished(tmp_path, capsys):
    """A finished export of ours in tmp/out (made through the CLI)."""
    out = str(tmp_path / "out")
    rc, err = export(capsys, out)
    assert rc == 0, err[-2000:]
    return out


# ----------------------------------------------------------------------------- 1. ownership of --out


@pytest.mark.parametrize("flag", ["--overwrite", "--resume"])
def test_out_equal_to_source_refused(tmp_path, capsys, flag):
    src = copy_model(tmp_path)
    before = tree(src)
    rc, err = export(capsys, src, flag, model=src)
    refused(rc, err, "--out", "is the source folder")
    assert tree(src) == before


@pytest.mark.parametrize("where", ["inside", "containing", "link"])
def test_out_inside_containing_or_linked_to_source_refused(tmp_path, capsys, where):
    parent = tmp_path / "p"
    parent.mkdir()
    src = copy_model(parent)
    out = {"inside": os.path.join(src, "exported"), "containing": str(parent), "link": str(tmp_path / "l")}[where]
    if where == "link":
        os.symlink(src, out)
    before = tree(tmp_path)
    rc, err = export(capsys, out, "--overwrite", model=src)
    refused(rc, err, "--out", "source folder")
    assert tree(tmp_path) == before


def test_resume_refuses_a_folder_holding_a_users_model(tmp_path, capsys):
    out = copy_model(tmp_path, "mine")  # the user's own checkpoint: no record of ours names it
    before = tree(out)
    for flags in (("--resume",), ("--overwrite",)):
        rc, err = export(capsys, out, *flags)
        line = refused(rc, err, out, "--allow-foreign-files")
        assert any(n in line for n in ("config.json", SINGLE, "generation_config.json", "tokenizer")), line
        assert tree(out) == before


def test_resume_of_a_finished_export_keeps_it(finished, capsys, monkeypatch):
    before = tree(finished)
    # a rerun would fail at its first item: a finished export must not be unpublished for it
    monkeypatch.setenv("DIST_EXPORT_FAULT", "raise:0:0")
    rc, err = export(capsys, finished, "--resume")
    assert rc == 0 and "nothing to do" in err, err[-2000:]
    assert tree(finished) == before


def test_resume_of_a_finished_export_from_other_inputs_refused(finished, capsys):
    before = tree(finished)
    rc, err = export(capsys, finished, "--resume", recipe="int8-w8a16")
    refused(rc, err, finished, "other inputs", "recipe", "--overwrite")
    assert tree(finished) == before


def test_overwrite_keeps_files_it_did_not_write(finished, capsys):
    extra = {"my-adapter.safetensors": None, "notes.tmp": b"my notes\n", "calib.safetensors": None,
             "sub/readme.md": b"mine\n"}
    os.makedirs(os.path.join(finished, "sub"))
    for name, data in extra.items():
        path = os.path.join(finished, name)
        if data is None:
            save_file({"x": torch.ones(3)}, path)
        else:
            with open(path, "wb") as f:
                f.write(data)
    before = tree(finished)
    rc, err = export(capsys, finished, "--overwrite")
    line = refused(rc, err, "--allow-foreign-files")
    assert any(n in line for n in extra), line
    assert tree(finished) == before
    # with the explicit option the export is replaced and the user's files stay as they were
    rc, err = export(capsys, finished, "--overwrite", "--allow-foreign-files", recipe="int8-w8a16")
    assert rc == 0, err[-2000:]
    after = tree(finished)
    for name in extra:
        assert after[name] == before[name]
    assert record(finished)["recipe"]["name"] == "int8-w8a16"
    assert after[SINGLE] != before[SINGLE]


def test_overwrite_refuses_a_users_config(tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "config.json").write_text('{"my": "config"}\n')
    before = tree(out)
    for extra in ((), ("--allow-foreign-files",)):
        rc, err = export(capsys, out, "--overwrite", *extra)
        refused(rc, err, "config.json")
        assert tree(out) == before


def test_overwrite_refuses_an_export_file_changed_since(finished, capsys):
    with open(os.path.join(finished, "config.json"), "a") as f:
        f.write("\n")  # the user edited our config.json: it is theirs now
    before = tree(finished)
    for extra in ((), ("--allow-foreign-files",)):
        rc, err = export(capsys, finished, "--overwrite", *extra)
        refused(rc, err, "config.json")
        assert tree(finished) == before


def test_overwrite_replaces_our_own_export_of_another_layout(tmp_path, capsys):
    out = str(tmp_path / "out")
    rc, err = export(capsys, out, "--max-shard-size", "40KB")
    assert rc == 0, err[-2000:]
    old_shards = sorted(f for f in os.listdir(out) if f.startswith("model-"))
    assert len(old_shards) > 1 and os.path.exists(os.path.join(out, INDEX))
    rc, err = export(capsys, out, "--overwrite", recipe="int8-w8a16")
    assert rc == 0, err[-2000:]
    assert sorted(os.listdir(out)) == sorted(["config.json", "dist_export.json", "generation_config.json", SINGLE,
                                              "tokenizer.json", "tokenizer_config.json",
                                              "vllm_fq_modelopt_state.pth"])


def test_no_flag_refuses_an_earlier_export_even_with_foreign_files_allowed(finished, capsys):
    before = tree(finished)
    rc, err = export(capsys, finished, "--allow-foreign-files")
    refused(rc, err, "earlier export", "--overwrite", "--resume")
    assert tree(finished) == before


def test_allow_foreign_files_exports_next_to_a_users_files(tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine\n")
    before = tree(out)
    rc, err = export(capsys, out)
    refused(rc, err, "not empty", "--allow-foreign-files")
    assert tree(out) == before
    rc, err = export(capsys, out, "--allow-foreign-files")
    assert rc == 0, err[-2000:]
    assert tree(out)["notes.txt"] == before["notes.txt"] and published(out)


def test_resume_after_a_commit_cut_short(tmp_path, capsys, monkeypatch):
    """The commit failed after the record was written (disk full on config.json): the record names every file
    the commit writes, so --resume owns what it left and finishes."""
    import dist_export.commit as commit

    real = commit.write_atomic

    def fail_on_config(path, data, tmp=None):
        if path.endswith("config.json"):
            raise OSError(28, "No space left on device (injected)")
        return real(path, data, tmp)

    monkeypatch.setattr(commit, "write_atomic", fail_on_config)
    out = str(tmp_path / "out")
    rc, err = export(capsys, out, "--max-shard-size", "40KB")
    assert rc != 0 and not published(out), err[-2000:]
    monkeypatch.setattr(commit, "write_atomic", real)
    rc, err = export(capsys, out, "--resume", "--max-shard-size", "40KB")
    assert rc == 0 and published(out), err[-2000:]
    assert "reusing" in err


def test_refused_second_export_leaves_the_running_one(tmp_path):
    """Export A hangs mid-shard; B, a real process into the same folder, is refused while A holds the lock, and
    B's failure clean-up removes nothing of A's (its temporaries, manifest, finished shards)."""
    out = str(tmp_path / "out")
    cmd = [sys.executable, "-m", "dist_export", "export", "--model", model_dir(MODEL), "--recipe", RECIPE,
           "--device", "cpu", "--max-shard-size", "40KB", "--out", out]
    env = {**os.environ, "PYTHONPATH": REPO, "OMP_NUM_THREADS": "1"}
    a = subprocess.Popen(cmd + ["--hang-timeout", "600"], cwd=REPO, env={**env, "DIST_EXPORT_FAULT": "hang:0:5"}, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while not any(k.startswith(".dist_export/tmp/") for k in tree(out)):
            assert time.monotonic() < deadline and a.poll() is None, "export A never started writing"
            time.sleep(0.2)
        time.sleep(1)
        before = {k: v for k, v in tree(out).items() if k != ".dist_export.lock"}
        for flag in ("--overwrite", "--resume"):
            b = subprocess.run(cmd + [flag], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
            refused(b.returncode, b.stderr, "another export is writing")
            assert {k: v for k, v in tree(out).items() if k != ".dist_export.lock"} == before
    finally:
        a.kill()
        a.wait()


def test_lock_released_while_another_opens_it_stays_exclusive(tmp_path, monkeypatch):
    """The release race: export A releases (unlinks the lock file, then closes it) just after B opened that file
    and before B's flock. B then held an unlinked inode, and C, opening a new lock file, got the lock too: two
    exports at once in one folder, where C's clean-up may remove B's temporaries. B must notice and lock the file
    at the path; C is refused naming B; nothing but the lock file is in the folder."""
    import fcntl

    from dist_export.storage import outdir

    out = tmp_path / "out"
    out.mkdir()
    a, b, c = (outdir.OutputLock(str(out)) for _ in range(3))
    a.acquire()
    real = fcntl.flock
    calls = []

    def flock_after_release(fd, op):
        if not calls:  # B's first try: A releases between B's open and B's flock
            a.release()
        calls.append(fd)
        return real(fd, op)

    monkeypatch.setattr(outdir.fcntl, "flock", flock_after_release)
    b.acquire()
    monkeypatch.setattr(outdir.fcntl, "flock", real)
    with pytest.raises(ValueError, match=rf"another export is writing into .*\(pid {os.getpid()} on "):
        c.acquire()
    assert os.path.samestat(os.fstat(b.fd), os.lstat(out / ".dist_export.lock"))
    assert sorted(os.listdir(out)) == [".dist_export.lock"]
    b.release()
    c.acquire()  # free again once B released
    c.release()
    assert os.listdir(out) == []


# --------------------------------------------------------------------------------- 2. no link followed


def test_side_file_linking_out_of_the_source_refused(tmp_path, capsys):
    secret = tmp_path / "secret.env"
    secret.write_text("HF_TOKEN=hf_secret\n")
    src = copy_model(tmp_path)
    os.unlink(os.path.join(src, "tokenizer.json"))
    os.symlink(str(secret), os.path.join(src, "tokenizer.json"))
    out = tmp_path / "out"
    rc, err = export(capsys, out, model=src)
    refused(rc, err, "tokenizer.json", "outside")
    assert not published(out)
    assert all(b"hf_secret" not in open(os.path.join(r, f), "rb").read()
               for r, _, fs in os.walk(out) for f in fs if not os.path.islink(os.path.join(r, f)))


def test_hugging_face_cache_links_are_followed(tmp_path, capsys):
    """The hub cache keeps every file as a link from snapshots/<rev>/ to ../../blobs/: that layout is read, and
    the export holds regular files."""
    repo = tmp_path / "models--x--y"
    blobs, snap = repo / "blobs", repo / "snapshots" / "abc123"
    blobs.mkdir(parents=True)
    snap.mkdir(parents=True)
    src = model_dir(MODEL)
    for name in os.listdir(src):
        blob = blobs / hashlib.sha256(name.encode()).hexdigest()
        shutil.copy(os.path.join(src, name), blob)
        os.symlink(os.path.join("..", "..", "blobs", blob.name), snap / name)
    out = tmp_path / "out"
    rc, err = export(capsys, out, model=str(snap))
    assert rc == 0, err[-2000:]
    assert (out / "tokenizer.json").read_bytes() == open(os.path.join(src, "tokenizer.json"), "rb").read()
    assert not (out / "tokenizer.json").is_symlink()


def _victim(tmp_path):
    victim = tmp_path / "victim.conf"
    victim.write_text("precious\n")
    victim.chmod(0o600)
    return victim


def test_write_never_follows_a_link_planted_in_out(finished, tmp_path, capsys):
    victim = _victim(tmp_path)
    os.unlink(os.path.join(finished, "tokenizer.json"))
    os.symlink(str(victim), os.path.join(finished, "tokenizer.json"))
    before = tree(tmp_path)
    for extra in ((), ("--allow-foreign-files",)):
        rc, err = export(capsys, finished, "--overwrite", *extra)
        refused(rc, err, "tokenizer.json", "a link")
        assert tree(tmp_path) == before
    assert victim.read_text() == "precious\n" and stat.S_IMODE(victim.stat().st_mode) == 0o600


def test_a_linked_folder_in_out_is_never_written_into(tmp_path, capsys):
    """`out/shared -> ~/elsewhere`: the source carries shared/tokenizer.json; nothing lands in the link's target."""
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "tokenizer.json").write_text("precious\n")
    src = copy_model(tmp_path)
    os.makedirs(os.path.join(src, "shared"))
    shutil.copy(os.path.join(src, "tokenizer.json"), os.path.join(src, "shared", "tokenizer.json"))
    out = tmp_path / "out"
    out.mkdir()
    os.symlink(str(elsewhere), out / "shared")
    before = tree(tmp_path)
    rc, err = export(capsys, out, "--allow-foreign-files", model=src)
    refused(rc, err, "shared", "a link")
    assert tree(tmp_path) == before


def test_planted_lock_link_is_not_followed(tmp_path, capsys):
    victim = _victim(tmp_path)
    out = tmp_path / "out"
    out.mkdir()
    os.symlink(str(victim), out / ".dist_export.lock")
    rc, err = export(capsys, out)
    refused(rc, err, ".dist_export.lock", "link")
    assert victim.read_text() == "precious\n" and stat.S_IMODE(victim.stat().st_mode) == 0o600


def test_planted_private_folder_link_is_foreign(tmp_path, capsys):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "keep.txt").write_text("precious\n")
    out = tmp_path / "out"
    out.mkdir()
    os.symlink(str(elsewhere), out / ".dist_export")
    before = tree(tmp_path)
    for extra in (("--overwrite",), ("--resume",), ("--allow-foreign-files",)):
        rc, err = export(capsys, out, *extra)
        refused(rc, err, ".dist_export")
        assert tree(tmp_path) == before


def test_calibration_and_state_writes_ignore_a_planted_tmp_link(tmp_path):
    """calibration/file.py and sources/quantizer_state.py used the fixed name NAME.tmp and followed a link there."""
    from dist_export.calibration.file import save_calibration
    from dist_export.recipe import load_recipe
    from dist_export.sources.quantizer_state import save_state

    victim = _victim(tmp_path)
    calib, state = tmp_path / "calib.safetensors", tmp_path / "state.pth"
    for path in (calib, state):
        os.symlink(str(victim), str(path) + ".tmp")
    save_calibration(str(calib), {"model.layers.0.mlp.down_proj.input_quantizer": torch.tensor(2.0)},
                     load_recipe("fp8"), "sig")
    save_state({"a": torch.ones(2)}, str(state))
    assert victim.read_text() == "precious\n" and stat.S_IMODE(victim.stat().st_mode) == 0o600
    assert not calib.is_symlink() and not state.is_symlink()
    assert torch.load(str(state), weights_only=True)["a"].tolist() == [1.0, 1.0]
    from safetensors import safe_open

    with safe_open(str(calib), "pt") as f:
        assert f.get_tensor("model.layers.0.mlp.down_proj.input_quantizer").item() == 2.0


def test_synthetic_cache_ignores_planted_links(tmp_path, monkeypatch):
    """sources/synthetic.py opened `<model>.lock` following a link and built the model in a fixed `<model>.tmpPID`."""
    import transformers

    from dist_export.sources.synthetic import ensure_synthetic

    victim = _victim(tmp_path)
    cache = tmp_path / "cache"
    (cache / "synthetic").mkdir(parents=True)
    monkeypatch.setenv("DIST_EXPORT_CACHE", str(cache))
    final = cache / "synthetic" / f"llama-tiny-seed0-bfloat16-tf{transformers.__version__}-tok1"
    os.symlink(str(victim), str(final) + ".lock")
    with pytest.raises(OSError):
        ensure_synthetic(MODEL)
    assert victim.read_text() == "precious\n" and stat.S_IMODE(victim.stat().st_mode) == 0o600
    os.unlink(str(final) + ".lock")
    os.symlink(str(tmp_path / "elsewhere"), f"{final}.tmp{os.getpid()}")  # the old fixed build folder name
    path = ensure_synthetic(MODEL)
    assert os.path.isfile(os.path.join(path, "config.json")) and not (tmp_path / "elsewhere").exists()
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o755


# ----------------------------------------------------------------------------- 3. publish last


@pytest.mark.parametrize("bad", ["zero", "int32", "vector"])
def test_bad_calibration_amax_refused_before_anything_is_written(tmp_path, capsys, bad):
    """A zero amax gives a zero input_scale (the quick verify used to find it only after publishing); an int32 or
    1-d amax was accepted. All are refused where the file is read, naming the quantizer."""
    from safetensors import safe_open

    calib = str(tmp_path / "c.safetensors")
    rc, err = cli(capsys, "calibrate", "--model", MODEL, "--recipe", "fp8", "--random-tokens", "--out", calib)
    assert rc == 0, err[-2000:]
    with safe_open(calib, "pt") as f:
        meta, amax = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    victim = sorted(amax)[0]
    amax[victim] = {"zero": torch.tensor(0.0), "int32": torch.tensor(3, dtype=torch.int32),
                    "vector": torch.tensor([1.0, 2.0])}[bad]
    save_file(amax, calib, metadata=meta)
    out = tmp_path / "out"
    rc, err = export(capsys, out, "--calib", calib, "--format", "modelopt", recipe="fp8")
    refused(rc, err, victim, "calibrate again")
    assert not os.path.exists(out)


@pytest.mark.parametrize("size", ["infGB", "1e400", "nanGB", "-5", "0"])
def test_unusable_max_shard_size_is_one_line(tmp_path, capsys, size):
    rc, err = export(capsys, tmp_path / "out", f"--max-shard-size={size}")
    refused(rc, err, size)
    assert not os.path.exists(tmp_path / "out")


def test_a_verify_defect_publishes_nothing_and_resume_finishes(tmp_path, capsys, monkeypatch):
    from dist_export.output_formats import get_output_format

    fmt = type(get_output_format("vllm-fq"))
    real = fmt.check_folder

    def defect(self, out_dir, metas, config, rep):
        rep.defect("injected defect")

    monkeypatch.setattr(fmt, "check_folder", defect)
    out = str(tmp_path / "out")
    for shards in ("40KB", "1GB"):  # an index, and a single file
        rc, err = export(capsys, out, "--max-shard-size", shards, "--overwrite")
        refused(rc, err, "injected defect", "nothing was published")
        assert not published(out)
    monkeypatch.setattr(fmt, "check_folder", real)
    rc, err = export(capsys, out, "--max-shard-size", "1GB", "--resume")
    assert rc == 0 and published(out), err[-2000:]
    assert "reusing" in err and "verify: 20 tensors checked, no defects" in err, err[-2000:]


def test_summary_json_into_a_missing_folder_refused_up_front(tmp_path, capsys):
    out = tmp_path / "out"
    rc, err = export(capsys, out, "--summary-json", str(tmp_path / "nope" / "s.json"))
    refused(rc, err, "--summary-json", "nope", "does not exist")
    assert not os.path.exists(out)


# ------------------------------------------------------------------------------- 4. resume binds data


def _double_in_place(src: str) -> None:
    """Same layout, new values: every float tensor doubled in place (headers, offsets and sizes unchanged)."""
    from dist_export.storage.header import file_tensor_metas

    for f in sorted(os.listdir(src)):
        if f.endswith(".safetensors"):
            with open(os.path.join(src, f), "r+b") as fh:
                for m in file_tensor_metas(src, f):
                    fh.seek(m.start)
                    t = torch.frombuffer(bytearray(fh.read(m.nbytes)), dtype=m.torch_dtype) if m.nbytes else None
                    if t is not None and t.is_floating_point():
                        fh.seek(m.start)
                        fh.write((t * 2).view(torch.uint8).numpy().tobytes())


def test_resume_after_the_source_changed_in_place_rewrites(tmp_path, capsys):
    src = copy_model(tmp_path, model="synthetic:qwen3-moe-tiny")
    out, ref = str(tmp_path / "out"), str(tmp_path / "ref")
    args = ("--max-shard-size", "40KB")
    proc = subprocess.run([sys.executable, "-m", "dist_export", "export", "--model", src, "--recipe", RECIPE,
                           "--device", "cpu", *args, "--out", out], cwd=REPO, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": REPO, "DIST_EXPORT_FAULT": "kill:0:40"}, timeout=180)
    assert proc.returncode == -9, proc.stderr[-2000:]
    kept = [f for f in os.listdir(out) if f.startswith("model-")]
    assert kept, "the killed run finished no shard"  # how many depends on the fsync thread under load
    _double_in_place(src)
    rc, err = export(capsys, out, "--resume", *args, model=src)
    assert rc == 0, err[-2000:]
    assert err.count("changed since it was written") == len(kept), err[-3000:]
    assert "reusing" not in err
    rc, err = export(capsys, ref, *args, model=src)
    assert rc == 0, err[-2000:]
    assert tree(out) == tree(ref)


def _killed_run_to_resume(tmp_path):
    """(plan, out, manifest, source) of an export killed after some shards were finished, ready to resume."""
    from dist_export.api import resolve_model
    from dist_export.output_formats import get_output_format
    from dist_export.plan import build_plan
    from dist_export.recipe import load_recipe
    from dist_export.sources.checkpoint import SourceCheckpoint
    from dist_export.storage.manifest import Manifest

    out = str(tmp_path / "out")
    proc = subprocess.run([sys.executable, "-m", "dist_export", "export", "--model", MODEL, "--recipe", RECIPE,
                           "--device", "cpu", "--max-shard-size", "40KB", "--out", out], cwd=REPO,
                          capture_output=True, text=True, timeout=180,
                          env={**os.environ, "PYTHONPATH": REPO, "DIST_EXPORT_FAULT": "kill:0:19"})
    assert proc.returncode == -9, proc.stderr[-2000:]
    with open(os.path.join(out, ".dist_export", "manifest.json")) as f:
        fingerprint = json.load(f)["fingerprint"]
    source = SourceCheckpoint(resolve_model(MODEL))
    plan = build_plan(source.tensors, load_recipe(RECIPE), get_output_format("vllm-fq"), 1, 40_000)
    return plan, out, Manifest(out, fingerprint, resume=True), source


class Ticks:
    """A stand-in for the export's Progress: counts ticks and keeps their times."""

    def __init__(self):
        self.times = [time.monotonic()]

    @property
    def n(self) -> int:
        return len(self.times) - 1

    def tick(self):
        self.times.append(time.monotonic())


def test_resume_of_an_unchanged_source_reuses_and_ticks_while_checking(tmp_path, capsys):
    """Checking reused shards is work (their files hashed, their source tensors read again): it ticks the
    monitor per shard and per item, so a rank busy checking many reused shards is never declared hung."""
    from dist_export.execute import prepare_shards, reused_shards
    from dist_export.runtime.dist import DistContext

    plan, out, manifest, source = _killed_run_to_resume(tmp_path)
    ticks = Ticks()
    reused = reused_shards(prepare_shards(DistContext(), plan, out, manifest, source, ticks))
    assert reused and set(reused) <= {s.filename for s in plan.shards}
    items = sum(len(s.items) for s in plan.shards if s.filename in reused)
    assert ticks.n >= len(plan.shards) + items, ticks.n


SLOW_HASH_S = 0.3  # per chunk hashed, injected


def test_resume_hashing_slowly_keeps_ticking(tmp_path, monkeypatch):
    """An injected slow hash (0.3 s per chunk: a large shard on a slow disk) of reused shards holding several
    tensors: the monitor is ticked after every chunk, so no gap between ticks reaches 1 s (a peer's --hang-timeout
    of 1 s would never fire). It used to tick once per shard file, after hashing all of it (measured: gaps of
    0.3 s times the shard's tensors)."""
    import hashlib as real_hashlib

    from dist_export import tensor_checksums
    from dist_export.execute import prepare_shards, reused_shards
    from dist_export.runtime.dist import DistContext

    plan, out, manifest, source = _killed_run_to_resume(tmp_path)

    class SlowSha256:
        def __init__(self):
            self._h = real_hashlib.sha256()

        def update(self, data):
            time.sleep(SLOW_HASH_S)
            self._h.update(data)

        def hexdigest(self):
            return self._h.hexdigest()

    class SlowHashlib:
        sha256 = SlowSha256

    monkeypatch.setattr(tensor_checksums, "hashlib", SlowHashlib)
    ticks = Ticks()
    reused = reused_shards(prepare_shards(DistContext(), plan, out, manifest, source, ticks))
    ticks.tick()
    widest = max(len(s.tensors) for s in plan.shards if s.filename in reused)
    assert widest * SLOW_HASH_S >= 1.2, f"test setup: the reused shards hold at most {widest} tensors"
    gaps = [b - a for a, b in zip(ticks.times, ticks.times[1:])]
    assert max(gaps) < 1.0, f"{max(gaps):.2f} s without a tick (shards of up to {widest} tensors)"

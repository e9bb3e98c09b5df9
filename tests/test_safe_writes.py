"""Symlink-safe writes (issue 13, piece 2): every file we write starts as a private temporary we create with
O_EXCL|O_NOFOLLOW, so a link planted at the old fixed temporary name (or at the final name) is never written
through; header entries of the wrong types are refused as corrupt, not crashed on."""
import json
import os
import struct

import pytest
import torch

from dist_export.storage.atomic import read_regular, remove_own_temporaries, write_atomic
from dist_export.storage.header import CorruptFileError, read_header
from dist_export.storage.shard_file import ShardWriter


def test_write_atomic_never_writes_through_planted_links(tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text("user data")
    final = tmp_path / "config.json"
    os.symlink(victim, str(final) + ".tmp")  # the old fixed temporary name
    write_atomic(str(final), b"{}")
    assert victim.read_text() == "user data"
    assert final.read_bytes() == b"{}"
    os.unlink(final)
    os.symlink(victim, final)  # a link at the final name is replaced, not followed
    write_atomic(str(final), b"[]")
    assert victim.read_text() == "user data" and not final.is_symlink() and final.read_bytes() == b"[]"
    assert oct(final.stat().st_mode & 0o777) == "0o644"


def test_shard_writer_ignores_planted_tmp_link(tmp_path):
    victim = tmp_path / "victim.bin"
    victim.write_bytes(b"x" * 10)
    final = tmp_path / "model.safetensors"
    os.symlink(victim, str(final) + ".tmp")
    t = torch.arange(4, dtype=torch.float32)
    w = ShardWriter(str(final), [("w", "F32", (4,))], {})
    w.write("w", t)
    w.finish()
    assert victim.read_bytes() == b"x" * 10
    _, header = read_header(str(final))
    assert header["w"]["shape"] == [4]


def test_abort_and_cleanup_remove_only_our_temporaries(tmp_path):
    other = tmp_path / ".someone-else.tmp"
    other.write_text("not ours")
    final = tmp_path / "m.safetensors"
    w = ShardWriter(str(final), [("w", "F32", (4,))], {})
    ours = w.tmp_path
    assert os.path.exists(ours) and ours != str(final) + ".tmp"
    remove_own_temporaries()
    assert not os.path.exists(ours) and other.exists()


def test_read_regular_refuses_a_link(tmp_path):
    real = tmp_path / "a.json"
    real.write_text("{}")
    link = tmp_path / "b.json"
    os.symlink(real, link)
    assert read_regular(str(real), "config") == b"{}"
    with pytest.raises(OSError):
        read_regular(str(link), "config")


def _raw(tmp_path, header: dict, data: bytes = b"") -> str:
    raw = json.dumps(header).encode()
    p = tmp_path / "bad.safetensors"
    p.write_bytes(struct.pack("<Q", len(raw)) + raw + data)
    return str(p)


@pytest.mark.parametrize("entry", [
    {"dtype": "F32", "shape": "4", "data_offsets": [0, 16]},
    {"dtype": "F32", "shape": [4], "data_offsets": [0, "16"]},
    {"dtype": "F99", "shape": [4], "data_offsets": [0, 16]},
    {"dtype": "F32", "shape": [True], "data_offsets": [0, 4]},
    "not-an-object",
])
def test_malformed_header_entries_are_corrupt_file_errors(tmp_path, entry):
    with pytest.raises(CorruptFileError, match="bad.safetensors"):
        read_header(_raw(tmp_path, {"w": entry}, b"\0" * 16))


def test_metadata_not_an_object_is_refused(tmp_path):
    with pytest.raises(CorruptFileError, match="__metadata__"):
        read_header(_raw(tmp_path, {"__metadata__": [1]}))


def test_a_killed_runs_temporary_is_removed_by_the_next_prepare_a_users_is_not(tmp_path):
    from dist_export.storage.outdir import prepare_output_dir

    out = tmp_path / "out"
    (out / ".dist_export" / "tmp").mkdir(parents=True)
    left = out / ".dist_export" / "tmp" / ".model.safetensors.0123456789ab.tmp"  # what a SIGKILLed writer leaves
    left.write_bytes(b"partial")
    users = out / ".notes.0123456789ab.tmp"  # the same name pattern outside our private folder is the user's
    users.write_bytes(b"mine")
    with pytest.raises(ValueError, match="notes"):
        prepare_output_dir(str(out), overwrite=False, resume=True)
    lock = prepare_output_dir(str(out), overwrite=False, resume=True, allow_foreign=True)
    lock.release()
    assert not left.exists() and users.read_bytes() == b"mine"

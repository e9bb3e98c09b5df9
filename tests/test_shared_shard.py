"""Shard files written by several processes at planned offsets (issue 17): the bytes equal a single writer's (the
reference is the safetensors layout assembled here by hand: 8-byte length, JSON header, tensors in order), only the
last writer renames, an incomplete shard keeps its temporary name, and a replaced or linked temporary is refused."""
from __future__ import annotations

import hashlib
import multiprocessing as mp
import os

import pytest
import torch
from safetensors.torch import load_file

from dist_export.storage import shared_shard as shared_mod
from dist_export.storage.header import DTYPE_TO_ST, encode_header
from dist_export.storage.manifest import Manifest
from dist_export.storage.shard_file import ShardWriter
from dist_export.storage.shared_shard import PartWriter, check_shard, complete_part, create_shared

FP = {"layout": "test"}


def _tensors():
    g = torch.Generator().manual_seed(5)
    return {
        "a.weight": torch.randn(300, 257, generator=g).to(torch.bfloat16),
        "b.empty": torch.empty(0, 4),
        "c.scale": torch.rand(7, generator=g),
        "d.codes": torch.randint(0, 255, (1000, 33), dtype=torch.uint8, generator=g),
        "e.weight": torch.randn(64, 65, generator=g),
        "f.bias": torch.randn(3, generator=g).half(),
    }


def _specs(tensors):
    return [(n, DTYPE_TO_ST[t.dtype], tuple(t.shape)) for n, t in tensors.items()]


def _reference_bytes(tensors) -> bytes:
    header, _ = encode_header(_specs(tensors), {"format": "pt"})
    return header + b"".join(t.contiguous().view(-1).view(torch.uint8).numpy().tobytes() for t in tensors.values())


def _write_part(rank, handle, out_dir, mine, barrier, results, piece):
    """One spawned writer: wait for the others, write its tensors, fsync, record, maybe complete."""
    shared_mod.PIECE = piece
    tensors = _tensors()
    manifest = Manifest(out_dir, FP, resume=False)
    barrier.wait()
    w = PartWriter(handle, "model.safetensors", _specs(tensors), mine)
    for name in mine:
        w.write_async(name, tensors[name])
    sums = w.finish()
    info = complete_part(manifest, rank, handle, "model.safetensors", _specs(tensors), sums,
                         os.path.join(out_dir, "model.safetensors.staged"))
    results[rank] = (sums, info)


def test_three_processes_write_one_file_like_one_writer(tmp_path):
    owners = [2, 2, 0, 1, 0, 2]  # interleaved: each process writes ranges between the others'
    tensors = _tensors()
    out = str(tmp_path)
    manifest = Manifest(out, FP, resume=False)
    manifest.check_and_write()
    handle = create_shared(os.path.join(out, "model.safetensors"), _specs(tensors))
    ctx = mp.get_context("spawn")
    with ctx.Manager() as mgr:
        results, barrier = mgr.dict(), mgr.Barrier(3)
        names = list(tensors)
        procs = [ctx.Process(target=_write_part, args=(r, handle, out, [n for n, o in zip(names, owners) if o == r],
                                                       barrier, results, 1024)) for r in range(3)]
        for p in procs:
            p.start()
        for p in procs:
            p.join(120)
        assert all(p.exitcode == 0 for p in procs), [p.exitcode for p in procs]
        results = dict(results)
    staged = os.path.join(out, "model.safetensors.staged")
    data = open(staged, "rb").read()
    assert data == _reference_bytes(tensors)
    assert not os.path.exists(handle.tmp_path)
    loaded = load_file(staged)
    assert all(torch.equal(loaded[n], t) for n, t in tensors.items())
    # one rank completed the shard (or two at once, with the same record); every tensor has one checksum
    infos = [info for _, info in results.values() if info is not None]
    assert infos and all(i == infos[0] for i in infos)
    merged = {n: s for sums, _ in results.values() for n, s in sums.items()}
    assert merged == {n: hashlib.sha256(t.contiguous().view(-1).view(torch.uint8).numpy().tobytes()).hexdigest()
                      for n, t in tensors.items()}
    assert infos[0]["tensors"] == merged and check_shard(staged, infos[0]) is None
    # the same bytes as the single-writer streaming path
    single = tmp_path / "single" / "model.safetensors"
    single.parent.mkdir()
    w = ShardWriter(str(single), _specs(tensors), {"format": "pt"})
    for n, t in tensors.items():
        w.write(n, t)
    w.finish()
    assert single.read_bytes() == data


def _shard(tmp_path, tensors):
    out = str(tmp_path)
    manifest = Manifest(out, FP, resume=False)
    manifest.check_and_write()
    return out, manifest, create_shared(os.path.join(out, "model.safetensors"), _specs(tensors))


def test_incomplete_shard_keeps_its_temporary_name(tmp_path):
    tensors = _tensors()
    out, manifest, handle = _shard(tmp_path, tensors)
    names = list(tensors)
    w = PartWriter(handle, "model.safetensors", _specs(tensors), names[:4])
    for n in names[:4]:
        w.write(n, tensors[n])
    staged = os.path.join(out, "model.safetensors.staged")
    assert complete_part(manifest, 0, handle, "model.safetensors", _specs(tensors), w.finish(), staged) is None
    assert not os.path.exists(staged) and os.path.isfile(handle.tmp_path)
    # a stale part record of an earlier temporary does not count towards this one
    manifest.record_part("model.safetensors", 7, "0:0:old", {n: "0" * 64 for n in names[4:]})
    assert set(manifest.parts("model.safetensors", handle.ident)) == set(names[:4])
    w = PartWriter(handle, "model.safetensors", _specs(tensors), names[4:])
    for n in names[4:]:
        w.write(n, tensors[n])
    info = complete_part(manifest, 1, handle, "model.safetensors", _specs(tensors), w.finish(), staged)
    assert info is not None and open(staged, "rb").read() == _reference_bytes(tensors)


def test_replaced_or_linked_temporary_is_refused(tmp_path):
    tensors = _tensors()
    _, _, handle = _shard(tmp_path, tensors)
    victim = tmp_path / "victim.bin"
    victim.write_bytes(b"\0" * handle.size)
    os.unlink(handle.tmp_path)
    os.symlink(victim, handle.tmp_path)
    with pytest.raises(RuntimeError, match="cannot be opened"):
        PartWriter(handle, "model.safetensors", _specs(tensors), ["a.weight"])
    os.unlink(handle.tmp_path)
    os.link(victim, handle.tmp_path)  # a regular file of the right size, but not the one created
    with pytest.raises(RuntimeError, match="not the file its creator made"):
        PartWriter(handle, "model.safetensors", _specs(tensors), ["a.weight"])
    assert victim.read_bytes() == b"\0" * handle.size


def test_out_of_plan_order_and_foreign_tensors_refused(tmp_path):
    tensors = _tensors()
    _, _, handle = _shard(tmp_path, tensors)
    with pytest.raises(RuntimeError, match="not in its planned layout"):
        PartWriter(handle, "model.safetensors", _specs(tensors), ["zzz"])
    w = PartWriter(handle, "model.safetensors", _specs(tensors), ["c.scale", "e.weight"])
    with pytest.raises(RuntimeError, match="expected"):
        w.write("e.weight", tensors["e.weight"])
    w.abort()
    assert os.path.isfile(handle.tmp_path)  # abort never removes a shared temporary


def test_check_shard_names_the_changed_tensor(tmp_path):
    tensors = _tensors()
    out, manifest, handle = _shard(tmp_path, tensors)
    w = PartWriter(handle, "model.safetensors", _specs(tensors), list(tensors))
    for n, t in tensors.items():
        w.write(n, t)
    staged = os.path.join(out, "s.safetensors")
    info = complete_part(manifest, 0, handle, "model.safetensors", _specs(tensors), w.finish(), staged)
    start, _ = shared_mod.layout(_specs(tensors))[1]["e.weight"]
    with open(staged, "r+b") as f:
        f.seek(start + 3)
        b = f.read(1)
        f.seek(start + 3)
        f.write(bytes([b[0] ^ 1]))
    assert "e.weight" in check_shard(staged, info)

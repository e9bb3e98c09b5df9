"""The streaming shard writer: positioned writes from a pool, in pieces, give exactly the header followed by
every tensor's bytes in order (and a file the safetensors library loads); the checksum is the file's sha256; buffers are handed back only after their bytes
are written; a failed write surfaces as an error and leaves no file."""
from __future__ import annotations

import hashlib
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from safetensors.torch import load_file

from dist_export.storage import shard_file as writer_mod
from dist_export.storage.header import DTYPE_TO_ST, encode_header
from dist_export.storage.shard_file import ShardWriter


def _tensors():
    g = torch.Generator().manual_seed(3)
    return {
        "a.weight": torch.randn(300, 257, generator=g).to(torch.bfloat16),
        "b.empty": torch.empty(0, 4),
        "c.scale": torch.rand(7, generator=g),
        "d.codes": torch.randint(0, 255, (1000, 33), dtype=torch.uint8, generator=g),
    }


def _specs(tensors):
    return [(n, DTYPE_TO_ST[t.dtype], tuple(t.shape)) for n, t in tensors.items()]


@pytest.mark.parametrize("threads", [1, 3])
def test_pooled_pieces_equal_safetensors_bytes(threads, tmp_path, monkeypatch):
    monkeypatch.setattr(writer_mod, "PIECE", 4096)  # many pieces per tensor, written out of order by the pool
    tensors = _tensors()
    header, _ = encode_header(_specs(tensors), {"format": "pt"})
    expected = header + b"".join(t.contiguous().view(-1).view(torch.uint8).numpy().tobytes() for t in tensors.values())
    out = tmp_path / "ours.safetensors"
    released = []
    with ThreadPoolExecutor(threads) as pool:
        w = ShardWriter(str(out), _specs(tensors), {"format": "pt"}, pool=pool, max_in_flight=8192)
        for name, t in tensors.items():
            w.write_async(name, t, done=lambda n=name: released.append(n))
        digest = w.finish()
    data = out.read_bytes()
    assert data == expected
    assert digest == hashlib.sha256(data).hexdigest()
    assert sorted(released) == sorted(tensors)
    assert all(torch.equal(load_file(str(out))[n], t) for n, t in tensors.items())
    assert not (tmp_path / "ours.safetensors.tmp").exists()


def test_done_only_after_bytes_are_written(tmp_path, monkeypatch):
    """The ring buffer of a tensor may be refilled once `done` runs: by then its bytes must be in the file."""
    monkeypatch.setattr(writer_mod, "PIECE", 1024)
    gate = threading.Event()
    real = writer_mod.write_piece

    def slow_piece(fd, data, offset):
        gate.wait(5)
        real(fd, data, offset)

    monkeypatch.setattr(writer_mod, "write_piece", slow_piece)
    t = torch.arange(4096, dtype=torch.int32)
    done = threading.Event()
    with ThreadPoolExecutor(2) as pool:
        w = ShardWriter(str(tmp_path / "x.safetensors"), [("t", "I32", (4096,))], {}, pool=pool)
        w.write_async("t", t, done=done.set)
        assert not done.wait(0.3), "done ran before the pieces were written"
        gate.set()
        assert done.wait(5)
        w.finish()
    assert torch.equal(load_file(str(tmp_path / "x.safetensors"))["t"], t)


def test_failed_piece_raises_and_leaves_no_file(tmp_path, monkeypatch):
    def broken(fd, data, offset):
        raise OSError(28, "No space left on device")

    w = ShardWriter(str(tmp_path / "x.safetensors"), [("t", "F32", (10,))], {})
    monkeypatch.setattr(writer_mod, "write_piece", broken)
    w.write_async("t", torch.zeros(10))
    with pytest.raises(OSError, match="No space left"):
        w.finish()
    assert list(tmp_path.iterdir()) == []


def test_wrong_tensor_order_refused(tmp_path):
    w = ShardWriter(str(tmp_path / "x.safetensors"), [("a", "F32", (2,)), ("b", "F32", (2,))], {})
    with pytest.raises(RuntimeError, match="expected"):
        w.write("b", torch.zeros(2))
    w.abort()
    assert list(tmp_path.iterdir()) == []

"""Resume manifest: binds every finished shard to the exact inputs that produced it.

`<out>/.dist_export/manifest.json` holds the run's fingerprint (source headers and sizes, recipe, calibration,
format, layout, tool version); `<out>/.dist_export/shards/<file>.json` records each finished shard's sha256 and
size. `--resume` reuses a shard only if the fingerprint matches and the file's checksum still matches; the
layout does not depend on the world size, so a resumed run may use a different number of ranks.
"""
from __future__ import annotations

import hashlib
import json
import os

from .. import __version__
from ..layout import MANIFEST_DIR
from .atomic import write_atomic


def file_sha256(path: str, chunk: int = 16 * 1024 * 1024) -> str:
    h = hashlib.sha256()
    with open(path, "rb", buffering=0) as f:
        while True:
            block = f.read(chunk)
            if not block:
                return h.hexdigest()
            h.update(block)


def source_fingerprint(source) -> str:
    """Every stored source tensor's name, file, dtype, shape and byte range, plus file sizes (no data read);
    a quantized source's codes and scales are stored tensors too (`source.stored`)."""
    h = hashlib.sha256()
    stored = getattr(source, "stored", None) or source.tensors
    for name in sorted(stored):
        m = stored[name]
        h.update(f"{name}|{m.file}|{m.dtype}|{m.shape}|{m.start}|{m.end}\n".encode())
    for f in getattr(source, "files", []):
        path = os.path.join(source.folder, f)
        h.update(f"{f}:{os.path.getsize(path)}\n".encode())
    return h.hexdigest()


def run_fingerprint(source, recipe, calib_sha: str | None, fmt: str, layout_digest: str) -> dict:
    return {
        "source": source_fingerprint(source),
        "recipe": recipe.fingerprint,
        "calibration": calib_sha or "none",
        "format": fmt,
        "layout": layout_digest,
        "dist_export": __version__,
    }


def _atomic_json(path: str, data: dict) -> None:
    write_atomic(path, json.dumps(data, indent=1, sort_keys=True).encode())


class Manifest:
    def __init__(self, out_dir: str, fingerprint: dict, resume: bool):
        self.dir = os.path.join(out_dir, MANIFEST_DIR)
        self.fingerprint = fingerprint
        self.resume = resume

    @property
    def path(self) -> str:
        return os.path.join(self.dir, "manifest.json")

    def check_and_write(self) -> None:
        """Rank 0, before work: refuse a manifest from other inputs under --resume, then record ours."""
        os.makedirs(os.path.join(self.dir, "shards"), exist_ok=True)
        if self.resume and os.path.isfile(self.path):
            with open(self.path) as f:
                old = json.load(f).get("fingerprint", {})
            differ = sorted(k for k in set(old) | set(self.fingerprint) if old.get(k) != self.fingerprint.get(k))
            if differ:
                raise ValueError(
                    f"--resume: the unfinished export in {os.path.dirname(self.dir)} was made from other inputs "
                    f"(differs in: {', '.join(differ)}); rerun without --resume and with --overwrite"
                )
        _atomic_json(self.path, {"fingerprint": self.fingerprint})

    def record_shard(self, filename: str, info: dict) -> None:
        _atomic_json(os.path.join(self.dir, "shards", filename + ".json"), {"fingerprint": self.fingerprint, **info})

    def reusable(self, filename: str, path: str) -> dict | None:
        """The shard's record if --resume and the file on disk still matches it, else None."""
        if not self.resume:
            return None
        rec_path = os.path.join(self.dir, "shards", filename + ".json")
        if not (os.path.isfile(rec_path) and os.path.isfile(path)):
            return None
        with open(rec_path) as f:
            rec = json.load(f)
        if rec.get("fingerprint") != self.fingerprint or os.path.getsize(path) != rec.get("size"):
            return None
        if file_sha256(path) != rec.get("sha256"):
            return None
        return {"sha256": rec["sha256"], "size": rec["size"]}

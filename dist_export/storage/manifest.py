"""Resume manifest: binds every finished shard to the exact inputs that produced it.

`<out>/.dist_export/manifest.json` holds the run's fingerprint (source headers and sizes, recipe, calibration,
format, layout, tool version); `<out>/.dist_export/shards/<file>.json` records each finished shard's size and the
sha256 of its header and of every tensor (`storage/shared_shard.py`); `<out>/.dist_export/shards/<file>.parts/
<rank>.json` records the tensors one writer of a shard has fsynced (several ranks of a node write one shard).
`--resume` reuses a shard only if the fingerprint matches and the file's bytes still match its record; the
layout does not depend on the world size, so a resumed run may use a different number of ranks.
"""
from __future__ import annotations

import hashlib
import json
import os
import re

from ..version import __version__
from ..layout import MANIFEST_DIR, export_tmp_dir
from ..tensor_checksums import SOURCE_CRC_KEY
from .atomic import read_regular, write_atomic


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


def run_fingerprint(source, recipe, calib_sha: str | None, format_name: str, layout_digest: str,
                    allow_nonfinite: bool = False) -> dict:
    """What a resume must match; recorded in dist_export.json too. `allow_nonfinite` appears only when set (the
    fingerprint of every other export is unchanged), so a resume never mixes shards checked and unchecked."""
    return {
        "source": source_fingerprint(source),
        "recipe": recipe.fingerprint,
        "calibration": calib_sha or "none",
        "format": format_name,
        "layout": layout_digest,
        "dist_export": __version__,
        **({"allow_nonfinite": True} if allow_nonfinite else {}),
    }

_PART_NAME = re.compile(r"^\d+\.json$")


def _atomic_json(path: str, data: dict, tmp: str) -> None:
    write_atomic(path, json.dumps(data, indent=1, sort_keys=True).encode(), tmp)


class Manifest:
    def __init__(self, out_dir: str, fingerprint: dict, resume: bool):
        self.dir = os.path.join(out_dir, MANIFEST_DIR)
        self.fingerprint = fingerprint
        self.resume = resume

    @property
    def tmp(self) -> str:
        return export_tmp_dir(os.path.dirname(self.dir))

    @property
    def path(self) -> str:
        return os.path.join(self.dir, "manifest.json")

    def check_and_write(self) -> None:
        """Rank 0, before work: refuse a manifest from other inputs under --resume, then record ours."""
        os.makedirs(os.path.join(self.dir, "shards"), exist_ok=True)
        os.makedirs(self.tmp, exist_ok=True)
        if self.resume and os.path.isfile(self.path):
            old = json.loads(read_regular(self.path, "resume manifest")).get("fingerprint", {})
            differ = sorted(k for k in set(old) | set(self.fingerprint) if old.get(k) != self.fingerprint.get(k))
            if differ:
                raise ValueError(
                    f"--resume: the unfinished export in {os.path.dirname(self.dir)} was made from other inputs "
                    f"(differs in: {', '.join(differ)}); rerun without --resume and with --overwrite"
                )
        _atomic_json(self.path, {"fingerprint": self.fingerprint}, self.tmp)

    def record_shard(self, filename: str, info: dict) -> None:
        _atomic_json(os.path.join(self.dir, "shards", filename + ".json"), {"fingerprint": self.fingerprint, **info},
                     self.tmp)

    def _parts_dir(self, filename: str) -> str:
        return os.path.join(self.dir, "shards", filename + ".parts")

    def clear_parts(self, filename: str) -> None:
        """The shard's creator, before any writer opens its new temporary: drop part records of earlier files
        (only the `<rank>.json` names we write; a link is removed, never followed)."""
        folder = self._parts_dir(filename)
        if not os.path.isdir(folder) or os.path.islink(folder):
            return
        for entry in os.scandir(folder):
            if _PART_NAME.match(entry.name):
                try:
                    os.unlink(entry.path)
                except FileNotFoundError:
                    pass

    def record_part(self, filename: str, rank: int, ident: str, sums: dict[str, str],
                    source_crcs: dict[str, str] | None = None) -> None:
        """One writer's fsynced tensors of a shard file (`ident`: the temporary they were written into) and the
        crc32 of the source bytes of its items."""
        folder = self._parts_dir(filename)
        os.makedirs(folder, exist_ok=True)
        _atomic_json(os.path.join(folder, f"{rank}.json"), {"fingerprint": self.fingerprint, "file": ident,
                                                            "tensors": sums, SOURCE_CRC_KEY: source_crcs or {}},
                     self.tmp)

    def parts(self, filename: str, ident: str, with_sources: bool = False):
        """{tensor: sha256} over every part record of the shard's temporary `ident` (a tensor recorded by two
        writers is an error: each tensor has one); with `with_sources` also {item: source crc32}."""
        folder = self._parts_dir(filename)
        merged: dict[str, str] = {}
        crcs: dict[str, str] = {}
        for entry in sorted(os.scandir(folder), key=lambda e: e.name):
            if not _PART_NAME.match(entry.name) or entry.is_symlink():
                continue
            rec = json.loads(read_regular(entry.path, "part record"))
            if rec.get("file") != ident or rec.get("fingerprint") != self.fingerprint:
                continue
            for name, digest in rec.get("tensors", {}).items():
                if name in merged:
                    raise RuntimeError(f"shard {filename}: tensor {name!r} was recorded by two writers; each "
                                       f"tensor has one")
                merged[name] = digest
            crcs.update(rec.get(SOURCE_CRC_KEY) or {})
        return (merged, crcs) if with_sources else merged

    def reusable(self, filename: str, path: str, tick=None) -> dict | None:
        """The shard's record if --resume and the file on disk still matches it, else None (`tick()` per chunk
        of the file hashed)."""
        if not self.resume:
            return None
        rec_path = os.path.join(self.dir, "shards", filename + ".json")
        if not (os.path.isfile(rec_path) and os.path.isfile(path)):
            return None
        rec = json.loads(read_regular(rec_path, "shard record"))
        if rec.get("fingerprint") != self.fingerprint or "tensors" not in rec:
            return None
        from .shared_shard import check_shard

        if check_shard(path, rec, tick=tick) is not None:
            return None
        return {k: v for k, v in rec.items() if k != "fingerprint"}

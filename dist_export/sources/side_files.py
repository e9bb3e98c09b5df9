"""The side files of a checkpoint folder (commit stage, rank 0): every file that is not a weight, carried into
the export unchanged: tokenizer files of any kind (`tokenizer.json`, `*.tiktoken`, `tokenizer.model`, ...),
chat templates, generation and processor configs, README/LICENSE, and the Python code that `auto_map` entries
of `config.json` or `tokenizer_config.json` name (copied as bytes, never imported).

Not carried: weights (safetensors and every other weight format), weight indexes, `config.json` (the output
format rewrites it), files describing the source's own quantization (`hf_quant_config.json`, ...), files of an
earlier dist_export run, hidden files and folders (`.git`, `.cache`). Every carried file must resolve to a
regular file inside `root` (the folder, or a Hub snapshot's repository folder): a link out of it is refused,
so a planted link can never copy a file from elsewhere into the export.
"""
from __future__ import annotations

import fnmatch
import json
import logging
import os
import stat

from ..layout import CONFIG_NAME, HF_QUANT_CONFIG_NAME, INDEX_NAME, LOCK_NAME, RECORD_NAME, STAGED_SUFFIX, TMP_SUFFIX
from .hub import FOREIGN_WEIGHT_PATTERNS

log = logging.getLogger(__name__)

# With the names output formats add (`format_files`, passed by the commit).
NOT_CARRIED = (CONFIG_NAME, INDEX_NAME, HF_QUANT_CONFIG_NAME, RECORD_NAME, LOCK_NAME, "quantization_config.json",
               "recipe.yaml", "*.safetensors", "*.index.json", "*" + TMP_SUFFIX, "*" + STAGED_SUFFIX,
               *FOREIGN_WEIGHT_PATTERNS)
AUTO_MAP_CONFIGS = (CONFIG_NAME, "tokenizer_config.json", "processor_config.json", "preprocessor_config.json")


def is_carried(relpath: str, format_files: tuple[str, ...] = ()) -> bool:
    name = os.path.basename(relpath)
    return not any(fnmatch.fnmatchcase(name, p) for p in NOT_CARRIED + tuple(format_files))


def list_side_files(folder: str, root: str | None = None, format_files: tuple[str, ...] = ()) -> list[str]:
    """Sorted relative paths (with `/`) of every side file under `folder`; hidden entries are skipped, and so
    are `format_files` (the names output formats add: an earlier export's state file is not the source's)."""
    out = []
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith(".") and not os.path.islink(os.path.join(dirpath, d)))
        for name in filenames:
            if name.startswith("."):
                continue
            rel = os.path.relpath(os.path.join(dirpath, name), folder).replace(os.sep, "/")
            if is_carried(rel, format_files):
                out.append(rel)
    for rel in out:
        side_file_path(folder, rel, root)
    return sorted(out)


def side_file_path(folder: str, rel: str, root: str | None = None) -> str:
    """The real path of side file `rel`: a regular file inside `root` (default: `folder`), else ValueError."""
    root_real = os.path.realpath(root or folder)
    path = os.path.join(folder, *rel.split("/"))
    real = os.path.realpath(path)
    if os.path.commonpath([root_real, real]) != root_real:
        raise ValueError(f"side file {rel} of {folder} links outside the model folder (to {real}); refusing to "
                         f"copy it: replace the link with the file itself or remove it")
    st = os.stat(real)
    if not stat.S_ISREG(st.st_mode):
        raise ValueError(f"side file {rel} of {folder} is not a regular file; remove it from the model folder")
    return real


def auto_map_modules(folder: str) -> dict[str, list[str]]:
    """{config file: [module file names]} of the local code that `auto_map` entries name. References to code in
    another repository (`org/repo--module.Class`) name no local file and are left out."""
    found: dict[str, list[str]] = {}
    for config_name in AUTO_MAP_CONFIGS:
        path = os.path.join(folder, config_name)
        if not os.path.isfile(path):
            continue
        try:
            with open(path) as f:
                data = json.load(f)
        except (OSError, json.JSONDecodeError, UnicodeDecodeError):
            continue
        auto_map = data.get("auto_map") if isinstance(data, dict) else None
        modules = sorted({m for ref in _refs(auto_map) if (m := _module_file(ref))})
        if modules:
            found[config_name] = modules
    return found


def _refs(auto_map) -> list[str]:
    if not isinstance(auto_map, dict):
        return []
    out = []
    for value in auto_map.values():
        for ref in value if isinstance(value, (list, tuple)) else [value]:
            if isinstance(ref, str):
                out.append(ref)
    return out


def _module_file(ref: str) -> str | None:
    if "--" in ref:  # code of another repository: nothing local to carry
        return None
    module = ref.rsplit(".", 1)[0] if "." in ref else None
    return module.replace(".", "/") + ".py" if module else None


def missing_auto_map_code(folder: str) -> dict[str, list[str]]:
    """{config file: [module files named by its auto_map but absent from the folder]}."""
    return {cfg: miss for cfg, mods in auto_map_modules(folder).items()
            if (miss := [m for m in mods if not os.path.isfile(os.path.join(folder, m))])}

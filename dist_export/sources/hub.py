"""Where a model comes from (plan stage, every rank, before anything is read): a local checkpoint folder, a
Hugging Face Hub id resolved through huggingface_hub's cache, a `synthetic:<arch>-<preset>` model, or, when no
model is named at all, the built-in demo, announced as such.

A Hub id is looked up in the local cache first (no network when the snapshot is there); only when it is missing
and offline mode (`HF_HUB_OFFLINE=1`) is off are the safetensors weights and the side files downloaded, never
weights in other formats (`*.bin`, `*.pth`, ...). Files of a cached snapshot are links into the repository's
`blobs/` folder, so reads of such a source are confined to the repository's cache folder (`ResolvedModel.root`),
not to the snapshot folder.
"""
from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass

from ..layout import INDEX_NAME, SINGLE_NAME

log = logging.getLogger(__name__)

DEMO_MODEL = "synthetic:llama-tiny"
# Weights in formats we never read: not downloaded, not carried as side files.
FOREIGN_WEIGHT_PATTERNS = ("*.bin", "*.pt", "*.pth", "*.ckpt", "*.h5", "*.msgpack", "*.gguf", "*.onnx",
                           "*.onnx_data", "*.tflite", "*.ot", "*.npz", "*.mlmodel", "*.pkl", "*.nemo")
_REPO_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")


@dataclass(frozen=True)
class ResolvedModel:
    """A model reference turned into a local folder.

    path: the checkpoint folder (config.json, safetensors, side files).
    root: every file read for this model must resolve inside this folder (the snapshot's repository folder in
          the Hub cache, else `path` itself).
    kind: "folder", "hub", "synthetic" or "demo".
    display: what the user passed (for messages), `org/name@revision` for the Hub.
    """

    path: str
    root: str
    kind: str
    display: str


def looks_like_hub_id(ref: str) -> bool:
    """`org/name` that is not a path someone meant (no leading `.`, `/`, `~`, no second `/`)."""
    return bool(_REPO_ID.match(ref)) and not ref.startswith((".", "~")) and ".." not in ref


def resolve_model(ref: str | None, revision: str | None = None, announce: bool = True) -> ResolvedModel:
    """Turn what the user passed as `--model` into a local folder (see the module docstring)."""
    if ref is None or ref == "":
        if revision:
            raise ValueError("--revision needs a Hub id: pass --model org/name --revision REV")
        if announce and _is_rank0():
            log.warning("no --model given: using the built-in DEMO model %s (random weights, generated locally); "
                        "pass --model FOLDER, --model org/name (Hugging Face Hub) or --model synthetic:ARCH-PRESET "
                        "for a real export", DEMO_MODEL)
        return _synthetic(DEMO_MODEL, "demo")
    if ref.startswith("synthetic:"):
        if revision:
            raise ValueError(f"--revision applies to Hub ids only, not to {ref}")
        return _synthetic(ref, "synthetic")
    if os.path.isdir(ref):
        if revision:
            raise ValueError(f"--revision applies to Hub ids only; {ref} is a local folder (drop --revision)")
        return ResolvedModel(ref, ref, "folder", ref)
    if looks_like_hub_id(ref):
        return resolve_hub_id(ref, revision)
    raise FileNotFoundError(f"model folder {ref} does not exist and is neither an existing folder nor a Hugging Face Hub id "
                            f"(org/name): pass a local Hugging Face checkpoint folder, an org/name Hub id or "
                            f"synthetic:<arch>-<preset>")


def _synthetic(ref: str, kind: str) -> ResolvedModel:
    from .synthetic import ensure_synthetic

    path = ensure_synthetic(ref)
    return ResolvedModel(path, path, kind, ref)


def _is_rank0() -> bool:
    return os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0")) == "0"


def hub_offline() -> bool:
    from huggingface_hub import constants

    check = getattr(constants, "is_offline_mode", None)
    return bool(check() if callable(check) else constants.HF_HUB_OFFLINE)


def resolve_hub_id(repo_id: str, revision: str | None = None) -> ResolvedModel:
    """The cached snapshot of `repo_id` at `revision` (default `main`); downloaded (safetensors and side files
    only) when it is not cached and offline mode is off."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (GatedRepoError, LocalEntryNotFoundError, RepositoryNotFoundError,
                                        RevisionNotFoundError)

    shown = f"{repo_id}@{revision}" if revision else repo_id
    kwargs = dict(repo_id=repo_id, revision=revision, ignore_patterns=list(FOREIGN_WEIGHT_PATTERNS))
    try:
        try:
            path = snapshot_download(local_files_only=True, **kwargs)
            cached = _has_weights(path)
        except LocalEntryNotFoundError:
            cached = False
        if not cached:
            if hub_offline():
                raise FileNotFoundError(
                    f"model {shown} is not in the Hugging Face cache ({_cache_dir()}) and offline mode is on "
                    f"(HF_HUB_OFFLINE=1): download it first (`hf download {repo_id}`) or unset HF_HUB_OFFLINE")
            log.info("downloading %s (safetensors and side files) into %s", shown, _cache_dir())
            path = snapshot_download(**kwargs)
    except RevisionNotFoundError:
        raise ValueError(f"revision {revision!r} of {repo_id} does not exist on the Hub: pass an existing branch, "
                         f"tag or commit with --revision") from None
    except GatedRepoError:
        raise ValueError(f"{repo_id} is gated: accept its license on the Hub and log in (`hf auth login`) or set "
                         f"HF_TOKEN") from None
    except RepositoryNotFoundError:
        raise FileNotFoundError(f"model {repo_id} is neither a local folder nor a Hub repository you can access: "
                                f"check the id, or log in (`hf auth login`) for a private one") from None
    except LocalEntryNotFoundError as e:
        raise FileNotFoundError(f"model {shown} is not cached and the Hub cannot be reached "
                                f"({str(e).splitlines()[0][:120]}): check the network or download it first") from None
    if not _has_weights(path):
        raise FileNotFoundError(f"{shown} has no safetensors weights ({SINGLE_NAME} or "
                                f"{INDEX_NAME}); dist_export reads safetensors only: pick a "
                                f"repository or revision that has them")
    # snapshots/<commit> -> the repository folder that also holds blobs/
    root = os.path.dirname(os.path.dirname(os.path.abspath(path)))
    return ResolvedModel(path, root, "hub", shown)


def source_root(folder: str) -> str:
    """The folder every file of `folder` must resolve into: a Hub cache snapshot (`models--org--name/snapshots/
    <commit>`, whose files link into `blobs/`) is confined to its repository folder, any other folder to itself."""
    real = os.path.abspath(folder)
    parent = os.path.dirname(real)
    repo = os.path.dirname(parent)
    if os.path.basename(parent) == "snapshots" and os.path.basename(repo).startswith("models--") \
            and os.path.isdir(os.path.join(repo, "blobs")):
        return repo
    return folder


def _has_weights(path: str) -> bool:
    return any(os.path.isfile(os.path.join(path, n)) for n in (SINGLE_NAME, INDEX_NAME))


def _cache_dir() -> str:
    from huggingface_hub import constants

    return constants.HF_HUB_CACHE

"""dist_export: export quantized Hugging Face LLMs with one process per GPU.

Stages (one module each): `plan` (every rank, pure), `execute` (every rank, its own shards),
`commit` (rank 0, last). `api.export` runs them; `cli` is the command line.

The face is lazy (PEP 562): `import dist_export` and the launcher parent (`dist_export.cli`,
`dist_export.runtime.launch`) never import torch or transformers; `dist_export.export` and
`dist_export.save_quantizer_state` load their modules on first use.
"""
from .version import __version__

__all__ = ["export", "save_quantizer_state", "__version__"]


def __getattr__(name: str):
    if name == "export":
        from .api import export
        return export
    if name == "save_quantizer_state":
        from .sources.memory import save_quantizer_state
        return save_quantizer_state
    raise AttributeError(f"module 'dist_export' has no attribute {name!r}")

"""dist_export: export quantized Hugging Face LLMs with one process per GPU.

Stages (one module each): `plan` (every rank, pure), `execute` (every rank, its own shards),
`commit` (rank 0, last). `api.export` runs them; `cli` is the command line.
"""
from .api import export
from .sources.memory import save_quantizer_state
from .version import __version__

__all__ = ["export", "save_quantizer_state", "__version__"]

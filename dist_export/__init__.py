"""dist_export: export quantized Hugging Face LLMs with one process per GPU.

Stages (one module each): `plan` (every rank, pure), `execute` (every rank, its own shards),
`commit` (rank 0, last). `api.export` runs them; `cli` is the command line.
"""
__version__ = "0.1.0"


def export(*args, **kwargs):
    """See `dist_export.api.export`."""
    from .api import export as _export

    return _export(*args, **kwargs)


def save_quantizer_state(model, path: str) -> dict:
    """See `dist_export.sources.quantizers.save_quantizer_state`."""
    from .sources.quantizers import save_quantizer_state as _save

    return _save(model, path)

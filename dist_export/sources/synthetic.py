"""Synthetic Hugging Face checkpoints from real transformers configs, with deterministic random weights.

Key names and shapes come from the real transformers model class, built on the meta device (no memory) and
mapped to checkpoint key space (per-expert names) with transformers' own weight-conversion reversal. Each
tensor is generated from a seed derived from (seed, name) and streamed to disk, so a 16 GB preset needs about
one tensor of memory. `synthetic:<arch>-<preset>` model names are generated once into a local cache.

One process (`dist-export make-model`, or rank 0 of an export of `synthetic:` before the others read it).
"""
from __future__ import annotations

import fcntl
import json
import logging
import math
import os
import re
import shutil
import tempfile
import zlib

import torch

from .archs import ARCHS, PRESET_SOURCE_FORMATS, parse_synthetic  # noqa: F401 - re-exported
from ..layout import CONFIG_NAME, INDEX_NAME, TMP_SUFFIX, shard_filename
from ..storage.atomic import NOFOLLOW, write_atomic
from ..storage.header import DTYPE_TO_ST, ST_ITEMSIZE
from ..storage.shard_file import ShardWriter

log = logging.getLogger(__name__)


def build_config(arch: str, preset: str):
    import transformers

    if arch not in ARCHS:
        raise ValueError(f"unknown arch {arch!r}; valid: {sorted(ARCHS)}")
    cls_name, presets = ARCHS[arch]
    if preset not in presets:
        raise ValueError(f"unknown preset {preset!r} for {arch}; valid: {sorted(presets)}")
    return getattr(transformers, cls_name)(**presets[preset])


def checkpoint_tensor_shapes(config) -> list[tuple[str, tuple[int, ...]]]:
    """(name, shape) of every tensor the real model class saves, in checkpoint key space, save order."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    config.architectures = [type(model).__name__]  # as a real checkpoint's config.json names it
    state = model.state_dict()
    tied = getattr(config, "tie_word_embeddings", False)
    if tied:
        state.pop("lm_head.weight", None)
    try:
        from transformers.core_model_loading import revert_weight_conversion

        state = revert_weight_conversion(model, state)
    except ImportError:  # older transformers keep checkpoint names in memory
        pass
    return [(k, tuple(v.shape)) for k, v in state.items()]


def _tensor_seed(seed: int, name: str) -> int:
    return (seed * 1_000_003 + zlib.crc32(name.encode())) % (2**63 - 1)


def generate_tensor(name: str, shape: tuple[int, ...], seed: int, dtype: torch.dtype, device: str = "cpu"
                    ) -> torch.Tensor:
    """Deterministic weights with realistic structure: norms near 1, rows of different magnitude, and
    experts whose magnitudes differ by up to 16x (so shared vs per-expert amax matters)."""
    gen = torch.Generator(device).manual_seed(_tensor_seed(seed, name))
    if len(shape) == 1:
        w = 1.0 + 0.05 * torch.randn(shape, generator=gen, device=device)
        if name.endswith("bias"):
            w = 0.02 * torch.randn(shape, generator=gen, device=device)
        return w.to(dtype)
    w = torch.randn(shape, generator=gen, device=device) * 0.02
    rows = torch.exp(torch.rand(shape[0], generator=gen, device=device) * 2.0 - 1.0)
    w *= rows.view(-1, *([1] * (len(shape) - 1)))
    stack = re.search(r"\.experts\.(gate_up_proj|down_proj)(_bias)?$", name)
    if stack:  # a stack (GPT-OSS): expert e is w[e]
        w *= (2.0 ** (torch.arange(shape[0], device=device) % 5 - 2.0)).view(-1, *([1] * (len(shape) - 1)))
    elif ".experts." in name:
        expert = int(name.split(".experts.")[1].split(".")[0])
        w *= 2.0 ** ((expert % 5) - 2)
    return w.to(dtype)


def plan_source_shards(tensors, dtype: torch.dtype, max_shard_bytes: int):
    from ..plan import split_in_order

    item = torch.tensor([], dtype=dtype).element_size()
    return split_in_order(list(tensors), [math.prod(shape) * item for _, shape in tensors], max_shard_bytes)


def make_model(arch: str, preset: str, out: str, seed: int = 0, dtype: str = "bfloat16",
               max_shard_size: int = 4 * 1024**3, source_format: str | None = None, device: str = "cpu") -> str:
    """Write a complete HF checkpoint folder for (arch, preset) into `out` (must not exist or be empty).

    `source_format` ("fp8-block", "mxfp4", "compressed-tensors"; default: the preset's own, see archs.py) writes
    the checkpoint already quantized, as the real model ships: each selected weight is generated in `dtype`,
    encoded (`encode.py`) and stored as its codes and scales, with the matching `quantization_config`.
    `device` generates and encodes there (values then follow that device's random generator).
    """
    from .encode import SOURCE_FORMATS

    torch_dtype = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}.get(dtype)
    if torch_dtype is None:
        raise ValueError(f"unsupported --dtype {dtype!r}; valid: bfloat16, float16, float32")
    source_format = source_format or PRESET_SOURCE_FORMATS.get((arch, preset))
    if source_format is not None and source_format not in SOURCE_FORMATS:
        raise ValueError(f"unknown --source-format {source_format!r}; valid: {sorted(SOURCE_FORMATS)}")
    fmt = SOURCE_FORMATS.get(source_format)
    config = build_config(arch, preset)
    config.dtype = dtype
    tensors = checkpoint_tensor_shapes(config)
    st_dtype = DTYPE_TO_ST[torch_dtype]
    entries = [(name, shape, fmt.stored_layout(name, shape, st_dtype) if fmt and fmt.selects(name, shape)
                else [(name, st_dtype, shape)]) for name, shape in tensors]
    if fmt and not any(len(layout) > 1 for _, _, layout in entries):
        raise ValueError(f"--source-format {source_format} quantizes no tensor of {arch}-{preset} (it stores "
                         f"{'gpt-oss expert stacks' if source_format == 'mxfp4' else 'Linear weights'}); pick "
                         f"another format or arch")
    if os.path.exists(out) and os.listdir(out):
        raise ValueError(f"output folder {out} is not empty; choose a new folder")
    os.makedirs(out, exist_ok=True)
    from ..plan import split_in_order

    sizes = [sum(math.prod(s) * ST_ITEMSIZE[d] for _, d, s in layout) for _, _, layout in entries]
    shards = split_in_order(entries, sizes, max_shard_size)
    weight_map, total = {}, 0
    for i, shard in enumerate(shards):
        fname = shard_filename(i, len(shards))
        writer = ShardWriter(os.path.join(out, fname), [t for _, _, layout in shard for t in layout],
                             {"format": "pt"})
        for name, shape, layout in shard:
            t = generate_tensor(name, shape, seed, torch_dtype, device)
            stored = fmt.stored(name, t) if len(layout) > 1 else [(name, t)]
            for sname, st in stored:
                st = st.cpu()
                writer.write(sname, st)
                weight_map[sname] = fname
                total += st.numel() * st.element_size()
        writer.finish()
    if len(shards) > 1:
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        write_atomic(os.path.join(out, INDEX_NAME), json.dumps(index, indent=2, sort_keys=True).encode())
    if fmt is not None:
        plain = [n[: -len(".weight")] for n, shape, layout in entries
                 if len(layout) == 1 and n.endswith(".weight") and len(shape) == 2]
        config.quantization_config = fmt.config(plain)
    _set_special_token_ids(config)
    config.save_pretrained(out)
    write_tokenizer(out, config.vocab_size)
    from transformers import GenerationConfig

    # written by transformers itself, as save_pretrained of a real model would
    GenerationConfig.from_model_config(config).save_pretrained(out)
    log.info("wrote synthetic %s-%s%s (%d tensors, %.1f MB) to %s", arch, preset,
             f" ({source_format} source)" if fmt else "", len(weight_map), total / 1e6, out)
    return out


SPECIAL_TOKENS = ("<unk>", "<s>", "</s>")  # ids 0, 1, 2
_TOKENIZER_TEXT = ("The quick brown fox jumps over the lazy dog. A synthetic model has a small real tokenizer, "
                   "built here from this text, so that its exports can be served and prompted.")


def _set_special_token_ids(config) -> None:
    """bos/eos ids of the tokenizer `write_tokenizer` builds, where the preset names none."""
    if getattr(config, "bos_token_id", None) is None:
        config.bos_token_id = 1
    if getattr(config, "eos_token_id", None) is None:
        config.eos_token_id = 2


def write_tokenizer(out: str, vocab_size: int) -> None:
    """A small byte-pair tokenizer trained locally (tokenizers library, deterministic, no download) on a fixed
    text: printable ASCII plus merges, at most `vocab_size` ids, saved as transformers' fast tokenizer files."""
    import string

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=SPECIAL_TOKENS[0]))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    alphabet = list(string.ascii_letters + string.digits + string.punctuation + " ") + ["\u2581"]
    trainer = trainers.BpeTrainer(vocab_size=min(vocab_size, 512), special_tokens=list(SPECIAL_TOKENS),
                                  initial_alphabet=alphabet, show_progress=False)
    tok.train_from_iterator([_TOKENIZER_TEXT], trainer)
    if tok.get_vocab_size() > vocab_size:
        raise ValueError(f"synthetic tokenizer has {tok.get_vocab_size()} ids, more than vocab_size {vocab_size}")
    # every id the model can emit decodes (vLLM's logprob detokenizer fails on an id the tokenizer lacks)
    tok.add_tokens([f"<extra_{i}>" for i in range(tok.get_vocab_size(), vocab_size)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token=SPECIAL_TOKENS[0], bos_token=SPECIAL_TOKENS[1],
                                   eos_token=SPECIAL_TOKENS[2], pad_token=SPECIAL_TOKENS[2])
    fast.save_pretrained(out)


def synthetic_metadata(name: str, dtype: str = "bfloat16", max_shard_size: int = 4 * 1024**3) -> dict:
    """TensorMeta of every tensor `make_model` would write for `synthetic:<arch>-<preset>`, without writing
    anything (planning dry runs of large presets)."""
    from ..storage.header import TensorMeta

    arch, preset = parse_synthetic(name)
    torch_dtype = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}[dtype]
    shards = plan_source_shards(checkpoint_tensor_shapes(build_config(arch, preset)), torch_dtype, max_shard_size)
    item = torch.tensor([], dtype=torch_dtype).element_size()
    metas = {}
    for i, shard in enumerate(shards):
        fname = shard_filename(i, len(shards))
        pos = 0
        for tname, shape in shard:
            nbytes = math.prod(shape) * item
            metas[tname] = TensorMeta(tname, fname, DTYPE_TO_ST[torch_dtype], tuple(shape), pos, pos + nbytes)
            pos += nbytes
    return metas


def cache_root() -> str:
    return os.environ.get("DIST_EXPORT_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "dist_export"))


def ensure_synthetic(name: str, seed: int = 0, dtype: str = "bfloat16") -> str:
    """Folder of the cached synthetic model `name`, generating it once (safe with concurrent processes)."""
    arch, preset = parse_synthetic(name)
    root = os.path.join(cache_root(), "synthetic")
    os.makedirs(root, exist_ok=True)
    import transformers

    final = os.path.join(root, f"{arch}-{preset}-seed{seed}-{dtype}-tf{transformers.__version__}-tok1")
    if os.path.isfile(os.path.join(final, CONFIG_NAME)):
        return final
    fd = os.open(final + ".lock", os.O_RDWR | os.O_CREAT | NOFOLLOW, 0o644)  # a planted link is not followed
    with os.fdopen(fd, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one generator; the others wait and reuse its result
        if not os.path.isfile(os.path.join(final, CONFIG_NAME)):
            tmp = tempfile.mkdtemp(prefix=os.path.basename(final) + ".", suffix=TMP_SUFFIX, dir=root)  # private, new
            try:
                make_model(arch, preset, tmp, seed=seed, dtype=dtype)
                os.chmod(tmp, 0o755)  # mkdtemp's 0700: the cache may be shared by users
                os.replace(tmp, final)
            except BaseException:
                shutil.rmtree(tmp, ignore_errors=True)
                raise
    return final

"""Calibration samples (calibrate stage, every rank; each rank then takes its own slice of the samples).

Sources, always chosen explicitly:
  * a text file: one sample per non-empty line;
  * a JSONL file (or a JSON list): one object per sample with `text`, or chat `messages` (a list of
    `{"role", "content"}`) rendered with the tokenizer's own chat template;
  * a local dataset folder: a `datasets.save_to_disk` folder (needs `datasets`), or a folder of `.txt`,
    `.jsonl` and `.json` files read in name order;
  * seeded random token ids, only when asked for (`--random-tokens`): fine for tests, useless for real scales.

Every sample is truncated to `seq_len` tokens; empty ones are dropped. `describe` returns the record of the
choice (kind, file name and sha256, sample and token counts) that goes into the calibration file and the
export record. Batches are right-padded and carry a mask: padded positions are never observed.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field

import torch

DATA_FILE_SUFFIXES = (".txt", ".jsonl", ".json")


@dataclass
class CalibrationData:
    samples: list[list[int]]
    record: dict = field(default_factory=dict)


def random_token_samples(vocab_size: int, num_samples: int, seq_len: int, seed: int) -> CalibrationData:
    _check_counts(num_samples, seq_len)
    gen = torch.Generator().manual_seed(seed)
    samples = [torch.randint(0, vocab_size, (seq_len,), generator=gen).tolist() for _ in range(num_samples)]
    record = {"kind": "random-tokens", "seed": seed, "samples": num_samples, "tokens": num_samples * seq_len,
              "seq_len": seq_len}
    return CalibrationData(samples, record)


def load_samples(data: str, tokenizer, num_samples: int, seq_len: int) -> CalibrationData:
    """Token ids of the first `num_samples` non-empty samples of `data` (a file or a dataset folder)."""
    _check_counts(num_samples, seq_len)
    if not os.path.exists(data):
        raise FileNotFoundError(f"calibration data {data} does not exist: pass a .txt or .jsonl file or a dataset "
                                f"folder with --data")
    texts, kind, digest = _read_texts(data, tokenizer, num_samples)
    samples = []
    for text in texts:
        ids = tokenizer(text, add_special_tokens=kind != "chat", truncation=True, max_length=seq_len)["input_ids"]
        if ids:
            samples.append(list(ids))
        if len(samples) == num_samples:
            break
    if not samples:
        raise ValueError(f"calibration data {data} holds no text that tokenizes to at least one token: give it "
                         f"`text` or chat `messages` entries")
    record = {"kind": kind, "name": os.path.basename(os.path.normpath(data)), "sha256": digest,
              "samples": len(samples), "tokens": sum(len(s) for s in samples), "seq_len": seq_len}
    return CalibrationData(samples, record)


def _check_counts(num_samples: int, seq_len: int) -> None:
    if not isinstance(num_samples, int) or num_samples < 1:
        raise ValueError(f"--num-samples must be a positive integer, got {num_samples!r}")
    if not isinstance(seq_len, int) or seq_len < 1:
        raise ValueError(f"--seq-len must be a positive integer, got {seq_len!r}")


def _read_texts(data: str, tokenizer, limit: int) -> tuple[list[str], str, str]:
    """(texts, kind, sha256 of the bytes read): kind is "text", "jsonl" (text entries), "chat" or "dataset"."""
    if os.path.isdir(data):
        return _read_folder(data, tokenizer, limit)
    with open(data, "rb") as f:
        raw = f.read()
    texts, kind = _parse_file(data, raw, tokenizer)
    return texts, kind, hashlib.sha256(raw).hexdigest()


def _parse_file(path: str, raw: bytes, tokenizer) -> tuple[list[str], str]:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise ValueError(f"calibration data {path} is not UTF-8 text") from None
    if path.endswith(".jsonl"):
        rows = []
        for n, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise ValueError(f"calibration data {path}, line {n}: not JSON ({e.msg})") from None
        return _rows_to_texts(path, rows, tokenizer)
    if path.endswith(".json"):
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"calibration data {path}: not JSON ({e.msg} at line {e.lineno})") from None
        if not isinstance(rows, list):
            raise ValueError(f"calibration data {path}: expected a JSON list of {{text}} or {{messages}} objects")
        return _rows_to_texts(path, rows, tokenizer)
    return [ln.strip() for ln in text.splitlines() if ln.strip()], "text"


def _rows_to_texts(path: str, rows: list, tokenizer) -> tuple[list[str], str]:
    texts, kinds = [], set()
    for n, row in enumerate(rows, 1):
        if isinstance(row, dict) and isinstance(row.get("messages"), list):
            texts.append(render_chat(row["messages"], tokenizer, f"{path}, entry {n}"))
            kinds.add("chat")
        elif isinstance(row, dict) and isinstance(row.get("text"), str):
            texts.append(row["text"])
            kinds.add("jsonl")
        else:
            keys = sorted(row) if isinstance(row, dict) else type(row).__name__
            raise ValueError(f"calibration data {path}, entry {n}: expected a `text` string or a chat `messages` "
                             f"list, got {keys}")
    return texts, ("chat" if "chat" in kinds else "jsonl")


def render_chat(messages: list, tokenizer, where: str) -> str:
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError(f"{where}: chat `messages` need the tokenizer's chat template, and this tokenizer has "
                         f"none: use `text` entries or a model whose tokenizer has a chat template")
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False)
    except Exception as e:  # noqa: BLE001 - a template error is the data's problem: one line
        raise ValueError(f"{where}: the chat template failed on these messages ({type(e).__name__}: {e})") from None


def _read_folder(folder: str, tokenizer, limit: int) -> tuple[list[str], str, str]:
    if os.path.isfile(os.path.join(folder, "dataset_info.json")) or os.path.isfile(os.path.join(folder, "state.json")):
        return _read_saved_dataset(folder, tokenizer, limit)
    names = sorted(n for n in os.listdir(folder) if n.endswith(DATA_FILE_SUFFIXES) and not n.startswith("."))
    if not names:
        raise ValueError(f"calibration folder {folder} holds no .txt, .jsonl or .json files and is not a saved "
                         f"`datasets` folder")
    h = hashlib.sha256()
    texts: list[str] = []
    for name in names:
        path = os.path.join(folder, name)
        with open(path, "rb") as f:
            raw = f.read()
        h.update(f"{name}\n{len(raw)}\n".encode())
        h.update(raw)
        texts += _parse_file(path, raw, tokenizer)[0]
        if len(texts) >= limit:
            break
    return texts, "dataset", h.hexdigest()


def _read_saved_dataset(folder: str, tokenizer, limit: int) -> tuple[list[str], str, str]:
    try:
        import datasets
    except ImportError:
        raise ValueError(f"{folder} is a saved `datasets` folder: install `datasets` to read it, or pass a .jsonl "
                         f"file") from None
    ds = datasets.load_from_disk(folder)
    if isinstance(ds, datasets.DatasetDict):
        ds = ds[sorted(ds)[0]]
    rows = [ds[i] for i in range(min(limit * 2, len(ds)))]
    texts, _ = _rows_to_texts(folder, rows, tokenizer)
    h = hashlib.sha256(getattr(ds, "_fingerprint", folder).encode())
    return texts, "dataset", h.hexdigest()


def rank_slice(samples: list, rank: int, world_size: int) -> list:
    """Rank r calibrates samples r, r + world, ...: every sample once, on exactly one rank."""
    return samples[rank::world_size]


def batches(samples: list[list[int]], batch_size: int, pad_id: int):
    """(input_ids [B, T], attention_mask [B, T]) batches, right-padded to the longest sample of the batch."""
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"--batch-size must be a positive integer, got {batch_size!r}")
    for start in range(0, len(samples), batch_size):
        chunk = samples[start:start + batch_size]
        width = max(len(s) for s in chunk)
        ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for i, s in enumerate(chunk):
            ids[i, : len(s)] = torch.tensor(s, dtype=torch.long)
            mask[i, : len(s)] = 1
        yield ids, mask

"""Calibration samples: text, JSONL text, chat JSONL through the tokenizer's chat template, dataset folders,
explicit random tokens, masks of padded batches, rank slices; one-line errors for bad data."""
from __future__ import annotations

import json

import pytest
import torch

from dist_export.calibration.data import batches, load_samples, random_token_samples, rank_slice
from userkit import make_tokenizer


@pytest.fixture()
def tok(tmp_path):
    return make_tokenizer(str(tmp_path / "tok"))


def test_text_jsonl_and_chat_give_the_tokens_of_their_samples(tmp_path, tok):
    (tmp_path / "d.txt").write_text("w1 w2 w3\n\nw4 w5\n")
    (tmp_path / "d.jsonl").write_text(json.dumps({"text": "w1 w2 w3"}) + "\n" + json.dumps({"text": "w4 w5"}) + "\n")
    chat = [{"messages": [{"role": "user", "content": "w1 w2"}, {"role": "assistant", "content": "w3"}]}]
    (tmp_path / "c.jsonl").write_text("\n".join(json.dumps(r) for r in chat) + "\n")
    ids = lambda s: tok(s, add_special_tokens=False)["input_ids"]  # noqa: E731
    t = load_samples(str(tmp_path / "d.txt"), tok, 8, 64)
    j = load_samples(str(tmp_path / "d.jsonl"), tok, 8, 64)
    assert t.samples == j.samples == [ids("w1 w2 w3"), ids("w4 w5")]
    assert t.record["kind"] == "text" and j.record["kind"] == "jsonl" and j.record["samples"] == 2
    c = load_samples(str(tmp_path / "c.jsonl"), tok, 8, 64)
    assert c.record["kind"] == "chat"
    assert c.samples == [ids("<|user|> w1 w2 <|assistant|> w3")]  # rendered by the chat template, then tokenized
    assert c.record["tokens"] == 5 and c.record["name"] == "c.jsonl" and len(c.record["sha256"]) == 64


def test_num_samples_and_seq_len_truncate(tmp_path, tok):
    (tmp_path / "d.txt").write_text("\n".join(" ".join(f"w{j}" for j in range(i, i + 10)) for i in range(5)))
    d = load_samples(str(tmp_path / "d.txt"), tok, 3, 4)
    assert len(d.samples) == 3 and all(len(s) == 4 for s in d.samples)


def test_dataset_folder_reads_its_files_in_name_order(tmp_path, tok):
    folder = tmp_path / "ds"
    folder.mkdir()
    (folder / "b.jsonl").write_text(json.dumps({"text": "w2"}) + "\n")
    (folder / "a.txt").write_text("w1\n")
    d = load_samples(str(folder), tok, 8, 16)
    assert d.samples == [tok("w1")["input_ids"], tok("w2")["input_ids"]] and d.record["kind"] == "dataset"


@pytest.mark.parametrize("content, message", [
    ('{"prompt": "x"}\n', "expected a `text` string or a chat `messages` list"),
    ('{"text": ""}\n', "holds no text"),
    ('not json\n', "line 1: not JSON"),
])
def test_bad_jsonl_is_one_clear_line(tmp_path, tok, content, message):
    (tmp_path / "bad.jsonl").write_text(content)
    with pytest.raises(ValueError, match=message):
        load_samples(str(tmp_path / "bad.jsonl"), tok, 4, 16)


def test_chat_without_a_template_and_bad_counts_are_refused(tmp_path):
    plain = make_tokenizer(str(tmp_path / "plain"), chat_template=False)
    (tmp_path / "c.jsonl").write_text(json.dumps({"messages": [{"role": "user", "content": "w1"}]}) + "\n")
    with pytest.raises(ValueError, match="chat template"):
        load_samples(str(tmp_path / "c.jsonl"), plain, 4, 16)
    with pytest.raises(ValueError, match="--num-samples must be a positive integer, got 0"):
        load_samples(str(tmp_path / "c.jsonl"), plain, 0, 16)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_samples(str(tmp_path / "missing.jsonl"), plain, 4, 16)
    with pytest.raises(ValueError, match="--batch-size"):
        next(batches([[1]], 0, 0))


def test_random_tokens_are_seeded_and_recorded():
    a, b = random_token_samples(100, 3, 8, seed=1), random_token_samples(100, 3, 8, seed=1)
    assert a.samples == b.samples and a.samples != random_token_samples(100, 3, 8, seed=2).samples
    assert a.record == {"kind": "random-tokens", "seed": 1, "samples": 3, "tokens": 24, "seq_len": 8}


def test_batches_pad_right_with_a_mask_and_rank_slices_cover_every_sample_once():
    samples = [[1, 2, 3], [4], [5, 6]]
    (ids, mask), (ids2, mask2) = list(batches(samples, 2, pad_id=0))
    assert ids.tolist() == [[1, 2, 3], [4, 0, 0]] and mask.tolist() == [[1, 1, 1], [1, 0, 0]]
    assert ids2.tolist() == [[5, 6]] and mask2.dtype == torch.long
    parts = [rank_slice(list(range(7)), r, 3) for r in range(3)]
    assert sorted(sum(parts, [])) == list(range(7)) and parts[0] == [0, 3, 6]

"""Per-tensor checksums (issue 17): ranges hashed with hashlib directly as the reference; combine rules."""
import hashlib

import pytest

from dist_export.tensor_checksums import combine_tensor_sums, sha256_ranges


def test_ranges_hash_like_hashlib_on_the_slices(tmp_path):
    data = bytes(range(256)) * 300
    path = tmp_path / "f.bin"
    path.write_bytes(data)
    ranges = {"a": (0, 10), "b": (10, 70000), "empty": (5, 5)}
    got = sha256_ranges(str(path), ranges, chunk=4096)
    assert got == {k: hashlib.sha256(data[s:e]).hexdigest() for k, (s, e) in ranges.items()}


def test_a_changed_byte_changes_only_its_tensor(tmp_path):
    path = tmp_path / "f.bin"
    path.write_bytes(b"\0" * 100)
    ranges = {"a": (0, 50), "b": (50, 100)}
    before = sha256_ranges(str(path), ranges)
    with open(path, "r+b") as f:
        f.seek(60)
        f.write(b"\1")
    after = sha256_ranges(str(path), ranges)
    assert before["a"] == after["a"] and before["b"] != after["b"]


def test_truncated_file_is_refused(tmp_path):
    path = tmp_path / "f.bin"
    path.write_bytes(b"\0" * 10)
    with pytest.raises(ValueError, match="truncated"):
        sha256_ranges(str(path), {"a": (0, 11)})


PLAN = {"s1": ["x", "y"], "s2": ["z"]}


def test_combine_in_file_order():
    got = combine_tensor_sums(PLAN, [{"s1": {"y": "2"}}, {"s1": {"x": "1"}, "s2": {"z": "3"}}])
    assert got == {"s1": {"x": "1", "y": "2"}, "s2": {"z": "3"}}
    assert list(got["s1"]) == ["x", "y"]


@pytest.mark.parametrize("per_rank,match", [
    ([{"s1": {"x": "1", "y": "2"}}], "no rank reported"),
    ([{"s1": {"x": "1", "y": "2"}, "s2": {"z": "3"}}, {"s2": {"z": "3"}}], "two ranks"),
    ([{"s1": {"x": "1", "y": "2", "z": "3"}}], "no such tensor"),
    ([{"s9": {"x": "1"}}], "does not have"),
])
def test_combine_refuses_gaps_doubles_and_strangers(per_rank, match):
    with pytest.raises(RuntimeError, match=match):
        combine_tensor_sums(PLAN, per_rank)

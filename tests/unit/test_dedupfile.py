"""dedup.keys (issue 13): memory mode's dedup window across a clean restart."""

from __future__ import annotations

from forwarder.dedupfile import read_keys, write_keys


def test_keys_come_back_with_the_time_they_were_added(tmp_path):
    path = tmp_path / "dedup.keys"
    assert write_keys(path, [(b"A" * 16, 30.0), (b"B" * 8, 0.0)], wall_now=1000.0) == 2
    assert path.stat().st_size == 6 + 2 * 16  # compact: 16 bytes a key
    assert read_keys(path) == [(b"A" * 8, 970.0), (b"B" * 8, 1000.0)]


def test_a_missing_or_foreign_file_gives_no_keys_and_no_crash(tmp_path):
    path = tmp_path / "dedup.keys"
    assert read_keys(path) == []
    write_keys(path, [(b"A" * 8, 1.0)], wall_now=10.0)
    path.write_bytes(path.read_bytes()[:-3])  # torn: not a whole number of entries
    assert read_keys(path) == []
    path.write_bytes(b"not ours at all")
    assert read_keys(path) == []

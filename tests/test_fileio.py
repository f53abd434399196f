"""Atomic writes (devis_core/fileio.py): all-or-nothing, usual permissions, no temporary left behind."""
import os

import pytest

from devis_core.fileio import atomic_write, atomic_write_bytes, atomic_write_text


def test_writes_text_bytes_and_path_writers(tmp_path):
    assert atomic_write_text(tmp_path / "a" / "t.txt", "héllo") == str(tmp_path / "a" / "t.txt")
    assert (tmp_path / "a" / "t.txt").read_text(encoding="utf-8") == "héllo"
    atomic_write_bytes(tmp_path / "b.bin", b"\x00\x01")
    assert (tmp_path / "b.bin").read_bytes() == b"\x00\x01"
    atomic_write(tmp_path / "c.txt", lambda tmp: open(tmp, "w").write("via path"))
    assert (tmp_path / "c.txt").read_text() == "via path"
    assert sorted(os.listdir(tmp_path)) == ["a", "b.bin", "c.txt"]


def test_permissions_follow_umask(tmp_path):
    old = os.umask(0o022)
    try:
        atomic_write_text(tmp_path / "r.json", "{}")
    finally:
        os.umask(old)
    assert (tmp_path / "r.json").stat().st_mode & 0o777 == 0o644


def test_failure_keeps_previous_file_and_leaves_no_temporary(tmp_path):
    target = tmp_path / "keep.txt"
    target.write_text("old")

    def boom(fh):
        fh.write("half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_write(target, boom, mode="w")
    assert target.read_text() == "old" and os.listdir(tmp_path) == ["keep.txt"]

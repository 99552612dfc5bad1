"""jobs.storage.WriteBehind, the embedded executor's background writer: read-your-writes from
any Store of the directory, files on disk in the order written, fsynced before they are linked,
write-once kept, a failed write raised to the caller."""

import os
import time

import pyarrow as pa
import pytest

from jobs import storage
from jobs.storage import Store, write_behind


def test_reads_see_pending_writes_and_everything_lands_in_order(tmp_path, monkeypatch):
    landed = []
    real = storage._write_local_group

    def recording(root, items):
        landed.extend(rel for rel, _, _ in items)
        return real(root, items)

    monkeypatch.setattr(storage, "_write_local_group", recording)
    table = pa.table({"x": list(range(10))})
    with write_behind(str(tmp_path)):
        a, b = Store(str(tmp_path)), Store(str(tmp_path))          # two Stores, one directory
        for i in range(20):
            assert a.write_arrow(f"tiers/0/u{i}.arrow", table, {"unit": i}, once=True)
            assert b.read_arrow(f"tiers/0/u{i}.arrow").equals(table)
            assert b.arrow_meta(f"tiers/0/u{i}.arrow") == {"unit": i}
        assert not b.write_arrow("tiers/0/u3.arrow", table, {"unit": "again"}, once=True)
        a.write_json("finished.json", {"ok": True})
        assert b.read_json("finished.json") == {"ok": True}
        assert b.glob("tiers/0/*.arrow") == sorted(f"tiers/0/u{i}.arrow" for i in range(20))
    assert landed == [f"tiers/0/u{i}.arrow" for i in range(20)] + ["finished.json"]
    plain = Store(str(tmp_path))
    assert plain.arrow_meta("tiers/0/u3.arrow") == {"unit": 3}
    assert not [p for p in os.listdir(tmp_path / "tiers" / "0") if ".tmp-" in p]


def test_a_group_write_keeps_an_existing_write_once_file_and_leaves_no_temporary(tmp_path):
    (tmp_path / "tiers").mkdir()
    (tmp_path / "tiers" / "b.arrow").write_bytes(b"theirs")
    won = storage._write_local_group(str(tmp_path), [("tiers/a.arrow", b"a", True),
                                                     ("tiers/b.arrow", b"mine", True),
                                                     ("status.json", b"{}", False),
                                                     ("status.json", b"{1}", False)])
    assert won == [True, False, True, True]
    assert (tmp_path / "tiers" / "b.arrow").read_bytes() == b"theirs"
    assert (tmp_path / "tiers" / "a.arrow").read_bytes() == b"a"
    assert (tmp_path / "status.json").read_bytes() == b"{1}"            # the later write wins
    assert not [p for p in tmp_path.rglob("*") if ".tmp-" in p.name]


def test_a_group_write_falls_back_to_a_fsync_per_file_when_syncfs_fails(tmp_path, monkeypatch):
    synced = []
    real = os.fsync
    monkeypatch.setattr(storage, "_SYNCFS", lambda fd: -1)
    monkeypatch.setattr(storage.os, "fsync", lambda fd: (synced.append(fd), real(fd)))
    assert storage._write_local_group(str(tmp_path), [("a", b"1", True), ("b", b"2", False)]) == [True, True]
    assert len(synced) == 2 and (tmp_path / "a").read_bytes() == b"1" and (tmp_path / "b").read_bytes() == b"2"
    assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name]


def test_a_failed_background_write_is_raised_by_the_next_call(tmp_path, monkeypatch):
    def broken(root, items):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(storage, "_write_local_group", broken)
    with pytest.raises(OSError, match="background write failed.*No space left"):
        with write_behind(str(tmp_path)):
            s = Store(str(tmp_path))
            s.write_bytes("a.bin", b"x")
            s.flush()


def test_a_lingering_group_never_holds_up_a_caller_that_waits(tmp_path, monkeypatch):
    """A small group waits up to LINGER for more files before its sync; a flush, or a put into
    a full queue, ends that wait at once (with a LINGER of a minute, either would hang)."""
    monkeypatch.setattr(storage.WriteBehind, "LINGER", 60.0)
    monkeypatch.setattr(storage.WriteBehind, "LIMIT", 1000)
    groups = []
    real = storage._write_local_group
    monkeypatch.setattr(storage, "_write_local_group",
                        lambda root, items: (groups.append(len(items)), real(root, items))[1])
    with write_behind(str(tmp_path)):
        s = Store(str(tmp_path))
        s.write_bytes("a.bin", b"x")
        t0 = time.monotonic()
        s.flush()                                   # ends the linger of a group of one
        assert time.monotonic() - t0 < 20           # not the minute of LINGER
        assert (tmp_path / "a.bin").read_bytes() == b"x"
        t0 = time.monotonic()
        for i in range(5):                          # each put beyond LIMIT waits for the writer
            s.write_bytes(f"big{i}.bin", b"y" * 800)
        assert time.monotonic() - t0 < 20
    assert groups[0] == 1 and sum(groups) == 6
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.bin", *(f"big{i}.bin" for i in range(5))]

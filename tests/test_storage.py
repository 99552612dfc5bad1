"""jobs.storage.WriteBehind, the embedded executor's background writer: read-your-writes from
any Store of the directory, files on disk in the order written, fsynced before they are linked,
write-once kept, a failed write raised to the caller."""

import os

import pyarrow as pa
import pytest

from jobs import storage
from jobs.storage import Store, write_behind


def test_reads_see_pending_writes_and_everything_lands_in_order(tmp_path, monkeypatch):
    landed = []
    real = storage._write_local

    def recording(target, data, once):
        landed.append(os.path.relpath(target, tmp_path))
        return real(target, data, once)

    monkeypatch.setattr(storage, "_write_local", recording)
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


def test_a_failed_background_write_is_raised_by_the_next_call(tmp_path, monkeypatch):
    def broken(target, data, once):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(storage, "_write_local", broken)
    with pytest.raises(OSError, match="background write failed.*No space left"):
        with write_behind(str(tmp_path)):
            s = Store(str(tmp_path))
            s.write_bytes("a.bin", b"x")
            s.flush()

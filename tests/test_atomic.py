"""mixq.atomic: a file is replaced whole or not at all, and a dead run's temporaries are cleaned up."""
import pytest

from mixq.atomic import atomic_file, temp_prefix, write_bytes_atomic
from mixq.fsmode import file_mode
from mixq.jsonio import read_json, write_json_atomic


def test_atomic_file_replaces_whole_or_leaves_the_old_file(tmp_path):
    out = tmp_path / "a.bin"
    out.write_bytes(b"old")
    with pytest.raises(RuntimeError):
        with atomic_file(out) as tmp:
            tmp.write_bytes(b"half")
            assert tmp.parent == tmp_path and tmp.name.startswith(temp_prefix(out)) and out.read_bytes() == b"old"
            raise RuntimeError("killed mid-write")
    assert out.read_bytes() == b"old" and sorted(p.name for p in tmp_path.iterdir()) == ["a.bin"]
    with atomic_file(out) as tmp:
        tmp.write_bytes(b"new")
    assert out.read_bytes() == b"new" and sorted(p.name for p in tmp_path.iterdir()) == ["a.bin"]
    assert out.stat().st_mode & 0o777 == file_mode()  # published as an ordinary file, not mkstemp's private 0600


def test_write_bytes_atomic_refuses_to_overwrite_unless_asked_and_removes_stale_temporaries(tmp_path):
    out = tmp_path / "m.json"
    write_json_atomic(out, {"a": 1})
    with pytest.raises(FileExistsError, match="--force"):
        write_json_atomic(out, {"a": 2})
    assert read_json(out) == {"a": 1}
    dead = tmp_path / f".m.json.tmp-999999999@{temp_prefix(out).split('@')[1]}zzzz"  # a pid that cannot run
    dead.write_bytes(b"left by a killed run")
    live = tmp_path / f"{temp_prefix(out)}live"  # this process: never touched
    live.write_bytes(b"")
    write_bytes_atomic(out, b'{"a": 3}', overwrite=True)
    assert read_json(out) == {"a": 3} and not dead.exists() and live.exists()

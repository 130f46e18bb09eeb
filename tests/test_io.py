import json
import os
import stat

import pytest

from qat.io import atomic_write, atomic_write_json


def test_atomic_json_roundtrip_and_permissions(tmp_path):
    path = atomic_write_json(tmp_path / "sub" / "r.json", {"a": 1.5})
    assert json.loads(path.read_text()) == {"a": 1.5}
    mask = os.umask(0)
    os.umask(mask)
    assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~mask
    assert [p.name for p in path.parent.iterdir()] == ["r.json"]


def test_failed_write_keeps_the_old_file_and_leaves_no_temp(tmp_path):
    path = atomic_write_json(tmp_path / "r.json", {"old": True})

    def boom(f):
        f.write(b"partial")
        raise RuntimeError("killed")

    with pytest.raises(RuntimeError):
        atomic_write(path, boom)
    assert json.loads(path.read_text()) == {"old": True}
    assert [p.name for p in tmp_path.iterdir()] == ["r.json"]

"""Atomic writes: an error mid-write leaves the old file intact and no temp file behind."""

from __future__ import annotations

import json

import numpy as np
import pytest

from ptxseg.fileio import atomic_open, write_json, write_png, write_text


def test_failed_write_keeps_old_file(tmp_path):
    target = tmp_path / "out.json"
    write_json(target, {"a": 1})
    with pytest.raises(RuntimeError):
        with atomic_open(target, "w") as fh:
            fh.write('{"a": 2, "trunc')
            raise RuntimeError("killed")
    assert json.loads(target.read_text()) == {"a": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["out.json"]


def test_write_json_refuses_nan(tmp_path):
    with pytest.raises(ValueError):
        write_json(tmp_path / "m.json", {"x": float("nan")})
    assert not list(tmp_path.iterdir())


def test_png_and_text_round_trip(tmp_path):
    import cv2

    arr = (np.arange(64, dtype=np.uint8).reshape(8, 8) * 3).astype(np.uint8)
    write_png(tmp_path / "sub" / "a.png", arr)
    assert np.array_equal(cv2.imread(str(tmp_path / "sub" / "a.png"), cv2.IMREAD_UNCHANGED), arr)
    write_text(tmp_path / "t.txt", "héllo\n")
    assert (tmp_path / "t.txt").read_text(encoding="utf-8") == "héllo\n"


def test_a_failed_write_names_the_users_file(tmp_path):
    """A folder where the file should go: the error names the file, not the temp file, and no
    temp file is left."""
    target = tmp_path / "sub.csv"
    target.mkdir()
    with pytest.raises(OSError) as info:
        write_text(target, "x")
    assert info.value.filename == str(target) and ".tmp" not in str(info.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sub.csv"]

"""Atomic writes and stage markers (hqjax/_workdir.py)."""

import json
import os

import pytest

from hqjax._workdir import Workdir, atomic_write_json


def test_atomic_write_leaves_only_the_file(tmp_path):
    p = tmp_path / "a" / "x.json"
    atomic_write_json(str(p), {"a": [1, 2]})
    atomic_write_json(str(p), {"a": [3]})
    assert json.loads(p.read_text()) == {"a": [3]}
    assert os.listdir(p.parent) == ["x.json"]


def test_atomic_write_refuses_nan_and_keeps_old_file(tmp_path):
    p = tmp_path / "x.json"
    atomic_write_json(str(p), {"ok": 1})
    with pytest.raises(ValueError):
        atomic_write_json(str(p), {"bad": float("nan")})
    assert json.loads(p.read_text()) == {"ok": 1}


def test_markers(tmp_path):
    w = Workdir(str(tmp_path))
    assert not w.is_done("train", "abc")
    w.mark_done("train", "abc", 1.25)
    assert w.is_done("train", "abc") and not w.is_done("train", "other")
    w.clear("train")
    assert w.marker("train") is None
    with pytest.raises(FileNotFoundError, match="run the stage"):
        w.read_json("missing.json")

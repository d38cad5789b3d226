"""The output folder of a job: atomic writes and per-stage (and per-unit) done markers.

Every file is written to a temporary name in the same folder and moved into place with
``os.replace``, which is atomic on POSIX: a reader (or a resumed run after a kill) sees the
old file or the new one, never half of one. A stage is finished when its marker
``stages/<stage>.json`` exists with the stage's current fingerprint; markers are written
last, after every output of the stage, so a killed stage is simply re-run (and, inside the
analysis, resumes from its last finished unit, whose own marker is its result file).
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

from hqjax._schema import stamp, unstamp

__all__ = ["atomic_write_bytes", "atomic_write_json", "read_json", "check_writable", "Workdir"]


def atomic_write_bytes(path: str, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (temp file in the same folder, fsync, rename)."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    tmp = os.path.join(folder, f".{os.path.basename(path)}.tmp{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def atomic_write_json(path: str, obj: Any) -> None:
    """``json.dump`` with indentation, atomically; NaN/inf are refused (strict JSON)."""
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=False, allow_nan=False) + "\n").encode())


def check_writable(folder: str) -> None:
    """Raise ``UserError`` now, before any work, when ``folder`` could not be written
    (it, or the nearest existing folder above it, is not writable). Creates nothing."""
    from hqjax._errors import UserError

    folder = existing = os.path.abspath(folder)
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        raise UserError(f"cannot use {folder!r} as the output folder: {existing!r} is a file; choose another --out")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UserError(f"cannot write to the output folder {folder!r} ({existing!r} is not writable); "
                        f"choose a writable folder with --out")


def read_json(path: str) -> Any:
    """Parse a JSON file and drop its schema stamp (checking the version, ``hqjax._schema``)."""
    with open(path) as f:
        return unstamp(json.load(f), source=repr(path))


def _kind(name: str) -> str:
    """Schema kind of a file in the folder: its stem, or its sub-folder for per-unit files."""
    head, tail = os.path.split(name)
    return os.path.basename(head) if head else os.path.splitext(tail)[0]


class Workdir:
    """An output folder with stage markers.

    Parameters
    ----------
    root : the folder (created on first write).
    """

    def __init__(self, root: str):
        self.root = os.path.abspath(root)

    def path(self, *parts: str) -> str:
        return os.path.join(self.root, *parts)

    def exists(self, *parts: str) -> bool:
        return os.path.exists(self.path(*parts))

    def write_json(self, name: str, obj: Any) -> str:
        """Write ``obj`` atomically; a mapping gets the schema stamp (``hqjax._schema``)
        unless it already carries one."""
        p = self.path(name)
        if isinstance(obj, dict) and "schema_version" not in obj:
            obj = stamp(_kind(name), obj)
        atomic_write_json(p, obj)
        return p

    def write_bytes(self, name: str, data: bytes) -> str:
        p = self.path(name)
        atomic_write_bytes(p, data)
        return p

    def read_json(self, name: str) -> Any:
        p = self.path(name)
        if not os.path.exists(p):
            raise FileNotFoundError(f"{p} does not exist: run the stage that writes it first (hqjax run --out {self.root})")
        return read_json(p)

    # ------------------------------------------------------------------ markers
    def marker(self, stage: str) -> dict | None:
        p = self.path("stages", f"{stage}.json")
        return read_json(p) if os.path.exists(p) else None

    def is_done(self, stage: str, fingerprint: str) -> bool:
        m = self.marker(stage)
        return m is not None and m.get("fingerprint") == fingerprint

    def mark_done(self, stage: str, fingerprint: str, seconds: float, **info) -> None:
        self.write_json(os.path.join("stages", f"{stage}.json"),
                        {"stage": stage, "fingerprint": fingerprint, "seconds": round(seconds, 3),
                         "finished_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), **info})

    def clear(self, stage: str) -> None:
        p = self.path("stages", f"{stage}.json")
        if os.path.exists(p):
            os.remove(p)

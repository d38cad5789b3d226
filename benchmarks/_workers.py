"""Work shared by worker processes: each unit runs once, on whichever worker takes it first.

A unit is taken by creating its claim file exclusively (``O_CREAT | O_EXCL``, atomic on a
local file system) and finished by creating ``<claim>.done``. Claims live in a folder of
their own per run, so a run that was stopped leaves nothing that blocks the next one: work
finished before is found in the results files, not in the claims.
"""

from __future__ import annotations

import os
import re
import subprocess
import time

__all__ = ["Claims", "run_workers"]


class Claims:
    """Exclusive claims on named units of work, in ``folder``."""

    def __init__(self, folder: str):
        self.folder = folder
        os.makedirs(folder, exist_ok=True)

    def _path(self, name: str) -> str:
        return os.path.join(self.folder, re.sub(r"[^A-Za-z0-9_.-]", "-", name))

    def take(self, name: str) -> bool:
        """True for exactly one caller per ``name`` over all processes."""
        try:
            os.close(os.open(self._path(name), os.O_CREAT | os.O_EXCL | os.O_WRONLY))
            return True
        except FileExistsError:
            return False

    def finish(self, name: str) -> None:
        open(self._path(name) + ".done", "w").close()

    def finished(self, name: str) -> bool:
        return os.path.exists(self._path(name) + ".done")

    def count_finished(self, prefix: str = "") -> int:
        return sum(f.endswith(".done") and f.startswith(prefix) for f in os.listdir(self.folder))


def run_workers(cmds: list[list[str]], logs: list[str], env: dict, *, poll: float = 2.0, on_poll=None) -> None:
    """Run one process per command, each writing to its log; stop them all as soon as one fails.

    ``on_poll()`` is called every ``poll`` seconds while they run (progress display)."""
    files = [open(path, "w") for path in logs]
    procs = [subprocess.Popen(c, stdout=f, stderr=subprocess.STDOUT, env=env) for c, f in zip(cmds, files)]
    try:
        while True:
            codes = [p.poll() for p in procs]
            bad = next(((i, c) for i, c in enumerate(codes) if c), None)
            if bad is not None:
                raise SystemExit(f"worker {bad[0]} failed (exit {bad[1]}); see {logs[bad[0]]}")
            if all(c == 0 for c in codes):
                return
            if on_poll is not None:
                on_poll()
            time.sleep(poll)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
        for f in files:
            f.close()

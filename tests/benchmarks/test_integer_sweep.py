"""benchmarks/integer_sweep.py: configurations of one network and their compiled forwards."""

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "benchmarks"))

import integer_sweep  # noqa: E402


def test_quick_run_compiles_the_shared_program_once_and_prints_the_figure(capsys):
    integer_sweep.main(["--quick", "--repeats", "1"])
    out = capsys.readouterr().out.strip().splitlines()
    rows = [line.split(" | ") for line in out if line.startswith("| shared ")]
    assert len(rows) == 3 and sum(int(r[3]) for r in rows) == 1  # three configurations, one compilation
    assert out[-1].startswith("3 configurations evaluated twice each") and "shared 1 compilation(s)" in out[-1]

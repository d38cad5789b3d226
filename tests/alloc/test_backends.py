"""OR-Tools backends: what native solver code prints stays out of a command's output."""

import os
def test_native_solver_output_goes_to_the_log_not_stdout(capfd, caplog):
    # What HiGHS does regardless of output_flag: C printf into the process's stdout.
    import ctypes
    import logging

    from hqjax.alloc._backends import _native_output_to_log

    libc = ctypes.CDLL(None)
    with caplog.at_level(logging.DEBUG, logger="hqjax"):
        with _native_output_to_log("HIGHS"):
            libc.printf(b"HighsMipSolverData::transformNewIntegerFeasibleSolution tmpSolver.run();\n")
            os.write(1, b"raw fd write\n")
    libc.fflush(None)
    out = capfd.readouterr().out
    assert "HighsMipSolverData" not in out and "raw fd write" not in out
    assert "HIGHS: HighsMipSolverData::transformNewIntegerFeasibleSolution" in caplog.text
    assert "HIGHS: raw fd write" in caplog.text
    print("after")  # stdout works again
    assert capfd.readouterr().out == "after\n"

"""`python -m tests.kvstore_jumped_clock SECONDS kvstore-args...`: a kvstore process whose wall clock
(`time.time`) runs SECONDS ahead, as after a clock jump (tests/cluster/test_staleness.py). Not a
test module."""

from __future__ import annotations

import runpy
import sys
import time

if __name__ == "__main__":
    offset = float(sys.argv[1])
    real_time = time.time
    time.time = lambda: real_time() + offset  # every module reads time.time through `time`
    sys.argv = ["kvstore", *sys.argv[2:]]
    runpy.run_module("kvstore", run_name="__main__")

"""Tests for kvstore.routing.ring: balance, minimal movement, hash tags, determinism, partitioning.

The balance/movement tests route 1M deterministic keys. Each key is hashed once to its slot
(``slot_of``) and routed with ``Ring.shard_for_slot``; ``test_shard_for_is_slot_then_route`` pins
that this is exactly what ``shard_for`` does, so the fast path tests the real mapping.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from kvstore.routing.ring import Ring


def test_mapping_is_stable_across_processes() -> None:
    # Different PYTHONHASHSEEDs: nothing may depend on Python's randomized hash().
    code = (
        "from kvstore.routing.ring import Ring; r = Ring([4, 1, 9]); "
        "print([r.shard_for(b'k%d' % i) for i in range(300)])"
    )
    root = Path(__file__).resolve().parents[2]
    outputs = set()
    for seed in ("1", "2"):
        env = {**os.environ, "PYTHONHASHSEED": seed}
        res = subprocess.run(
            [sys.executable, "-c", code], cwd=root, env=env, capture_output=True, text=True, check=True
        )
        outputs.add(res.stdout)
    ring = Ring([4, 1, 9])
    assert outputs == {str([ring.shard_for(b"k%d" % i) for i in range(300)]) + "\n"}

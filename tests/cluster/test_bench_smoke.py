"""Smoke test of `kvstore bench` (loadtests/): a tiny slice of the real harness, not a timed test.

Runs the LMDB ceiling, the gRPC echo ceiling (its own server process) and one kvstore scenario per
kind (a put, a strong get, a multi_put) for about a second each against a real 1x3 cluster, then checks
that each produced a positive rate and that the JSON document the bench writes is well formed.
No throughput is asserted: other work shares this machine.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from kvstore import AsyncClient
from kvstore.cluster.local import LocalCluster

LOADTESTS = Path(__file__).resolve().parents[2] / "loadtests"
sys.path.insert(0, str(LOADTESTS))

import bench  # noqa: E402
import bench_lib as lib  # noqa: E402
import ceilings as ceil  # noqa: E402
import render_results  # noqa: E402

pytestmark = pytest.mark.timeout(150)


def tiny_config(work: Path) -> lib.BenchConfig:
    config = lib.BenchConfig.make(True, work, concurrency=8)
    config.seconds, config.warmup_seconds = 1.0, 0.2
    config.keyspace = 500
    (work / "logs").mkdir(parents=True, exist_ok=True)
    return config


def check_row(row: dict[str, Any]) -> None:
    assert row["rate"] > 0, row
    assert row["calls"] > 0 and row["errors"] == 0, row
    assert 0 < row["p50_ms"] <= row["p99_ms"], row
    assert row["unit"] in ("ops", "keys")


async def test_bench_slice_produces_rates_and_well_formed_json(tmp_path: Path, make_cluster: Any) -> None:
    config = tiny_config(tmp_path / "work")
    results = lib.Results()
    started = time.time()

    ceil.lmdb_ceilings(config, results, seconds=0.3)
    await ceil.echo_ceilings(config, results)
    cluster: LocalCluster = make_cluster(shards=1)
    async with AsyncClient.from_cluster(cluster.dir) as kv:
        await bench.preload(kv, 0, config.keyspace)
        buckets = bench.keys_by_shard(cluster, config.keyspace)
        ops = {
            name: (op, per_call, ceiling)
            for name, op, per_call, ceiling, _ in bench.kv_ops(kv, config.keyspace, buckets, seed=1)
        }
        for name in ("put", "get strong", "multi_put 100"):
            op, per_call, ceiling = ops[name]
            measured = await ceil.measure(config, op)
            unit = "ops" if per_call == 1 else "keys"
            results.add(
                lib.Row("kvstore", bench.scenario(name, 1, "smart"), unit, per_call, measured, ceiling)
            )

    document = json.loads(json.dumps(bench.build_document(config, results, started)))
    out = lib.write_json(tmp_path / "results" / "bench.json", document)
    assert json.loads(out.read_text()) == document

    rows = {row["scenario"]: row for row in document["rows"]}
    expected = {
        ceil.LMDB_PUT_SYNC, ceil.LMDB_PUT_BATCH, ceil.LMDB_GET,
        ceil.ECHO_UNARY, ceil.ECHO_MULTI_GET, ceil.ECHO_MULTI_PUT, ceil.ECHO_UNARY_ONE,
        "kv put 1x3 smart", "kv get strong 1x3 smart", "kv multi_put 100 1x3 smart",
    }  # fmt: skip
    assert set(rows) == expected
    for row in rows.values():
        check_row(row)
    assert rows[ceil.LMDB_PUT_BATCH]["per_call"] == 1000
    # A row whose ceiling ran has a positive ratio; the pysyncobj ceiling did not run in this slice.
    strong = rows["kv get strong 1x3 smart"]
    assert strong["ceiling"] == ceil.ECHO_UNARY and strong["ratio"] > 0
    assert rows["kv put 1x3 smart"]["ratio"] is None
    # Batched rows count keys: 100 per successful call.
    multi = rows["kv multi_put 100 1x3 smart"]
    assert multi["unit"] == "keys" and multi["rate"] == pytest.approx(
        100 * multi["calls"] / multi["seconds"], 0.01
    )

    assert document["client_model"]["in_flight"] == 8
    assert set(document["code"]) == {"commit", "dirty"}
    assert document["machine"]["nproc"] >= 1 and document["machine"]["grpcio"]
    verdicts = {t["target"]: t["verdict"] for t in document["targets"]}
    assert set(verdicts.values()) <= {"MET", "NOT MET", "NOT MEASURED"}
    # Targets whose inputs this slice did not measure must say so rather than guess.
    assert verdicts["multi_put 100 >= 100,000 keys/s on 3 shards"] == "NOT MEASURED"
    assert verdicts["replica RSS flat within +-20% over the write run"] == "NOT MEASURED"
    assert document["table_markdown"].count("\n") == len(expected) + 1

    # The published block (docs/performance.md) is rendered from this very document.
    block = render_results.render(document)
    assert document["table_markdown"].strip() in block
    assert "| multi_put 100 >= 100,000 keys/s on 3 shards | - | **NOT MEASURED** |" in block
    assert "not measured in this run" in block
    page = f"intro\n{render_results.BEGIN}\nold numbers\n{render_results.END}\noutro\n"
    updated = render_results.replace_block(page, block)
    assert "old numbers" not in updated and updated.startswith("intro\n") and updated.endswith("outro\n")
    assert block in updated


def test_profile_summary_ranks_self_and_inclusive_time() -> None:
    collapsed = "\n".join(
        [
            "thread (1): MainThread;main (kvstore/cli.py:10);handler (kvstore/server/node.py:5) 30",
            "thread (1): MainThread;main (kvstore/cli.py:10);handler (kvstore/server/node.py:6);"
            "encode (x/codec.py:3) 50",
            "thread (2): Thread-1 (_autoTickThread);_onTick (pysyncobj/syncobj.py:700) 20",
        ]
    )
    summary = bench.summarize_profile(collapsed)
    assert summary["samples"] == 100
    assert summary["self"][0] == {"function": "encode (x/codec.py)", "samples": 50, "share": 0.5}
    inclusive = {e["function"]: e["samples"] for e in summary["inclusive"]}
    assert inclusive["handler (kvstore/server/node.py)"] == 80  # lines of one function aggregate
    assert "main (kvstore/cli.py)" not in inclusive  # boilerplate frames are left out
    threads = {e["function"]: e["samples"] for e in summary["threads"]}
    assert threads == {"MainThread": 80, "Thread-1 (_autoTickThread)": 20}


def test_rss_summary_reports_deviation_from_first_sample() -> None:
    samples = {
        "s0r0": [
            {"t": 0, "VmRSS": 100_000, "RssAnon": 50_000},
            {"t": 5, "VmRSS": 130_000, "RssAnon": 55_000},
            {"t": 10, "VmRSS": 90_000, "RssAnon": 45_000},
        ]
    }
    summary = bench.summarize_rss(samples, "s0r0")
    replica = summary["replicas"]["s0r0"]
    assert replica["max_deviation_from_first"] == pytest.approx(0.3)
    assert replica["spread"] == pytest.approx(40_000 / 90_000, abs=1e-4)
    assert summary["worst_deviation"] == pytest.approx(0.3)
    assert replica["anon_max_deviation_from_first"] == pytest.approx(0.1)
    assert summary["worst_anon_deviation"] == pytest.approx(0.1)


async def test_the_put_trace_cuts_every_put_into_its_segments(tmp_path: Path) -> None:
    # loadtests/trace_put.py: the tool behind docs/performance.md's 1-in-flight latency path.
    import trace_put

    found = await trace_put.trace(puts=40, seconds=30.0, work=tmp_path)
    # Every put's timeline had every step (an election mid-run could skip a few, not most).
    assert len(found["total"]) >= 30, {k: len(v) for k, v in found.items()}
    for label, _, _ in trace_put.STEPS:
        assert len(found[label]) == len(found["total"]) and min(found[label]) >= 0, label
    # The segments partition each put: their sum is its total.
    put_sums = [sum(found[label][i] for label, _, _ in trace_put.STEPS) for i in range(len(found["total"]))]
    assert put_sums == pytest.approx(found["total"], abs=1e-6)
    assert "KVSTORE_TRACE_DIR" not in os.environ  # only the traced cluster's nodes were traced

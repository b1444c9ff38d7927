"""The data commands as a script uses them: `python -m kvstore ...` as a subprocess against a real
2-shard cluster. Binary values from stdin, binary keys in hex, JSON documents, revisions for cas,
notes on stderr, the exit statuses of `kvstore --help`, a closed pipe, KVSTORE_CLUSTER."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from kvstore import Client
from kvstore.cli_bytes import json_bytes
from kvstore.cli_kv import (
    EXIT_NOT_FOUND,
    EXIT_OK,
    EXIT_PIPE_CLOSED,
    EXIT_REFUSED,
    EXIT_STORE_ERROR,
    EXIT_USAGE,
)
from kvstore.cluster.local import LocalCluster, free_ports
from kvstore.config import Limits
from tests.conftest import running_cluster

BINARY_KEY = b"bin\xff\x00key"  # not UTF-8, and a NUL no argv can carry: typed in hex


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    with running_cluster(tmp_path_factory.mktemp("cli"), shards=2, replicas=1) as started:
        yield started


def kvstore(
    *args: str, stdin: bytes = b"", env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[bytes]:
    """Run the CLI as a script would; KVSTORE_CLUSTER only when `env` sets it."""
    environment = {k: v for k, v in os.environ.items() if k != "KVSTORE_CLUSTER"} | (env or {})
    return subprocess.run(
        [sys.executable, "-m", "kvstore", *args],
        input=stdin,
        capture_output=True,
        timeout=60,
        env=environment,
    )


def at(cluster: LocalCluster, *args: str, stdin: bytes = b"") -> subprocess.CompletedProcess[bytes]:
    return kvstore("--cluster", str(cluster.dir), *args, stdin=stdin)


def document(done: subprocess.CompletedProcess[bytes]) -> Any:
    assert done.stdout.count(b"\n") == 1, done.stdout[:200]  # one JSON document, one line
    return json.loads(done.stdout)


def no_traceback(done: subprocess.CompletedProcess[bytes]) -> None:
    assert b"Traceback" not in done.stderr, done.stderr.decode(errors="replace")


def test_a_binary_value_just_under_the_limit_round_trips_from_stdin(cluster: LocalCluster) -> None:
    limit = Limits().max_value_bytes  # 1 MiB: what the cluster's nodes run with
    value = b"\xff\xfe" + os.urandom(limit - 3)  # not UTF-8 whatever the random part is
    put = at(cluster, "put", "--hex", BINARY_KEY.hex(), "-", stdin=value)
    assert put.returncode == EXIT_OK and put.stderr == b"", put.stderr
    assert put.stdout.startswith(b"OK revision=")
    revision = int(put.stdout.split(b"=")[1])

    as_hex = document(at(cluster, "get", "--hex", "--json", BINARY_KEY.hex()))
    assert as_hex["value_hex"] == value.hex() and as_hex["key_hex"] == BINARY_KEY.hex()
    assert as_hex["found"] is True and as_hex["revision"] == revision
    assert as_hex["shard"] == cluster.cluster_map().slots.shard_for(BINARY_KEY)
    plain = at(cluster, "get", "--hex", BINARY_KEY.hex())
    assert plain.stdout == value.hex().encode() + b"\n"

    too_big = at(cluster, "put", "big", "-", stdin=value + b"xy")  # max_value_bytes + 1
    assert too_big.returncode == EXIT_STORE_ERROR and too_big.stdout == b""
    assert too_big.stderr.startswith(b"error (invalid_argument): ") and too_big.stderr.count(b"\n") == 1
    no_traceback(too_big)


def test_binary_keys_and_values_in_hex_and_json(cluster: LocalCluster, tmp_path: Path) -> None:
    key, value = b"hex:\x00\x01\xfe", b"v\xc3\x28\n\t"
    put = at(cluster, "put", "--hex", key.hex(), value.hex())
    assert put.returncode == EXIT_OK
    revision = int(put.stdout.removeprefix(b"OK revision="))
    assert at(cluster, "get", "--hex", key.hex()).stdout == value.hex().encode() + b"\n"
    scanned = document(at(cluster, "scan", "--prefix", "hex:", "--json"))
    assert scanned == {
        "items": [{"key_b64": "aGV4OgAB/g==", "value_b64": "dsMoCgk=", "revision": revision}],
        "continuation": None,
    }
    assert json_bytes(scanned["items"][0], "key") == key
    lines = at(cluster, "scan", "--hex", "--prefix", b"hex:".hex()).stdout
    assert lines == key.hex().encode() + b"\t" + value.hex().encode() + b"\n"

    source = tmp_path / "value.bin"
    source.write_bytes(b"\x00from a file\xff")
    assert at(cluster, "put", "file:k", "--file", str(source)).returncode == EXIT_OK
    assert at(cluster, "get", "file:k").stdout == source.read_bytes()  # plain, to a pipe: exactly the bytes
    assert at(cluster, "put", "dash", "--value", "-").returncode == EXIT_OK  # a literal "-"
    assert at(cluster, "get", "dash").stdout == b"-"
    assert at(cluster, "put", "dash", "-", stdin=b"from stdin").returncode == EXIT_OK
    assert at(cluster, "get", "dash").stdout == b"from stdin"


def test_multi_get_answers_per_key_across_shards(cluster: LocalCluster) -> None:
    ring = cluster.cluster_map().slots
    keys = [f"mg:{i}".encode() for i in range(12)]
    assert {ring.shard_for(k) for k in keys} == {0, 1}
    with Client.from_cluster(cluster.dir) as kv:
        revisions = kv.put_many({k: b"value " + k for k in keys}, atomic=False)
    names = [k.decode() for k in keys]
    both = at(cluster, "multi-get", "--json", *names)
    assert both.returncode == EXIT_OK, both.stderr
    items = document(both)["items"]
    assert [i["key"] for i in items] == names and all(i["found"] for i in items)
    assert [i["value"] for i in items] == [f"value {n}" for n in names]
    assert [i["shard"] for i in items] == [ring.shard_for(k) for k in keys]
    assert [i["revision"] for i in items] == [revisions[ring.shard_for(k)] for k in keys]

    missing = at(cluster, "multi-get", "mg:0", "mg:absent")
    assert missing.returncode == EXIT_NOT_FOUND
    assert missing.stdout == b"mg:0\tvalue mg:0\n" and missing.stderr == b"(not found: mg:absent)\n"
    absent = document(at(cluster, "multi-get", "--json", "mg:absent"))["items"][0]
    assert absent == {
        "key": "mg:absent",
        "found": False,
        "value": None,
        "revision": None,
        "shard": ring.shard_for(b"mg:absent"),
    }


def test_cas_with_the_revision_get_shows(cluster: LocalCluster) -> None:
    assert at(cluster, "cas", "cas:k", "first", "--expected-revision", "0").returncode == EXIT_OK
    revision = document(at(cluster, "get", "--json", "cas:k"))["revision"]
    won = at(cluster, "cas", "cas:k", "second", "--expected-revision", str(revision))
    assert won.returncode == EXIT_OK and won.stdout.startswith(b"OK revision=")
    new_revision = int(won.stdout.split(b"=")[1])
    assert new_revision > revision

    lost = at(cluster, "cas", "cas:k", "third", "--expected-revision", str(revision))
    assert lost.returncode == EXIT_REFUSED and lost.stdout == b""
    assert lost.stderr.decode() == (
        f"CONFLICT: the key is at revision {new_revision}, expected revision {revision}; nothing written\n"
    )
    refused = document(at(cluster, "cas", "--json", "cas:k", "third", "--expected-revision", "0"))
    shard = cluster.cluster_map().slots.shard_for(b"cas:k")
    assert refused == {
        "key": "cas:k",
        "succeeded": False,
        "revision": None,
        "expected_revision": 0,
        "shard": shard,
        "current": {"value": "second", "revision": new_revision},
    }
    removed = document(at(cluster, "delete", "--json", "cas:k"))
    assert removed["deleted"] is True and removed["shard"] == shard and removed["revision"] > new_revision
    assert at(cluster, "cas", "cas:k", "back", "--expected-revision", "0").returncode == EXIT_OK
    assert at(cluster, "get", "cas:k").stdout == b"back"


def test_exit_statuses_and_notes_on_stderr(cluster: LocalCluster) -> None:
    assert at(cluster, "put", "gone", "x").returncode == EXIT_OK
    deleted = at(cluster, "delete", "gone")
    assert (deleted.returncode, deleted.stdout, deleted.stderr) == (EXIT_OK, b"deleted\n", b"")
    for command in ("get", "delete"):
        missing = at(cluster, command, "gone")
        assert missing.returncode == EXIT_NOT_FOUND, command
        assert (missing.stdout, missing.stderr) == (b"", b"(not found: gone)\n"), command
    not_found = document(at(cluster, "get", "--json", "gone"))
    assert not_found["found"] is False and not_found["value"] is None and not_found["revision"] is None

    for i in range(3):
        assert at(cluster, "put", f"page:{i}", str(i)).returncode == EXIT_OK
    page = at(cluster, "scan", "--prefix", "page:", "--limit", "2")
    assert page.returncode == EXIT_OK and page.stdout == b"page:0\t0\npage:1\t1\n"
    assert page.stderr == b"(more after page:1: resume with --continuation page:1)\n"
    rest = at(cluster, "scan", "--prefix", "page:", "--limit", "2", "--continuation", "page:1")
    assert (rest.stdout, rest.stderr) == (b"page:2\t2\n", b"")
    first = document(at(cluster, "scan", "--json", "--prefix", "page:", "--limit", "2"))
    assert [i["key"] for i in first["items"]] == ["page:0", "page:1"] and first["continuation"] == "page:1"

    dead = f"127.0.0.1:{free_ports(1)[0]}"  # nobody listens: the store cannot answer
    unanswered = kvstore("--router", dead, "get", "k", "--timeout", "1")
    assert unanswered.returncode == EXIT_STORE_ERROR and unanswered.stdout == b""
    assert re.match(rb"error \((unavailable|timeout)\): \S", unanswered.stderr), unanswered.stderr
    assert unanswered.stderr.count(b"\n") == 1

    usage = at(cluster, "get", "--hex", "not-hex")
    assert usage.returncode == EXIT_USAGE and usage.stdout == b""
    assert b"key 'not-hex' is not hexadecimal" in usage.stderr
    no_traceback(usage)


def test_a_bad_consistency_spelling_lists_the_valid_forms(cluster: LocalCluster) -> None:
    assert at(cluster, "put", "level", "x").returncode == EXIT_OK
    for spelling in ("bounded:0.5s", "bounded0.5", "bounded:0.5", "session"):
        assert at(cluster, "get", "level", "--consistency", spelling).stdout == b"x", spelling
    bad = at(cluster, "scan", "--consistency", "bounded:soon")
    assert bad.returncode == EXIT_USAGE and bad.stdout == b""
    assert b"valid forms: strong, session, eventual, bounded:SECONDS (e.g. bounded:0.5s" in bad.stderr
    no_traceback(bad)


def test_scan_into_a_closed_pipe_stops_quietly(cluster: LocalCluster, tmp_path: Path) -> None:
    with Client.from_cluster(cluster.dir) as kv:  # ~800 KB of output: far more than a pipe holds
        kv.put_many({b"pipe:%04d" % i: b"x" * 2000 for i in range(400)}, atomic=False)
    stderr = tmp_path / "stderr"
    script = (
        f"set -o pipefail; {sys.executable} -m kvstore --cluster {cluster.dir} scan --prefix pipe: "
        f"--limit 1000 2>{stderr} | head -1"
    )
    done = subprocess.run(["bash", "-c", script], capture_output=True, timeout=60)
    assert done.stdout == b"pipe:0000\t" + b"x" * 2000 + b"\n"
    assert done.returncode == EXIT_PIPE_CLOSED  # the CLI's status (pipefail): head exits 0
    assert stderr.read_bytes() == b""  # no traceback, no "Exception ignored"


def test_kvstore_cluster_names_the_default_cluster(cluster: LocalCluster) -> None:
    env = {"KVSTORE_CLUSTER": str(cluster.dir)}
    assert kvstore("put", "env:k", "from the environment", env=env).returncode == EXIT_OK
    assert kvstore("get", "env:k", env=env).stdout == b"from the environment"
    wrong = {"KVSTORE_CLUSTER": "/no/such/cluster"}
    flag_wins = kvstore("get", "env:k", "--cluster", str(cluster.dir), env=wrong)
    assert flag_wins.returncode == EXIT_OK and flag_wins.stdout == b"from the environment"
    nowhere = kvstore("get", "env:k", env=wrong)
    assert nowhere.returncode == EXIT_USAGE and b"no cluster map at /no/such/cluster" in nowhere.stderr
    unnamed = kvstore("get", "env:k")
    assert unnamed.returncode == EXIT_USAGE and b"KVSTORE_CLUSTER=DIR" in unnamed.stderr


def test_version_names_the_installed_package() -> None:
    from importlib.metadata import version

    done = kvstore("--version")
    assert done.returncode == EXIT_OK and done.stdout == f"kvstore {version('kvstore')}\n".encode()

"""The ceilings `kvstore bench` measures in the same run as kvstore, with the same client model.

- grpc echo: a bare grpc.aio + uvloop server (its own process) answering kvstore's own KV messages
  with no storage and no Raft: unary Get, and batched MultiGet / MultiPut of 100 keys;
- pysyncobj: a bare 3-replica `ReplDict` (three processes, appendEntriesUseBatch=False) written by
  `concurrency` synchronous caller threads inside the leader's process: single `set`s, and `update`s
  of 100 keys (one Raft entry each);
- LMDB: raw puts (one synced transaction per put; 1,000 per synced transaction) and gets (one read
  transaction per get), opened with kvstore's own flags, in the bench process.

Run as a script, this file is the helper processes: `ceilings.py echo --listen ADDR` and
`ceilings.py syncobj --self A --peers B,C ...`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import shutil
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_lib as lib  # noqa: E402

from kvstore.config import grpc_message_options  # noqa: E402

ECHO_UNARY = "ceiling grpc echo unary (Get)"
ECHO_UNARY_ONE = "ceiling grpc echo unary, 1 in flight"  # what gRPC in Python costs a call
ECHO_MULTI_GET = "ceiling grpc echo batched (MultiGet 100)"
ECHO_MULTI_PUT = "ceiling grpc echo batched (MultiPut 100)"
SYNCOBJ_SET = "ceiling pysyncobj set"
SYNCOBJ_SET_ONE = "ceiling pysyncobj set, 1 in flight"  # a Raft round, no fsync, no gRPC
SYNCOBJ_MSET = "ceiling pysyncobj update 100"
LMDB_PUT_SYNC = "ceiling lmdb put, 1 synced txn each"
LMDB_PUT_BATCH = "ceiling lmdb put, 1000 per synced txn"
LMDB_GET = "ceiling lmdb get, 1 read txn each"
CHANNEL_OPTIONS = grpc_message_options(64 << 20)


# ----- grpc echo -----------------------------------------------------------------------------------


def _echo_server_main(argv: list[str]) -> None:
    """A KV server that does no work: the cost of Python gRPC alone, with kvstore's messages."""
    import grpc
    import uvloop

    from kvstore.proto import kvstore_pb2 as pb
    from kvstore.proto import kvstore_pb2_grpc as pb_grpc

    parser = argparse.ArgumentParser()
    parser.add_argument("--listen", required=True)
    args = parser.parse_args(argv)

    def header() -> Any:
        return pb.ResponseHeader(shard=0, revision=12345, term=3, epoch=1, served_by="echo")

    class Echo(pb_grpc.KVServicer):
        async def Get(self, request: Any, context: Any) -> Any:  # noqa: N802 (gRPC method names)
            kv = pb.KeyValue(key=request.key, value=lib.VALUE, revision=12345)
            return pb.GetResponse(header=header(), found=True, kv=kv)

        async def Put(self, request: Any, context: Any) -> Any:  # noqa: N802
            return pb.PutResponse(header=header())

        async def MultiGet(self, request: Any, context: Any) -> Any:  # noqa: N802
            n = len(request.keys)
            return pb.MultiGetResponse(
                header=header(), keys=request.keys, values=[lib.VALUE] * n, revisions=[12345] * n
            )

        async def MultiPut(self, request: Any, context: Any) -> Any:  # noqa: N802
            return pb.MultiPutResponse(header=header())

    async def serve() -> None:
        server = grpc.aio.server(options=CHANNEL_OPTIONS)
        pb_grpc.add_KVServicer_to_server(Echo(), server)
        server.add_insecure_port(args.listen)
        await server.start()
        await server.wait_for_termination()

    uvloop.run(serve())


async def echo_ceilings(config: lib.BenchConfig, results: lib.Results) -> None:
    import grpc

    from kvstore.proto import kvstore_pb2 as pb
    from kvstore.proto import kvstore_pb2_grpc as pb_grpc

    address = f"127.0.0.1:{lib.free_port()}"
    proc = lib.spawn([sys.executable, __file__, "echo", "--listen", address], config.work / "logs/echo.log")
    channel = None
    try:
        await asyncio.to_thread(lib.wait_for_port, address, 30.0, proc)
        channel = grpc.aio.insecure_channel(address, options=CHANNEL_OPTIONS)
        stub = pb_grpc.KVStub(channel)
        read = pb.ReadOptions(consistency=pb.EVENTUAL)
        rand = random.Random(1).randrange
        n = config.keyspace

        def get(i: int) -> Any:
            return stub.Get(pb.GetRequest(key=lib.key(rand(n)), read=read), timeout=5.0)

        batches = lib.KeyBatches(lib.keys(n), seed=1)

        def multi_get(i: int) -> Any:
            return stub.MultiGet(pb.MultiGetRequest(keys=batches[i], read=read), timeout=5.0)

        def multi_put(i: int) -> Any:
            values = [lib.VALUE] * lib.BATCH
            request = pb.MultiPutRequest(keys=batches[i], values=values, request_id=b"r" * 16)
            return stub.MultiPut(request, timeout=5.0)

        for name, op, per_call in (
            (ECHO_UNARY, get, 1),
            (ECHO_MULTI_GET, multi_get, lib.BATCH),
            (ECHO_MULTI_PUT, multi_put, lib.BATCH),
        ):
            unit = "ops" if per_call == 1 else "keys"
            results.add(lib.Row("ceiling", name, unit, per_call, await measure(config, op)))
        # Latency: one call at a time, the floor under `kv put 1x3 smart, 1 in flight`.
        results.add(lib.Row("ceiling", ECHO_UNARY_ONE, "ops", 1, await measure(config, get, concurrency=1)))
    finally:
        if channel is not None:
            await channel.close()
        lib.stop(proc)


async def measure(config: lib.BenchConfig, op: Any, concurrency: int | None = None) -> lib.Measurement:
    """A warm-up (discarded), then the measured run: the same bounds for every scenario."""
    conc = concurrency or config.concurrency
    await lib.drive(op, concurrency=conc, max_calls=config.max_calls, max_seconds=config.warmup_seconds)
    return await lib.drive(op, concurrency=conc, max_calls=config.max_calls, max_seconds=config.seconds)


# ----- bare pysyncobj ------------------------------------------------------------------------------


def _syncobj_main(argv: list[str]) -> None:
    """One replica of a bare ReplDict. The one that is leader runs the load and writes the results."""
    from pysyncobj import SyncObj, SyncObjConf
    from pysyncobj.batteries import ReplDict

    parser = argparse.ArgumentParser()
    parser.add_argument("--self", dest="me", required=True)
    parser.add_argument("--peers", required=True)
    parser.add_argument("--callers", type=int, required=True)
    parser.add_argument("--seconds", type=float, required=True)
    parser.add_argument("--warmup", type=float, required=True)
    parser.add_argument("--max-calls", type=int, required=True)
    parser.add_argument("--keyspace", type=int, required=True)
    parser.add_argument("--switch-interval", type=float, default=0.0005)
    parser.add_argument("--out", required=True)
    parser.add_argument("--linger", type=float, default=300.0)
    args = parser.parse_args(argv)
    # The same GIL switch interval as a kvstore node (kvstore/server/node.py), so the tick thread
    # gets the same share against busy caller threads: the ceiling is not handicapped.
    sys.setswitchinterval(args.switch_interval)
    store = ReplDict()
    conf = SyncObjConf(appendEntriesUseBatch=False, dynamicMembershipChange=False)
    node = SyncObj(args.me, args.peers.split(","), conf, consumers=[store])
    deadline = time.monotonic() + 60.0
    while not (node._getLeader() is not None and node.isReady()) and time.monotonic() < deadline:
        time.sleep(0.05)
    if node._isLeader():
        # Whole or not at all: the bench reads the file as soon as it exists.
        tmp = Path(args.out + ".tmp")
        tmp.write_text(json.dumps(_syncobj_load(store, args)))
        tmp.replace(args.out)
    time.sleep(args.linger)  # until the bench stops us by PID (bounded in case it cannot)


def _syncobj_load(store: Any, args: argparse.Namespace) -> dict[str, Any]:
    rand = random.Random(2).randrange
    n = args.keyspace

    def put(i: int) -> None:
        store.set(lib.key(rand(n)), lib.VALUE, sync=True, timeout=5.0)

    batches = lib.KeyBatches(lib.keys(n), seed=2)

    def update(i: int) -> None:
        store.update({k: lib.VALUE for k in batches[i]}, sync=True, timeout=5.0)

    out: dict[str, Any] = {}
    for name, op, threads in (("set", put, args.callers), ("update", update, args.callers), ("set1", put, 1)):
        lib.drive_threads(op, threads=threads, max_calls=args.max_calls, max_seconds=args.warmup)
        m = lib.drive_threads(op, threads=threads, max_calls=args.max_calls, max_seconds=args.seconds)
        out[name] = asdict(m)
    return out


async def syncobj_ceilings(config: lib.BenchConfig, results: lib.Results) -> None:
    ports = [lib.free_port() for _ in range(3)]
    addresses = [f"127.0.0.1:{p}" for p in ports]
    out = config.work / "syncobj-result.json"
    out.unlink(missing_ok=True)
    procs = []
    try:
        for i, me in enumerate(addresses):
            cmd = [
                sys.executable,
                __file__,
                "syncobj",
                "--self",
                me,
                "--peers",
                ",".join(a for a in addresses if a != me),
                f"--callers={config.concurrency}",
                f"--seconds={config.seconds}",
                f"--warmup={config.warmup_seconds}",
                f"--max-calls={config.max_calls}",
                f"--keyspace={config.keyspace}",
                f"--out={out}",
            ]
            procs.append(lib.spawn(cmd, config.work / f"logs/syncobj-{i}.log"))
        budget = 60.0 + 3 * (config.seconds + config.warmup_seconds + 2 * lib.GRACE_SECONDS)
        deadline = time.monotonic() + budget
        while not out.exists() and time.monotonic() < deadline:
            if all(p.poll() is not None for p in procs):
                break
            await asyncio.sleep(0.2)
        if not out.exists():
            raise RuntimeError(
                f"bare pysyncobj produced no result in {budget:.0f}s (logs: {config.work}/logs)"
            )
        data = json.loads(out.read_text())
    finally:
        for proc in procs:
            lib.stop(proc)
    note = f"{config.concurrency} sync caller threads in the leader's process"
    for name, key, per_call in ((SYNCOBJ_SET, "set", 1), (SYNCOBJ_MSET, "update", lib.BATCH)):
        m = lib.Measurement(**data[key])
        unit = "ops" if per_call == 1 else "keys"
        results.add(lib.Row("ceiling", name, unit, per_call, m, note=note))
    m = lib.Measurement(**data["set1"])
    results.add(lib.Row("ceiling", SYNCOBJ_SET_ONE, "ops", 1, m, note="1 sync caller thread"))


# ----- LMDB ----------------------------------------------------------------------------------------


def lmdb_ceilings(config: lib.BenchConfig, results: lib.Results, seconds: float | None = None) -> None:
    """Raw LMDB from Python, with the flags kvstore's Storage uses (sync + metasync, no writemap)."""
    import lmdb

    path = config.work / "lmdb-ceiling"
    shutil.rmtree(path, ignore_errors=True)
    env = lmdb.open(str(path), map_size=1 << 30, sync=True, metasync=True, writemap=False, max_dbs=2)
    db = env.open_db(b"data")
    limit = seconds or config.seconds
    rand = random.Random(3).randrange
    n = 200_000
    try:

        def put_one(i: int) -> None:
            with env.begin(write=True, db=db) as txn:
                txn.put(lib.key(rand(n)), lib.VALUE)

        def put_batch(i: int) -> None:
            with env.begin(write=True, db=db) as txn:
                for _ in range(1000):
                    txn.put(lib.key(rand(n)), lib.VALUE)

        def get_one(i: int) -> None:
            with env.begin(db=db) as txn:
                txn.get(lib.key(rand(n)))

        # Fill the keyspace first so gets find their keys and puts update a realistic tree.
        for start in range(0, n, 10_000):
            with env.begin(write=True, db=db) as txn:
                for i in range(start, start + 10_000):
                    txn.put(lib.key(i), lib.VALUE)
        for name, op, per_call in (
            (LMDB_PUT_SYNC, put_one, 1),
            (LMDB_PUT_BATCH, put_batch, 1000),
            (LMDB_GET, get_one, 1),
        ):
            m = _timed_loop(op, config.max_calls * 4, limit)
            unit = "ops" if per_call == 1 else "keys"
            results.add(lib.Row("ceiling", name, unit, per_call, m, note="one thread, in the bench process"))
    finally:
        env.close()
        shutil.rmtree(path, ignore_errors=True)


def _timed_loop(op: Any, max_calls: int, seconds: float) -> lib.Measurement:
    """One caller, as tight as possible (the per-call timing is the only overhead)."""
    m = lib.Measurement()
    clock = time.perf_counter
    started = clock()
    deadline = started + seconds
    latencies = m.latencies
    for i in range(max_calls):
        t0 = clock()
        if t0 >= deadline:
            break
        op(i)
        latencies.append(clock() - t0)
    m.calls = len(latencies)
    m.seconds = clock() - started
    return m


# ----- the etcd peer (only with --etcd and an etcd binary on PATH; nothing is ever installed) ------

ETCD_PUT = "peer etcd put"
ETCD_PUT_ONE = "peer etcd put, 1 in flight"  # latency: one call at a time
ETCD_GET_SERIALIZABLE = "peer etcd get serializable"
ETCD_GET_LINEARIZABLE = "peer etcd get linearizable"
ETCD_TXN_PUTS = "peer etcd txn 100 puts"
ETCD_TXN_GETS = "peer etcd txn 100 gets (linearizable)"


def etcd_messages() -> dict[str, Any]:
    """The few messages of etcd's v3 API the bench uses, built at run time from their field numbers in
    etcd's api/etcdserverpb/rpc.proto (no generated code, no etcd Python package: the PyPI client
    does not work with every protobuf release). Fields the bench does not use are left out; protobuf
    keeps them as unknown fields when etcd sends them."""
    from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

    f = descriptor_pb2.FieldDescriptorProto
    u64, i64, byt, boo, txt = f.TYPE_UINT64, f.TYPE_INT64, f.TYPE_BYTES, f.TYPE_BOOL, f.TYPE_STRING
    many = True
    spec: dict[str, list[tuple[Any, ...]]] = {
        "ResponseHeader": [
            ("cluster_id", 1, u64),
            ("member_id", 2, u64),
            ("revision", 3, i64),
            ("raft_term", 4, u64),
        ],
        "KeyValue": [
            ("key", 1, byt),
            ("create_revision", 2, i64),
            ("mod_revision", 3, i64),
            ("version", 4, i64),
            ("value", 5, byt),
            ("lease", 6, i64),
        ],
        "PutRequest": [("key", 1, byt), ("value", 2, byt), ("lease", 3, i64), ("prev_kv", 4, boo)],
        "PutResponse": [("header", 1, "ResponseHeader")],
        "RangeRequest": [
            ("key", 1, byt),
            ("range_end", 2, byt),
            ("limit", 3, i64),
            ("revision", 4, i64),
            ("serializable", 7, boo),
        ],
        "RangeResponse": [
            ("header", 1, "ResponseHeader"),
            ("kvs", 2, "KeyValue", many),
            ("more", 3, boo),
            ("count", 4, i64),
        ],
        "RequestOp": [("request_range", 1, "RangeRequest"), ("request_put", 2, "PutRequest")],
        "ResponseOp": [("response_range", 1, "RangeResponse"), ("response_put", 2, "PutResponse")],
        "TxnRequest": [("success", 2, "RequestOp", many)],
        "TxnResponse": [
            ("header", 1, "ResponseHeader"),
            ("succeeded", 2, boo),
            ("responses", 3, "ResponseOp", many),
        ],
        "StatusRequest": [],
        "StatusResponse": [
            ("header", 1, "ResponseHeader"),
            ("version", 2, txt),
            ("dbSize", 3, i64),
            ("leader", 4, u64),
            ("raftIndex", 5, u64),
            ("raftTerm", 6, u64),
        ],
    }
    file = descriptor_pb2.FileDescriptorProto(
        name="kvstore_bench_etcd_subset.proto", package="etcdserverpb", syntax="proto3"
    )
    for name, fields in spec.items():
        message = file.message_type.add(name=name)
        for field_spec in fields:
            fname, number, kind = field_spec[:3]
            label = f.LABEL_REPEATED if len(field_spec) > 3 else f.LABEL_OPTIONAL
            if isinstance(kind, str):
                message.field.add(
                    name=fname,
                    number=number,
                    label=label,
                    type=f.TYPE_MESSAGE,
                    type_name=f".etcdserverpb.{kind}",
                )
            else:
                message.field.add(name=fname, number=number, label=label, type=kind)
    pool = descriptor_pool.DescriptorPool()
    pool.Add(file)
    return {
        name: message_factory.GetMessageClass(pool.FindMessageTypeByName(f"etcdserverpb.{name}"))
        for name in spec
    }


class EtcdStubs:
    def __init__(self, channel: Any, m: dict[str, Any]) -> None:
        def method(path: str, request: str, response: str) -> Any:
            return channel.unary_unary(
                path,
                request_serializer=m[request].SerializeToString,
                response_deserializer=m[response].FromString,
            )

        self.put = method("/etcdserverpb.KV/Put", "PutRequest", "PutResponse")
        self.range = method("/etcdserverpb.KV/Range", "RangeRequest", "RangeResponse")
        self.txn = method("/etcdserverpb.KV/Txn", "TxnRequest", "TxnResponse")
        self.status = method("/etcdserverpb.Maintenance/Status", "StatusRequest", "StatusResponse")


def etcd_command(binary: str, data: Path, name: str, client: int, peer: int, cluster: str) -> list[str]:
    client_url, peer_url = f"http://127.0.0.1:{client}", f"http://127.0.0.1:{peer}"
    return [
        binary, "--name", name, "--data-dir", str(data),
        "--listen-client-urls", client_url, "--advertise-client-urls", client_url,
        "--listen-peer-urls", peer_url, "--initial-advertise-peer-urls", peer_url,
        "--initial-cluster", cluster, "--initial-cluster-state", "new",
        "--initial-cluster-token", "kvstore-bench",
    ]  # fmt: skip


async def etcd_peer(config: lib.BenchConfig, results: lib.Results, binary: str) -> dict[str, Any]:
    """A 3-member etcd cluster on loopback, driven through its gRPC API by the same harness."""
    import grpc

    m = etcd_messages()
    ports = [(lib.free_port(), lib.free_port()) for _ in range(3)]
    cluster = ",".join(f"e{i}=http://127.0.0.1:{peer}" for i, (_, peer) in enumerate(ports))
    procs, channels = [], []
    try:
        for i, (client, peer) in enumerate(ports):
            cmd = etcd_command(binary, config.work / f"etcd/e{i}", f"e{i}", client, peer, cluster)
            procs.append(lib.spawn(cmd, config.work / f"logs/etcd-e{i}.log"))
        for proc, (client, _) in zip(procs, ports, strict=True):
            await asyncio.to_thread(lib.wait_for_port, f"127.0.0.1:{client}", 30.0, proc)
        channels = [grpc.aio.insecure_channel(f"127.0.0.1:{c}", options=CHANNEL_OPTIONS) for c, _ in ports]
        stubs = [EtcdStubs(ch, m) for ch in channels]
        leader, version = await _etcd_leader(stubs, m)
        await _etcd_rows(config, results, stubs, leader, m)
        return {"binary": binary, "version": version, "members": 3}
    finally:
        for channel in channels:
            await channel.close()
        for proc in procs:
            lib.stop(proc)


async def _etcd_leader(stubs: list[EtcdStubs], m: dict[str, Any]) -> tuple[EtcdStubs, str]:
    deadline = time.monotonic() + 60.0
    while time.monotonic() < deadline:
        for stub in stubs:
            try:
                status = await stub.status(m["StatusRequest"](), timeout=2.0)
            except Exception:
                continue
            if status.leader and status.leader == status.header.member_id:
                return stub, status.version
        await asyncio.sleep(0.3)
    raise TimeoutError("the etcd cluster elected no leader within 60s")


async def _etcd_rows(
    config: lib.BenchConfig,
    results: lib.Results,
    stubs: list[EtcdStubs],
    leader: EtcdStubs,
    m: dict[str, Any],
) -> None:
    rng = random.Random(4)
    n = config.keyspace
    put_req, range_req, txn_req, op = m["PutRequest"], m["RangeRequest"], m["TxnRequest"], m["RequestOp"]
    for first in range(0, n, lib.BATCH):  # the same keyspace the kvstore scenarios read
        ops = [
            op(request_put=put_req(key=lib.key(i), value=lib.VALUE)) for i in range(first, first + lib.BATCH)
        ]
        await leader.txn(txn_req(success=ops), timeout=10.0)

    def put(i: int) -> Any:
        return leader.put(put_req(key=lib.key(rng.randrange(n)), value=lib.VALUE), timeout=5.0)

    def get(serializable: bool) -> Any:
        def call(i: int) -> Any:
            stub = stubs[i % len(stubs)]  # round robin over the members, like kvstore's read policy
            return stub.range(
                range_req(key=lib.key(rng.randrange(n)), serializable=serializable), timeout=5.0
            )

        return call

    batches = lib.KeyBatches(lib.keys(n), seed=4)

    def txn_puts(i: int) -> Any:
        ops = [op(request_put=put_req(key=k, value=lib.VALUE)) for k in batches[i]]
        return leader.txn(txn_req(success=ops), timeout=5.0)

    def txn_gets(i: int) -> Any:
        ops = [op(request_range=range_req(key=k)) for k in batches[i]]
        return stubs[i % len(stubs)].txn(txn_req(success=ops), timeout=5.0)

    for name, call, per_call in (
        (ETCD_PUT, put, 1),
        (ETCD_GET_SERIALIZABLE, get(True), 1),
        (ETCD_GET_LINEARIZABLE, get(False), 1),
        (ETCD_TXN_PUTS, txn_puts, lib.BATCH),
        (ETCD_TXN_GETS, txn_gets, lib.BATCH),
    ):
        unit = "ops" if per_call == 1 else "keys"
        results.add(lib.Row("peer", name, unit, per_call, await measure(config, call)))
    results.add(lib.Row("peer", ETCD_PUT_ONE, "ops", 1, await measure(config, put, concurrency=1)))


if __name__ == "__main__":
    role, rest = sys.argv[1], sys.argv[2:]
    if role == "echo":
        _echo_server_main(rest)
    elif role == "syncobj":
        _syncobj_main(rest)
    else:
        raise SystemExit(f"unknown role {role!r} (echo | syncobj)")

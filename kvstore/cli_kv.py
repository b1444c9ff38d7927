"""The `kvstore` data commands (put, get, multi-get, delete, scan, cas, ring), for people and scripts.

stdout carries only data (values, `key<TAB>value` lines, JSON documents, `OK revision=N`); notes
such as "(not found: k)" go to stderr; the exit status says what happened (`EXIT_STATUS_HELP`, shown
by `kvstore --help` and in the README). Bytes are typed and printed as kvstore/cli_bytes.py says.
The commands send the SDK's request messages (`Client.send`), so what they print (a key's revision,
the shard that answered) is what the node's response says, not a summary of it.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
from typing import Any, BinaryIO

from kvstore.cli_bytes import ENCODING_HELP, UsageError, display, json_fields, parse_bytes, shown
from kvstore.config import MAX_VALUE_BYTES
from kvstore.consistency import Consistency, ReadConsistency
from kvstore.proto import kvstore_pb2 as pb

CLUSTER_ENV = "KVSTORE_CLUSTER"

EXIT_OK = 0
EXIT_NOT_FOUND = 1
EXIT_USAGE = 2  # argparse's own exit status for a bad command line
EXIT_REFUSED = 3
EXIT_STORE_ERROR = 4
EXIT_UNKNOWN_OUTCOME = 5
EXIT_INTERRUPTED = 130  # 128 + SIGINT, what a shell shows for a Ctrl-C'd tool
EXIT_PIPE_CLOSED = 141  # 128 + SIGPIPE, what a shell shows for a C tool whose reader went away

EXIT_STATUS_HELP = """\
exit status:
  0    success
  1    not found: get or delete of a missing key; multi-get with any key missing
       (cluster status: not healthy; cluster up/start: a replica did not come up,
       named on stderr; health: not SERVING)
  2    usage error: bad arguments, hex, consistency level or value source; no cluster
       named, or no cluster map in its directory; a cluster command that could not run
  3    refused: cas found the key at another revision (absent, or present for revision 0)
  4    an error from the store or the SDK (refused argument, unavailable, timeout, ...);
       stderr has one line: error (KIND): message
  5    unknown outcome: a write may or may not have applied (read the key before retrying)
  130  interrupted (Ctrl-C)
  141  stdout was closed before everything was written (e.g. `kvstore scan | head -1`)"""

TARGET_HELP = (
    f"where the cluster is: --cluster DIR (default: ${CLUSTER_ENV}), --router ADDR or\n"
    f"--endpoints A,B; a flag wins over ${CLUSTER_ENV}."
)

_VALUE_HELP = """\
value: exactly one of VALUE (text, or hex with --hex), `-` (stdin, read raw),
  --value V (a literal value, also `-` or one starting with `-`: --value=-x), --file F (raw)."""


def _consistency(text: str) -> ReadConsistency:
    try:
        return Consistency.parse(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def _seconds(text: str) -> float:
    try:
        seconds = float(text)
    except ValueError:
        seconds = float("nan")
    if not seconds > 0 or seconds == float("inf"):
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive number of seconds")
    return seconds


def _count(minimum: int) -> Any:
    def parse(text: str) -> int:
        try:
            number = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
        if number < minimum:
            raise argparse.ArgumentTypeError(f"{number} is below {minimum}")
        return number

    return parse


def add_data_commands(sub: Any, target: argparse.ArgumentParser) -> None:
    """The data commands' parsers; `target` carries --cluster/--router/--endpoints after the command."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--hex", action="store_true", help="keys and values typed and printed in hexadecimal (6b6579 = key)"
    )
    common.add_argument("--json", action="store_true", help="print one JSON document (see below)")
    common.add_argument(
        "--timeout",
        type=_seconds,
        default=10.0,
        metavar="SECONDS",
        help="give up after this long, retries included (default 10): exit 4 (timeout/unavailable), "
        "or 5 for a write whose outcome is unknown",
    )
    reads = argparse.ArgumentParser(add_help=False)
    reads.add_argument(
        "--consistency",
        type=_consistency,
        default=Consistency.STRONG,
        metavar="LEVEL",
        help=f"{Consistency.FORMS}; default strong",
    )

    def command(name: str, summary: str, details: str, exits: str, *parents: argparse.ArgumentParser) -> Any:
        """`summary` in `kvstore --help`'s list; with `details` atop the command's own help."""
        return sub.add_parser(
            name,
            help=summary,
            description=f"{summary}: {details}\n{TARGET_HELP}",
            epilog=f"{ENCODING_HELP}\n\nexit status: {exits} (kvstore --help lists them all)",
            parents=[target, common, *parents],
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )

    put = command(
        "put",
        "write a key",
        "prints OK revision=N (--json: key, revision, shard)",
        "0 written, 2 usage, 4 error, 5 unknown",
    )
    put.add_argument("key")
    _add_value_source(put)
    get = command(
        "get",
        "read a key",
        "prints its value's bytes exactly (a newline follows only on a terminal: `get k > file`\n"
        "restores the file); --hex: hex and a newline; --json: key, found, value, revision, shard\n"
        "(a missing key: found false, value and revision null)",
        "0 found, 1 not found, 2 usage, 4 error",
        reads,
    )
    get.add_argument("key")
    multi = command(
        "multi-get",
        "read several keys at once",
        "prints key<TAB>value lines for the keys found\n"
        "(--json: {items: [one get document per key, in order]}; through a router, shard is null\n"
        "when the keys span shards)",
        "0 all found, 1 any not found, 2 usage, 4 error",
        reads,
    )
    multi.add_argument("keys", nargs="+", metavar="KEY")
    delete = command(
        "delete",
        "delete a key",
        "prints deleted (--json: key, deleted, revision)",
        "0 deleted, 1 not found, 2 usage, 4 error, 5 unknown",
    )
    delete.add_argument("key")
    scan = command(
        "scan",
        "list keys in order",
        "prints key<TAB>value lines (--json: {items: [{key, value, revision}...], continuation})",
        "0 listed (also none), 2 usage, 4 error",
        reads,
    )
    scan.add_argument("--prefix", default="")
    scan.add_argument("--start", default="", help="first key (inclusive)")
    scan.add_argument("--end", default="", help="end key (exclusive)")
    scan.add_argument("--limit", type=_count(1), default=100)
    scan.add_argument(
        "--continuation",
        default="",
        metavar="KEY",
        help="resume after this key (what the previous page's continuation said)",
    )
    cas = command(
        "cas",
        "compare-and-set on a revision (0: the key must not exist)",
        "writes only if the key is at --expected-revision;\n"
        "prints OK revision=N, or CONFLICT on stderr (--json: succeeded, revision, current)",
        "0 written, 2 usage, 3 refused (another revision), 4 error, 5 unknown",
    )
    cas.add_argument("key")
    _add_value_source(cas)
    cas.add_argument(
        "--expected-revision",
        type=_count(0),
        required=True,
        metavar="N",
        help="the key's revision as `get --json` shows it; 0: the key must not exist",
    )
    ring = sub.add_parser(
        "ring",
        parents=[target],
        help="which shard and replicas own a key, and why (--cluster or --endpoints)",
    )
    ring.add_argument("--key", required=True)
    ring.add_argument("--hex", action="store_true", help="the key in hexadecimal")


def _add_value_source(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("value", nargs="?", default=None, help="the value; - reads stdin (raw bytes)")
    parser.add_argument("--value", dest="literal", default=None, metavar="V", help="a literal value, even -")
    parser.add_argument("--file", default=None, metavar="F", help="read the value from a file (raw bytes)")
    parser.epilog = f"{_VALUE_HELP}\n\n{parser.epilog}"


def _value(args: argparse.Namespace) -> bytes:
    sources = (("VALUE", args.value), ("--value", args.literal), ("--file", args.file))
    given = [name for name, v in sources if v is not None]
    if len(given) != 1:
        raise UsageError(
            f"give the value once: VALUE, - (stdin), --value V or --file F (got {given or 'none'})"
        )
    if args.file is not None:
        try:
            with open(args.file, "rb") as f:
                return _read_value(f, f"--file {args.file}")
        except OSError as err:
            raise UsageError(f"--file {args.file}: {err.strerror}") from None
    if args.value == "-":
        if sys.stdin.isatty():  # otherwise a forgotten `< file` looks like a hang
            _note("reading the value from the terminal: end it with Ctrl-D")
        return _read_value(sys.stdin.buffer, "stdin")
    return parse_bytes(args.literal if args.literal is not None else args.value, args.hex, "value")


def _read_value(stream: BinaryIO, source: str) -> bytes:
    """The whole stream, read no further than one byte past what any node accepts: a huge file or
    an endless pipe is refused after MAX_VALUE_BYTES, not held in memory first."""
    data = stream.read(MAX_VALUE_BYTES + 1)
    if len(data) > MAX_VALUE_BYTES:
        raise UsageError(
            f"{source}: the value is larger than {MAX_VALUE_BYTES} bytes, more than any node accepts "
            f"(limits.max_value_bytes; 1 MiB unless configured): nothing was sent"
        )
    return data


def cluster_target(args: argparse.Namespace) -> tuple[str, str]:
    """(kind, where): the one target the flags name, else $KVSTORE_CLUSTER as a --cluster."""
    named = [
        (kind, value) for kind in ("cluster", "router", "endpoints") if (value := getattr(args, kind, None))
    ]
    if len(named) > 1:
        raise UsageError(f"name one cluster, not {' and '.join('--' + kind for kind, _ in named)}")
    if named:
        return named[0]
    if os.environ.get(CLUSTER_ENV):
        return "cluster", os.environ[CLUSTER_ENV]
    raise UsageError(
        f"say where the cluster is: --cluster DIR, --router ADDR, --endpoints A,B or {CLUSTER_ENV}=DIR"
    )


def _client(args: argparse.Namespace) -> Any:
    from kvstore import Client

    kind, where = cluster_target(args)
    if kind == "cluster":
        return Client.from_cluster(where, timeout=args.timeout)
    if kind == "router":
        return Client(router=where, timeout=args.timeout)
    return Client(where.split(","), timeout=args.timeout)


# ----- output ---------------------------------------------------------------------------------------


def _out(line: bytes) -> None:
    sys.stdout.buffer.write(line + b"\n")


def _out_value(value: bytes) -> None:
    """A value exactly as stored, so `kvstore get k > file` restores the file byte for byte; a
    newline follows only on a terminal, where the prompt would otherwise glue onto it."""
    sys.stdout.buffer.write(value + (b"\n" if sys.stdout.isatty() else b""))


def _json(document: Any) -> None:
    _out(json.dumps(document, ensure_ascii=False).encode("utf-8"))


def _note(text: str) -> None:
    print(text, file=sys.stderr)


def _item(
    key: bytes, value: bytes | None, revision: int, shard: int | None, hex_mode: bool
) -> dict[str, Any]:
    """One key's document: found or not, its value and revision (null when absent), its shard."""
    document: dict[str, Any] = json_fields("key", key, hex_mode)
    document["found"] = value is not None
    document.update(json_fields("value", value, hex_mode) if value is not None else {"value": None})
    document["revision"] = revision if value is not None else None
    document["shard"] = shard
    return document


def _read(level: ReadConsistency) -> pb.ReadOptions:
    return pb.ReadOptions(consistency=level.level, max_staleness_seconds=level.max_staleness)


# ----- the commands -----------------------------------------------------------------------------------


def run(args: argparse.Namespace) -> int:
    """Run one data command; the caller (cli.main) turns errors into exit statuses."""
    if args.command == "ring":
        return _ring(args)
    value = _value(args) if args.command in ("put", "cas") else b""  # a usage error before connecting
    with _client(args) as kv:
        return int(_COMMANDS[args.command](kv, args, value))


def _put(kv: Any, args: argparse.Namespace, value: bytes) -> int:
    key = parse_bytes(args.key, args.hex, "key")
    header = kv.send(pb.PutRequest(key=key, value=value)).header
    if args.json:
        _json({**json_fields("key", key, args.hex), "revision": header.revision, "shard": header.shard})
    else:
        _out(f"OK revision={header.revision}".encode())
    return EXIT_OK


def _get(kv: Any, args: argparse.Namespace, _: bytes) -> int:
    key = parse_bytes(args.key, args.hex, "key")
    response = kv.send(pb.GetRequest(key=key, read=_read(args.consistency)))
    value = response.kv.value if response.found else None
    if args.json:
        _json(_item(key, value, response.kv.revision, response.header.shard, args.hex))
    elif value is not None and args.hex:
        _out(shown(value, args.hex))
    elif value is not None:
        _out_value(value)
    else:
        _note(f"(not found: {display(key, args.hex)})")
    return EXIT_OK if response.found else EXIT_NOT_FOUND


def _multi_get(kv: Any, args: argparse.Namespace, _: bytes) -> int:
    keys = [parse_bytes(k, args.hex, "key") for k in args.keys]
    response = kv.send(pb.MultiGetRequest(keys=keys, read=_read(args.consistency)))
    found = {k: (v, r) for k, v, r in zip(response.keys, response.values, response.revisions, strict=True)}
    ring = kv.core.cluster_map.slots if kv.core.cluster_map is not None else None
    one_shard = len(response.header.revisions) <= 1  # a router's multi-shard answer has one per shard
    items = []
    for key in dict.fromkeys(keys):  # the store answers a key named twice once
        value, revision = found.get(key, (None, 0))
        shard = ring.shard_for(key) if ring is not None else response.header.shard if one_shard else None
        items.append(_item(key, value, revision, shard, args.hex))
        if not args.json:
            if value is not None:
                _out(shown(key, args.hex) + b"\t" + shown(value, args.hex))
            else:
                _note(f"(not found: {display(key, args.hex)})")
    if args.json:
        _json({"items": items})
    return EXIT_OK if all(k in found for k in keys) else EXIT_NOT_FOUND


def _delete(kv: Any, args: argparse.Namespace, _: bytes) -> int:
    key = parse_bytes(args.key, args.hex, "key")
    response = kv.send(pb.DeleteRequest(keys=[key]))
    deleted = response.deleted == 1
    if args.json:
        header = response.header
        _json(
            {
                **json_fields("key", key, args.hex),
                "deleted": deleted,
                "revision": header.revision,
                "shard": header.shard,
            }
        )
    elif deleted:
        _out(b"deleted")
    else:
        _note(f"(not found: {display(key, args.hex)})")
    return EXIT_OK if deleted else EXIT_NOT_FOUND


def _scan(kv: Any, args: argparse.Namespace, _: bytes) -> int:
    request = pb.ScanRequest(
        prefix=parse_bytes(args.prefix, args.hex, "--prefix"),
        start=parse_bytes(args.start, args.hex, "--start"),
        end=parse_bytes(args.end, args.hex, "--end"),
        continuation=parse_bytes(args.continuation, args.hex, "--continuation"),
        limit=args.limit,
        read=_read(args.consistency),
    )
    response = kv.send(request)
    if args.json:
        items = [
            {**json_fields("key", kv_.key, args.hex), **json_fields("value", kv_.value, args.hex)}
            | {"revision": kv_.revision}
            for kv_ in response.kvs
        ]
        more = json_fields("continuation", response.continuation, args.hex) if response.continuation else {}
        _json({"items": items, **(more or {"continuation": None})})
        return EXIT_OK
    for kv_ in response.kvs:
        _out(shown(kv_.key, args.hex) + b"\t" + shown(kv_.value, args.hex))
    if response.continuation:
        _note(_resume_note(response.continuation, args.hex))
    return EXIT_OK


def _resume_note(continuation: bytes, hex_mode: bool) -> str:
    """Where the page ended and how to ask for the next one, spelled so it can be typed back."""
    if not hex_mode:
        try:
            text = continuation.decode("utf-8", "strict")
            return f"(more after {text}: resume with --continuation {shlex.quote(text)})"
        except UnicodeDecodeError:
            pass
    how = "" if hex_mode else ", every bound in hex"
    return (
        f"(more after {continuation.hex()} (hex): resume with --hex --continuation {continuation.hex()}{how})"
    )


def _cas(kv: Any, args: argparse.Namespace, value: bytes) -> int:
    key = parse_bytes(args.key, args.hex, "key")
    expected = args.expected_revision
    response = kv.send(pb.CompareAndSetRequest(key=key, value=value, expected_revision=expected))
    current = response.current if response.current.revision else None  # revision 0: the key is absent
    if args.json:
        document: dict[str, Any] = {**json_fields("key", key, args.hex), "succeeded": response.succeeded}
        document["revision"] = response.header.revision if response.succeeded else None
        document["expected_revision"] = expected
        document["shard"] = response.header.shard
        if current is not None and not response.succeeded:
            document["current"] = {
                **json_fields("value", current.value, args.hex),
                "revision": current.revision,
            }
        else:
            document["current"] = None  # written, or refused because the key is absent
        _json(document)
    elif response.succeeded:
        _out(f"OK revision={response.header.revision}".encode())
    else:
        now = f"at revision {current.revision}" if current else "absent"
        wanted = f"revision {expected}" if expected else "absent (revision 0)"
        _note(f"CONFLICT: the key is {now}, expected {wanted}; nothing written")
    return EXIT_OK if response.succeeded else EXIT_REFUSED


_COMMANDS = {
    "put": _put,
    "get": _get,
    "multi-get": _multi_get,
    "delete": _delete,
    "scan": _scan,
    "cas": _cas,
}


def _ring(args: argparse.Namespace) -> int:
    from kvstore.client.factory import load_cluster_map
    from kvstore.routing.ring import SLOT_COUNT

    kind, where = cluster_target(args)
    if kind == "cluster":
        cluster_map = load_cluster_map(where)
    elif kind == "endpoints":
        from kvstore import Client

        with Client(where.split(",")) as kv:
            cluster_map = kv.cluster_map()
    else:
        raise UsageError("ring needs --cluster DIR or --endpoints A,B (a router holds no ring of its own)")
    key = parse_bytes(args.key, args.hex, "--key")
    why = cluster_map.ring.explain(key)
    owner = cluster_map.slots.shard_for(key)
    shard = cluster_map.shard(owner)
    print(f"key:          {display(key, args.hex)}")
    print(
        f"routing key:  {why['routing_key']!r}  (hash tags: only the text inside the first {{...}} is hashed)"
    )
    print(f"slot:         {why['slot']} of {SLOT_COUNT}  (CRC-32 of the routing key, low 16 bits)")
    vnode = f"vnode #{why['vnode_owner_index']} of shard {why['shard']}"
    probes = f"nearest of {len(why['probes'])} probes from the slot's ring position"
    print(f"vnode point:  {why['vnode_point']:#018x} ({vnode}, {probes})")
    ring_info = f"map epoch {cluster_map.epoch}, {cluster_map.vnodes_per_shard} vnodes/shard"
    if owner == why["shard"]:
        print(f"shard:        {owner} ({ring_info})")
    else:  # the slot moved: the map's slot table, not the ring, says who owns it now
        print(f"shard:        {owner} (the slot table's owner; the ring's was {why['shard']}; {ring_info})")
    for replica in shard.replicas:
        print(f"  replica {replica.name:<8} {replica.address:<21} zone={replica.zone}")
    return EXIT_OK

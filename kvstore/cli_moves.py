"""`kvstore cluster move-slots`, `add-shard` and `migrations` (kvstore/meta/mover.py,
kvstore/cluster/grow.py).

Exit statuses: 0 done, 1 the move stopped (its phase and why on stderr; `migrations resume` or
`abort` it), 2 usage, as in the table of `kvstore --help`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from dataclasses import asdict
from typing import Any

from kvstore import errors


def add_move_commands(cluster: Any) -> None:
    add = cluster.add_parser(
        "add-shard",
        help="start a new shard (a Raft group of its own) and move its share of the slots to it "
        "(~1/(N+1), only from the others), while the cluster serves",
    )
    add.add_argument("--dir", required=True)
    add.add_argument("--replicas", type=int, default=None, help="default: as many as the other shards")
    add.add_argument("--rate", type=float, default=0.0, help="keys/s (default: no limit)")
    move = cluster.add_parser(
        "move-slots",
        help="move a slot range to a shard while the cluster serves (copy, catch up, brief fence, "
        "flip the map, clean up); slots the target owns are skipped; a range held by several "
        "shards moves as one move per run",
    )
    move.add_argument("--dir", required=True)
    move.add_argument(
        "--slots", required=True, metavar="FIRST-LAST", help="e.g. 0-1023 (inclusive), or one slot"
    )
    move.add_argument("--to", required=True, type=int, metavar="SHARD_ID")
    move.add_argument(
        "--rate", type=float, default=0.0, help="keys/s to copy, catch up and clean up (default: no limit)"
    )
    migrations = cluster.add_parser(
        "migrations", help="list slot moves (phase, keys copied, changes replayed), or resume or abort one"
    )
    migrations.add_argument("what", nargs="?", choices=["list", "resume", "abort"], default="list")
    migrations.add_argument("move_id", nargs="?", type=int)
    migrations.add_argument("--dir", required=True)
    migrations.add_argument("--json", action="store_true", help="list: one JSON document")


def parse_slots(text: str) -> tuple[int, int]:
    first, _, last = text.partition("-")
    try:
        bounds = (int(first), int(last or first))
    except ValueError:
        raise errors.InvalidArgument(
            f"--slots takes FIRST-LAST (e.g. 0-1023) or one slot, not {text!r}"
        ) from None
    if not 0 <= bounds[0] <= bounds[1] < 65536:
        raise errors.InvalidArgument(f"--slots {text}: slots are 0 to 65535, first <= last")
    return bounds


def run(args: argparse.Namespace) -> int:
    from kvstore.cluster.local import LocalCluster
    from kvstore.meta.mover import MoveFailed, Mover

    cluster = LocalCluster(args.dir)
    cluster_map = cluster.cluster_map()
    if not cluster_map.meta:
        print(
            f"kvstore cluster {args.action}: the cluster at {args.dir} has no metadata group "
            "(its map is fixed)",
            file=sys.stderr,
        )
        return 2

    def say(line: str) -> None:
        print(line, flush=True)

    async def main() -> int:
        mover = Mover(cluster_map, cluster.admin_token(), say=say)
        try:
            if args.action == "add-shard":
                from kvstore.cluster.grow import add_shard

                began = time.monotonic()
                shard, moves = await add_shard(cluster, args.replicas, args.rate, say)
                copied = sum(m.keys_copied for m in moves)
                say(f"shard {shard} added: {copied} keys moved to it in {time.monotonic() - began:.1f}s")
            elif args.action == "move-slots":
                first, last = parse_slots(args.slots)
                began = time.monotonic()
                moves = await mover.move_slots(first, last, args.to, rate=args.rate)
                copied = sum(m.keys_copied for m in moves)
                say(
                    f"moved {len(moves)} range(s) to shard {args.to} ({copied} keys copied) "
                    f"in {time.monotonic() - began:.1f}s"
                )
            elif args.what == "list":
                moves = sorted(await mover.records.all(), key=lambda m: m.id)
                if args.json:
                    print(json.dumps([asdict(m) for m in moves], indent=2))
                for m in [] if args.json else moves:
                    print(
                        f"move {m.id}: {m.describe()} shard {m.source} -> {m.target}  "
                        f"{m.phase:<11} "
                        f"copied={m.keys_copied} replayed={m.changes_applied} dropped={m.keys_dropped}"
                        + (f"  error: {m.error}" if m.error else "")
                    )
            else:
                if args.move_id is None:
                    raise errors.InvalidArgument(f"migrations {args.what} needs a MOVE_ID")
                record = await (
                    mover.abort(args.move_id) if args.what == "abort" else mover.resume(args.move_id)
                )
                say(f"move {record.id}: {record.phase}")
            cluster.current_map()  # the cache catches up with the group
            return 0
        except MoveFailed as exc:
            print(f"kvstore cluster {args.action}: {exc.message}", file=sys.stderr)
            return 1
        finally:
            await mover.close()

    return asyncio.run(main())

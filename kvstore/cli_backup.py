"""`kvstore backup`, `kvstore backup verify` and `kvstore restore` (kvstore/cluster/backup.py).

Exit statuses: 0 done (verify: the backup is whole; restore: every replica's digest is the
backup's), 1 failed (which check, or which shard, on stderr), 2 usage (no cluster, a directory
that is not empty, ...), as in the table of `kvstore --help`.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

from kvstore import cli_kv


def add_backup_commands(sub: Any) -> None:
    backup = sub.add_parser(
        "backup",
        help="back up a running cluster (writes go on): every shard at one Raft index of its own, "
        "plus the cluster map; `backup verify DIR` checks a backup",
        description="kvstore backup --cluster DIR --out BACKUP_DIR | kvstore backup verify BACKUP_DIR",
    )
    backup.add_argument(
        "--cluster", default=argparse.SUPPRESS, help=f"the cluster's directory; default ${cli_kv.CLUSTER_ENV}"
    )
    backup.add_argument("--out", default=None, help="a new or empty directory for the backup")
    actions = backup.add_subparsers(dest="backup_action", required=False)
    verify = actions.add_parser(
        "verify",
        help="check a backup: manifest, map epoch, every shard and slot covered, file checksums, "
        "readable stores with the recorded applied index, key count and digest; exit 1 on any failure",
    )
    verify.add_argument("backup_dir")
    restore = sub.add_parser(
        "restore",
        help="create and start a new cluster (fresh ports and secrets) holding a backup's data; "
        "prints each shard's digest and exits 1 unless every replica's equals the backup's",
    )
    restore.add_argument("--from", dest="from_dir", required=True, help="the backup directory")
    restore.add_argument("--dir", required=True, help="the new cluster's directory (must not hold one)")
    restore.add_argument("--timeout", type=float, default=60.0, help="seconds to wait for the nodes")
    restore.add_argument("--insecure", action="store_true", help="no Raft secrets (loopback only)")
    restore.add_argument("--durability", choices=("fsync", "none"), default="fsync")


def run(args: argparse.Namespace) -> int:
    from kvstore.cluster import backup as b

    if args.command == "restore":
        return _restore(args)
    if args.backup_action == "verify":
        problems = b.verify_backup(args.backup_dir)
        for problem in problems:
            print(f"backup verify: {problem}", file=sys.stderr)
        if problems:
            print(f"backup verify: {args.backup_dir} FAILED ({len(problems)} problem(s))", file=sys.stderr)
            return 1
        print(f"backup verify: {args.backup_dir} is whole")
        return 0
    cluster = getattr(args, "cluster", None) or os.environ.get(cli_kv.CLUSTER_ENV)
    if not cluster or not args.out:
        usage = "give --cluster DIR (or $KVSTORE_CLUSTER) and --out BACKUP_DIR"
        print(f"kvstore backup: error: {usage}", file=sys.stderr)
        return cli_kv.EXIT_USAGE
    try:
        manifest = b.backup_cluster(cluster, args.out)
    except b.BackupFailed as err:
        print(f"backup failed: {err}", file=sys.stderr)
        return 1
    total = sum(e["bytes"] for e in manifest["shards"])
    shards, seconds = len(manifest["shards"]), manifest["seconds"]
    print(f"backup of {shards} shard(s), {total} bytes, in {args.out} ({seconds:.2f}s)")
    return 0


def _restore(args: argparse.Namespace) -> int:
    from kvstore.cluster import backup as b
    from kvstore.cluster.status import NodesNotServing

    try:
        digests = b.restore_cluster(
            args.from_dir, args.dir, args.timeout, insecure=args.insecure, durability=args.durability
        )
    except (b.BackupFailed, NodesNotServing) as err:
        print(f"restore failed: {err}", file=sys.stderr)
        return 1
    for d in digests:
        verdict = "matches the backup" if d.matches else "DIFFERS from the backup"
        replicas = " ".join(f"{name}={digest}" for name, digest in d.replicas.items())
        print(f"shard {d.shard}: digest {d.expected}: {verdict} ({replicas})")
    if not all(d.matches for d in digests):
        return 1
    print(f"restore: cluster serving at {args.dir}; stop it with: kvstore cluster down --dir {args.dir}")
    return 0

"""The `kvstore` command line.

kvstore cluster up|status|kill|start|down --dir DIR ...   a local multi-process cluster
kvstore cluster move-slots --dir DIR --slots A-B --to N   move slots between shards while serving
kvstore cluster add-shard --dir DIR [--replicas N]        a new shard, and its share of the slots
kvstore cluster migrations [list|resume|abort ID] --dir DIR
kvstore node --config FILE                                 one replica (what `cluster up` starts)
kvstore router --cluster DIR --listen ADDR                 a stateless router
kvstore health --address HOST:PORT                         exit 0 only if it reports SERVING
kvstore [--cluster DIR | --router ADDR | --endpoints A,B] put|get|multi-get|delete|scan|cas ...
kvstore --cluster DIR ring --key KEY                       which shard owns a key, and why
kvstore backup --cluster DIR --out B | backup verify B     an online backup, and its check
kvstore restore --from B --dir NEW                         a new cluster holding a backup's data
kvstore demo | bench | chaos                               the scenario, the benchmark, the fault suite

The data commands (kvstore/cli_kv.py) print data on stdout and notes on stderr; `kvstore get -h`
says how bytes are typed and printed (--hex, --json). $KVSTORE_CLUSTER is the default --cluster.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

from kvstore import cli_backup, cli_kv, cli_moves, errors
from kvstore.cli_bytes import UsageError

_INSECURE_HELP = (
    "no Raft secret: peer traffic unauthenticated and unencrypted (loopback only, warned at every start)"
)


def _add_cluster_commands(sub: Any) -> None:
    cluster = sub.add_parser("cluster", help="run a local multi-process cluster").add_subparsers(
        dest="action", required=True
    )
    up = cluster.add_parser(
        "up",
        help="create (if needed) and start a cluster; waits until every node serves as a member of "
        "its Raft group, else exits 1 naming each node that does not and why, and stops what it started",
    )
    up.add_argument("--dir", required=True)
    up.add_argument(
        "--topology",
        default=None,
        help="a topology file (shards, replicas, zones, ports), e.g. cluster/local-3x3.toml; "
        "the four flags below describe the shape instead, and are refused alongside it",
    )
    up.add_argument("--shards", type=int, default=None, help="default 1")
    up.add_argument("--replicas", type=int, default=None, help="per shard; default 3")
    up.add_argument(
        "--base-port",
        type=int,
        default=None,
        help="replica i (s0r0, s0r1, ... shard by shard) gets client port BASE+2i and Raft port "
        "BASE+2i+1; the health ports follow, one per replica (default: free ports)",
    )
    up.add_argument("--vnodes", type=int, default=None, help="ring points per shard; default 256")
    up.add_argument("--timeout", type=float, default=60.0, help="seconds to wait for the nodes (default 60)")
    up.add_argument("--faults", action="store_true", help="put a fault proxy in front of every Raft port")
    up.add_argument("--insecure", action="store_true", help=_INSECURE_HELP)
    up.add_argument(
        "--durability",
        choices=("fsync", "none"),
        default="fsync",
        help='storage.durability of every node (default fsync; "none" syncs nothing to disk: a power '
        "cut can lose acknowledged writes; throwaway test clusters only, each node warns)",
    )
    fault = cluster.add_parser("fault", help="cut, delay or heal Raft links (cluster started with --faults)")
    fault.add_argument("--dir", required=True)
    fault.add_argument(
        "fault_action",
        metavar="action",
        choices=["isolate", "partition", "blackhole", "delay", "heal", "show"],
    )
    fault.add_argument(
        "targets", nargs="*", help="isolate NODE | partition A,B C,D | blackhole SRC DST | delay SEC"
    )
    fault.add_argument("--src", default=None, help="delay: only links from this node")
    fault.add_argument("--dst", default=None, help="delay: only links to this node")
    status = cluster.add_parser(
        "status",
        help="per shard: leader, slots, replicas, indexes, key counts; exit 0 only if every shard "
        "has a leader and every node is serving",
    )
    status.add_argument("--dir", required=True)
    status.add_argument(
        "--json",
        action="store_true",
        help="print the status document (schema: docs/cluster-status.md); exit 0 whenever it is "
        'printed: read its "healthy"',
    )
    kill = cluster.add_parser("kill", help="send a signal to one node")
    kill.add_argument("--dir", required=True)
    kill.add_argument("node")
    kill.add_argument("--signal", default="KILL", choices=["KILL", "TERM", "STOP", "CONT"])
    start = cluster.add_parser(
        "start",
        help="start stopped nodes and wait until they serve as members of their Raft groups "
        "(else exit 1 with the reason from each one's log, and stop them); to start every "
        "stopped node, run `cluster up --dir DIR` again",
    )
    start.add_argument("--dir", required=True)
    start.add_argument("nodes", nargs="+", metavar="NODE")
    start.add_argument("--timeout", type=float, default=60.0, help="seconds to wait for it (default 60)")
    down = cluster.add_parser("down", help="stop every node (data is kept)")
    down.add_argument("--dir", required=True)
    cli_moves.add_move_commands(cluster)


def _add_target_options(parser: argparse.ArgumentParser, default: Any) -> None:
    target = parser.add_mutually_exclusive_group()
    target.add_argument(
        "--cluster",
        default=default,
        help=f"local cluster directory (smart client); default: ${cli_kv.CLUSTER_ENV}",
    )
    target.add_argument("--router", default=default, help="router address (thin client)")
    target.add_argument("--endpoints", default=default, help="comma-separated node addresses (smart client)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kvstore",
        description=__doc__,
        epilog=cli_kv.EXIT_STATUS_HELP,
        formatter_class=argparse.RawTextHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"kvstore {_installed_version()}")
    # Accepted before the command (`kvstore --cluster D get k`) or after it (`kvstore get k --cluster D`).
    _add_target_options(parser, None)
    target_after = argparse.ArgumentParser(add_help=False)
    _add_target_options(target_after, argparse.SUPPRESS)
    sub = parser.add_subparsers(dest="command", required=True)
    _add_cluster_commands(sub)
    cli_backup.add_backup_commands(sub)
    cli_kv.add_data_commands(sub, target_after)
    node = sub.add_parser("node", help="run one replica")
    node.add_argument("--config", required=True)
    node.add_argument("--listen", default=None, help="override the gRPC listen address")
    node.add_argument("--insecure", action="store_true", help=_INSECURE_HELP)
    node.add_argument(
        "--forget-peer",
        metavar="RAFT_ADDRESS",
        default=None,
        help="do not start: drop the incarnation this node remembers for the peer at RAFT_ADDRESS "
        "(its advertised Raft address), so that peer, rebuilt with an empty data dir, is accepted "
        "as new at its next connection (also while this node runs); see docs/architecture.md, Identity",
    )
    router = sub.add_parser("router", parents=[target_after], help="run a stateless router with the KV API")
    health = sub.add_parser(
        "health", help="ask a node or router's grpc.health.v1 service; exit 0 only if SERVING"
    )
    health.add_argument("--address", required=True, help="host:port: a node's gRPC or health port")
    health.add_argument("--service", default="", help='"" (overall), kvstore.v2.KV or liveness')
    health.add_argument("--timeout", type=float, default=2.0)
    router.add_argument("--listen", default="127.0.0.1:7400")
    demo = sub.add_parser("demo", help="start a 3x3 cluster, run the Locust phases, print a summary")
    demo.add_argument(
        "--topology", default=None, help="a topology file (default: cluster/local-3x3.toml; 2+ shards)"
    )
    demo.add_argument("--phase-seconds", type=float, default=25.0)
    demo.add_argument("--users", type=int, default=24)
    demo.add_argument("--dir", default=".kvstore/demo-run", help="the demo's own cluster (replaced each run)")
    demo.add_argument("--results", default="results/demo")
    bench = sub.add_parser("bench", help="benchmark against ceilings measured in the same run")
    bench.add_argument("--quick", action="store_true")
    bench.add_argument("--etcd", action="store_true")
    bench.add_argument("--out", default="results/bench.json")
    chaos = sub.add_parser("chaos", help="faults + recorded history + linearizability checking")
    chaos.add_argument("--shards", type=int, default=2)
    chaos.add_argument("--duration", type=float, default=60.0)
    chaos.add_argument(
        "--nemesis",
        default="kill,pause,partition,delay",
        help="comma-separated: kill, pause, partition, delay (one at a time), and reshard (slot moves "
        "back and forth all through the run, beside the others; a metadata group joins the cluster)",
    )
    chaos.add_argument("--seed", type=int, default=1)
    chaos.add_argument("--out", default="results/chaos")
    chaos.add_argument(
        "--runs", type=int, default=1, help="repeat with seeds seed, seed+1, ... and aggregate"
    )
    return parser


def _installed_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("kvstore")
    except PackageNotFoundError:
        return "(not installed: run from a source tree without `pip install -e .`)"


def main(argv: list[str] | None = None) -> int:
    """Exit statuses: cli_kv.EXIT_STATUS_HELP (the epilog of `kvstore --help`)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        code = _dispatch(args)
        sys.stdout.flush()  # a closed pipe shows here at the latest, while it can still be handled
        return code
    except BrokenPipeError:
        # The reader went away (`| head -1`): stop quietly. Python's documented way: point stdout
        # at devnull so the interpreter's final flush does not fail again (docs: signal, "Note on
        # SIGPIPE").
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return cli_kv.EXIT_PIPE_CLOSED
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return cli_kv.EXIT_INTERRUPTED
    except UsageError as err:
        print(f"{parser.prog} {args.command}: error: {err}", file=sys.stderr)  # as argparse says it
        return cli_kv.EXIT_USAGE
    except errors.UnknownOutcome as err:
        print(f"error ({err.kind}): {_one_line(err.message)}", file=sys.stderr)
        return cli_kv.EXIT_UNKNOWN_OUTCOME
    except errors.KvError as err:
        print(f"error ({err.kind}): {_one_line(err.message)}", file=sys.stderr)
        return cli_kv.EXIT_STORE_ERROR
    except KeyError as err:
        print(f"error: {err.args[0] if err.args else err}", file=sys.stderr)
        return 2
    except (FileNotFoundError, FileExistsError, TimeoutError, RuntimeError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


def _one_line(message: str) -> str:
    return " ".join(message.split())


def _dispatch(args: argparse.Namespace) -> int:
    if args.command == "node":
        from kvstore.config import NodeConfig
        from kvstore.server.node import run

        config = NodeConfig.load(args.config, {"listen": args.listen})
        if args.forget_peer is not None:
            return _forget_peer(config, args.forget_peer)
        if args.insecure:
            config.raft.insecure = True
            config.raft.secret_file = ""
        run(config)
        return 0
    if args.command == "cluster":
        return _cluster(args)
    if args.command in ("backup", "restore"):
        return cli_backup.run(args)
    if args.command == "router":
        return _router(args)
    if args.command == "health":
        return _health(args)
    if args.command == "demo":
        from kvstore.demo import run_demo

        return run_demo(args)
    if args.command == "bench":
        return _run_repo_script("loadtests/bench.py", args)
    if args.command == "chaos":
        from kvstore.chaos.command import run_chaos_cli

        return run_chaos_cli(args)
    return cli_kv.run(args)


def _forget_peer(config: Any, address: str) -> int:
    from kvstore.storage.identity import PeerIncarnations

    if address not in config.peers:
        raise ValueError(f"{address} is not a peer of {config.name} (peers: {', '.join(config.peers)})")
    if PeerIncarnations(config.data_dir).forget(address):
        print(
            f"{config.name}: forgot the incarnation of {address}; it is accepted as new when it next connects"
        )
    else:
        print(f"{config.name}: no incarnation recorded for {address} (nothing to forget)")
    return 0


def _run_repo_script(relative: str, args: argparse.Namespace) -> int:
    """Benchmarks live in the repository's loadtests/ (not in the installed package)."""
    import runpy
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / relative
    if not script.exists():
        raise FileNotFoundError(f"{relative} not found: run this from a kvstore source checkout")
    namespace = runpy.run_path(str(script))
    return int(namespace["main"](args))


def _cluster(args: argparse.Namespace) -> int:
    from kvstore.cluster.local import LocalCluster
    from kvstore.cluster.status import problems, raft_groups

    if args.action in ("move-slots", "migrations", "add-shard"):
        return cli_moves.run(args)
    cluster = LocalCluster(args.dir)
    if args.action == "up":
        from kvstore.cluster.topology import load_topology, resolve_topology

        topology = resolve_topology(
            load_topology(args.topology) if args.topology else None,
            args.shards,
            args.replicas,
            args.vnodes,
            args.base_port,
        )
        if not cluster.map_path.exists():
            from kvstore.config import RaftSettings, StorageSettings

            raft = RaftSettings(insecure=args.insecure)
            storage = StorageSettings(durability=args.durability)
            cluster.create(topology=topology, raft=raft, storage=storage, faults=args.faults)
        else:
            existing = cluster.cluster_map()
            shape = (len(existing.shards), len(existing.shards[0].replicas), cluster.has_fault_proxies)
            asked = args.topology or any(
                v is not None for v in (args.shards, args.replicas, args.vnodes, args.base_port)
            )
            if shape != (topology.shards, topology.replicas, args.faults) and (asked or args.faults):
                print(
                    f"note: {args.dir} already holds a cluster of {shape[0]} shard(s) x {shape[1]} replica(s)"
                    f"{' with fault proxies' if shape[2] else ''}; starting it as it is "
                    "(remove the directory to create another)",
                    file=sys.stderr,
                )
        started = cluster.start_all()
        shards = _wait_serving(cluster, None, started, args.timeout, "cluster up")
        if shards is None:
            return 1
        _print_status(cluster.status_document())
        print(f"cluster up: {args.dir} ({len(shards)} shard(s))")
        print(f"stop it with: kvstore cluster down --dir {args.dir}")
    elif args.action == "status":
        document = cluster.status_document()
        if args.json:
            print(json.dumps(document, indent=2))
            return 0  # the document says whether all is well ("healthy"); tools read it, not this
        _print_status(document)
        if not document["healthy"]:
            print(
                f"not healthy: {'; '.join(problems(raft_groups(document['shards'], document['metadata'])))}",
                file=sys.stderr,
            )
            return 1
    elif args.action == "kill":
        pid = cluster.kill(args.node, args.signal)
        print(f"sent SIG{args.signal} to {args.node} (pid {pid})")
    elif args.action == "start":
        pids = {name: cluster.start(name) for name in args.nodes}  # all first: a shard needs a quorum
        if _wait_serving(cluster, args.nodes, args.nodes, args.timeout, "cluster start") is None:
            return 1
        for name, pid in pids.items():
            print(f"started {name} (pid {pid}): serving, a member of its Raft group")
    elif args.action == "fault":
        _fault(cluster, args)
    elif args.action == "down":
        cluster.down()
        print(f"cluster at {args.dir} stopped (data kept under {cluster.dir / 'data'})")
    return 0


def _wait_serving(
    cluster: Any, names: list[str] | None, started: list[str], timeout: float, command: str
) -> list[dict[str, Any]] | None:
    """Wait until `names` (None: every node) serve as Raft members; on failure say which and why,
    stop the nodes this command `started` (what was already running stays), and return None."""
    from kvstore.cluster.local import NodesNotServing

    try:
        shards: list[dict[str, Any]] = cluster.wait_until_serving(names, timeout)
        return shards
    except NodesNotServing as err:
        print(f"{command}: {err}", file=sys.stderr)
        if started:  # all of them: the fault proxies go too
            everything = set(started) == set(cluster.all_node_names())
            cluster.down(names=None if everything else started)
        stopped = f"the {len(started)} node(s) it started ({', '.join(started)})" if started else "nothing"
        print(f"{command}: stopped {stopped}; logs: {cluster.dir / 'logs'}", file=sys.stderr)
        return None


def _fault(cluster: Any, args: argparse.Namespace) -> None:
    from kvstore.chaos import proxy_daemon as pd

    if not cluster.has_fault_proxies:
        raise ValueError(f"{cluster.dir} has no fault proxies: create it with `cluster up --faults`")
    faults = pd.read_faults(cluster.dir)
    t = args.targets
    if args.fault_action == "isolate" and len(t) == 1:
        faults["isolate"].append(t[0])
    elif args.fault_action == "partition" and len(t) == 2:
        faults["partitions"].append([t[0].split(","), t[1].split(",")])
    elif args.fault_action == "blackhole" and len(t) == 2:
        faults["blackholes"].append([t[0], t[1]])
    elif args.fault_action == "delay" and len(t) == 1:
        faults["delays"].append([args.src, args.dst, float(t[0])])
    elif args.fault_action == "heal":
        faults = dict(pd.NO_FAULTS)
    elif args.fault_action != "show":
        raise ValueError(f"usage: cluster fault --dir D {args.fault_action} ... (see --help)")
    if args.fault_action != "show":
        pd.write_faults(cluster.dir, faults)
    print(json.dumps(faults, indent=2))


def _print_status(document: Any) -> None:
    from kvstore.cluster.status import METRICS

    print(f"cluster {document['cluster_id'] or '-'} (map epoch {document['epoch']})")
    for shard in document["shards"]:
        print(
            f"shard {shard['shard']}: leader={shard['leader'] or '-'} slots={shard['slots']} "
            f"vnodes={shard['vnodes']} keys={shard['key_count']}"
        )
        for r in shard["replicas"]:
            m = r["metrics"] or dict.fromkeys(METRICS, 0) | {"staleness_seconds": -1.0}
            staleness = f"{m['staleness_seconds']:.2f}s" if m["staleness_seconds"] >= 0 else "-"
            print(
                f"  {r['node']:<8} {r['role']:<11} {r['address']:<21} pid={r['pid'] or '-':<7} "
                f"term={m['term']:<4} applied={m['applied_index']:<8} commit={m['commit_index']:<8} "
                f"leader_commit={m['leader_commit_index']:<8} staleness={staleness:<7} zone={r['zone']:<7} "
                f"health={r['health']}"
            )
    if meta := document["metadata"]:
        print(f"metadata group: leader={meta['leader'] or '-'}")
        for r in meta["replicas"]:
            pid = r["pid"] or "-"
            print(f"  {r['node']:<8} {r['role']:<11} {r['address']:<21} pid={pid:<7} health={r['health']}")


def _health(args: argparse.Namespace) -> int:
    """0: SERVING; 1: anything else it reports (NOT_SERVING, SERVICE_UNKNOWN); 2: no answer."""
    import grpc

    from kvstore.server.health import check

    try:
        status = check(args.address, args.service, args.timeout)
    except grpc.RpcError as err:
        if err.code() == grpc.StatusCode.NOT_FOUND:  # the standard answer for a service it does not know
            print(f"{args.address}: SERVICE_UNKNOWN ({args.service!r})")
            return 1
        print(f"{args.address}: no health answer ({err.code().name}: {err.details()})", file=sys.stderr)
        return 2
    print(f"{args.address}: {status}")
    return 0 if status == "SERVING" else 1


def _router(args: argparse.Namespace) -> int:
    from kvstore.client.factory import load_cluster_map
    from kvstore.server.router import run_router

    directory = args.cluster or (None if args.endpoints else os.environ.get(cli_kv.CLUSTER_ENV))
    cluster_map = load_cluster_map(directory) if directory else None
    seeds = args.endpoints.split(",") if args.endpoints else []
    if cluster_map is None and not seeds:
        raise ValueError("the router needs --cluster DIR or --endpoints A,B")
    run_router(args.listen, cluster_map, seeds)
    return 0


if __name__ == "__main__":
    sys.exit(main())

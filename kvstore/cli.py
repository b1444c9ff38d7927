"""The `kvstore` command line (minimal bootstrap; extended below)."""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="kvstore")
    sub = parser.add_subparsers(dest="command", required=True)
    node = sub.add_parser("node")
    node.add_argument("--config", required=True)
    args = parser.parse_args(argv)
    if args.command == "node":
        from kvstore.config import NodeConfig
        from kvstore.server.node import run

        run(NodeConfig.load(args.config))
    return 0


if __name__ == "__main__":
    sys.exit(main())

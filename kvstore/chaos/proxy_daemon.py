"""Fault proxies for a local cluster started with `kvstore cluster up --faults`.

One detached process (`python -m kvstore.chaos.proxy_daemon --dir D`, started by `cluster up --faults`) runs a
`FaultProxy` in front of every replica's Raft port, on the addresses the replicas advertise
(`<dir>/proxies.json`). The link rules live in `<dir>/faults.json`, written by
`kvstore cluster fault ...`; the daemon applies the file whenever it changes. A file is the control
channel on purpose: nothing to authenticate, and the current faults are visible with `cat`.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
from pathlib import Path
from typing import Any

from kvstore.chaos.link_rules import LinkController
from kvstore.chaos.proxy import FaultProxy

log = logging.getLogger(__name__)

NO_FAULTS: dict[str, Any] = {"isolate": [], "partitions": [], "blackholes": [], "delays": []}


def proxies_path(directory: Path) -> Path:
    return directory / "proxies.json"


def faults_path(directory: Path) -> Path:
    return directory / "faults.json"


def read_faults(directory: Path) -> dict[str, Any]:
    path = faults_path(directory)
    if not path.exists():
        return dict(NO_FAULTS)
    return {**NO_FAULTS, **json.loads(path.read_text())}


def write_faults(directory: Path, faults: dict[str, Any]) -> None:
    tmp = faults_path(directory).with_suffix(".tmp")
    tmp.write_text(json.dumps(faults, indent=2))
    os.replace(tmp, faults_path(directory))


def apply_rules(controller: LinkController, faults: dict[str, Any]) -> None:
    controller.heal()
    for name in faults["isolate"]:
        controller.isolate(name)
    for group_a, group_b in faults["partitions"]:
        controller.partition(group_a, group_b)
    for src, dst in faults["blackholes"]:
        controller.blackhole(src, dst)
    for src, dst, seconds in faults["delays"]:
        controller.delay(src, dst, float(seconds))


async def serve(directory: Path) -> None:
    # name -> {"listen": a, "target": b, "secret_file": the shard's secret, to read who dials}
    layout = json.loads(proxies_path(directory).read_text())
    controller = LinkController()
    proxies = []
    for name, ends in layout.items():
        host, port = ends["listen"].rsplit(":", 1)
        t_host, t_port = ends["target"].rsplit(":", 1)
        proxy = FaultProxy(
            name,
            (host, int(port)),
            (t_host, int(t_port)),
            controller,
            secret_file=ends.get("secret_file") or None,
        )
        await proxy.start()
        proxies.append(proxy)
    log.info("fault proxies up for %s", ", ".join(layout))
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    last = None
    while not stop.is_set():
        faults = read_faults(directory)
        if faults != last:
            apply_rules(controller, faults)
            log.info("fault rules now %s", json.dumps(faults))
            last = faults
        try:
            await asyncio.wait_for(stop.wait(), 0.2)
        except TimeoutError:
            pass
    for proxy in proxies:
        await proxy.stop()


def run(directory: str) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    asyncio.run(serve(Path(directory)))


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description="fault proxies of a local cluster (see module docstring)")
    parser.add_argument("--dir", required=True)
    run(parser.parse_args().dir)

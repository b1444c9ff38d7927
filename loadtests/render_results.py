"""Render a `kvstore bench` JSON as the results block of docs/performance.md.

    .venv/bin/python loadtests/render_results.py results/bench.json                 # print it
    .venv/bin/python loadtests/render_results.py results/bench.json --into docs/performance.md

`--into` replaces what lies between `<!-- BEGIN RESULTS -->` and `<!-- END RESULTS -->`, so the
document's table, targets, memory and profile always come from one recorded run.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

BEGIN, END = "<!-- BEGIN RESULTS -->", "<!-- END RESULTS -->"


def render(run: dict[str, Any]) -> str:
    return "\n".join([*_machine(run), *_targets(run), *_memory(run), *_profile(run)])


def _machine(run: dict[str, Any]) -> list[str]:
    machine, client, etcd = run["machine"], run["client_model"], run.get("etcd") or {"status": "not run"}
    sections = ", ".join(f"{name} {seconds:.0f} s" for name, seconds in run.get("timings", {}).items())
    if etcd.get("status") == "ran":
        version, binary, members = etcd.get("version"), etcd.get("binary"), etcd.get("members")
        peer = f"ran, etcd {version} ({binary}), {members} members on loopback."
    else:
        peer = f"{etcd['status']} ({etcd.get('reason', 'section `etcd`, option --etcd')})."
    dirty = " (dirty tree)" if run["code"]["dirty"] else ""
    return [
        "## Machine and run\n",
        f"Run `{run['started_at']}`, mode **{run['mode']}**, {run['duration_seconds']:.0f} s in all"
        f" (sections: {sections}).\n",
        f"- {machine['nproc']} vCPUs ({machine['cpu']}), a shared development VM (load average at start"
        f" {', '.join(machine['loadavg_at_start'])}); its speed drifts by 10-20% over tens of minutes"
        " (finding 13).",
        f"- Code: commit {run['code']['commit']}{dirty}.",
        f"- Python {machine['python']}, grpcio {machine['grpcio']}, protobuf {machine['protobuf']},"
        f" uvloop {machine['uvloop']}, pysyncobj {machine['pysyncobj']}, {machine['lmdb']}.",
        f"- Client: {client['processes']} process, {client['runtime']}, {client['in_flight']} calls in"
        f" flight, {client['key_bytes']}-byte keys, {client['value_bytes']}-byte values, batches of"
        f" {client['batch_keys']}, replica-read policy `{client['read_policy']}` (strong multi_get: the"
        " leaders).",
        f"- etcd peer: {peer}",
        "\n## Latest full table\n",
        run["table_markdown"].strip() + "\n",
    ]


def _targets(run: dict[str, Any]) -> list[str]:
    lines = ["## Targets\n", "| target | value | verdict | from |", "| --- | --- | --- | --- |"]
    for target in run["targets"]:
        value, unit = target["value"], (target.get("unit") or "").strip()
        if value is None:
            shown = "-"
        elif target["target"].startswith("replica RSS"):
            shown = f"{value * 100:.1f}%"
        elif unit == "x":
            shown = f"{value:.2f}x"
        elif unit == "keys/s":
            shown = f"{value:,.0f} keys/s"
        else:
            shown = f"{value:.3f}"
        detail = target["detail"].replace("|", "\\|")
        lines.append(f"| {target['target']} | {shown} | **{target['verdict']}** | {detail} |")
    return lines


def _memory(run: dict[str, Any]) -> list[str]:
    growth, rss, config = run.get("growth"), run.get("rss"), run["config"]
    if not growth or not rss:
        return ["\nGrowth and replica memory: not measured in this run (section `growth`).\n"]
    lines = [
        f"\nGrowth: {growth['large_keys']:,} keys loaded at {growth['load_keys_per_s']:,.0f} keys/s"
        " (`multi_put` of 1,000 keys, 4 in flight).\n",
        f"Replica memory over the {config['rss_seconds']:.0f} s put run (after"
        f" {config['rss_warmup']:.0f} s warm-up; leader {rss['leader']}):\n",
        "| replica | VmRSS first | max | last | largest deviation from first | RssAnon first | max | last"
        " | its largest deviation |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name, replica in sorted(rss["replicas"].items()):
        mb = {key: f"{replica[key] / 1024:.0f} MB" for key in replica if key.endswith("_kib")}
        lines.append(
            f"| {name} | {mb['first_kib']} | {mb['max_kib']} | {mb['last_kib']}"
            f" | {replica['max_deviation_from_first'] * 100:.0f}% | {mb['anon_first_kib']}"
            f" | {mb['anon_max_kib']} | {mb['anon_last_kib']}"
            f" | {replica['anon_max_deviation_from_first'] * 100:.0f}% |"
        )
    lines.append(
        "\nThe target is judged on VmRSS, as the issue states it; RssAnon (heap, the in-memory Raft"
        " log) is shown beside it.\n"
    )
    return lines


def _profile(run: dict[str, Any]) -> list[str]:
    profile = run.get("profile") or {}
    if "cpu" not in profile:
        return ["## Profile\n", "Not recorded in this run (py-spy not found).\n"]
    seconds = 20 if run["mode"] == "full" else 5
    lines = [
        "## Profile: the leader under write load\n",
        f"py-spy (`record --nonblocking --threads -r 100`) on the {profile['role']} ({profile['node']})"
        f" during {profile['load']}, {seconds} s. **cpu** samples only the thread holding the GIL (where"
        " Python spends CPU; `Runner.run` self time is C code under the event loop: grpc's Cython"
        " core and uvloop); **wall** samples every non-idle thread (also time blocked in fsync or"
        " socket sends).\n",
    ]
    for kind in ("cpu", "wall"):
        samples = profile[kind]
        threads = ", ".join(f"{t['function']} {t['share'] * 100:.0f}%" for t in samples["threads"])
        lines += [
            f"**{kind}** ({samples['samples']} samples; threads: {threads})\n",
            "| self | function | | inclusive | function |",
            "| --- | --- | --- | --- | --- |",
        ]
        for own, inclusive in zip(samples["self"][:12], samples["inclusive"][:12], strict=False):
            lines.append(
                f"| {own['share'] * 100:.1f}% | `{own['function']}` | |"
                f" {inclusive['share'] * 100:.1f}% | `{inclusive['function']}` |"
            )
        lines.append("")
    return lines


def replace_block(document: str, block: str) -> str:
    start, end = document.index(BEGIN) + len(BEGIN), document.index(END)
    return document[:start] + "\n" + block + "\n" + document[end:]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("json", type=Path, help="a `kvstore bench --out` file")
    parser.add_argument("--into", type=Path, help="a document with BEGIN/END RESULTS markers to update")
    args = parser.parse_args()
    block = render(json.loads(args.json.read_text()))
    if args.into is None:
        print(block)
    else:
        args.into.write_text(replace_block(args.into.read_text(), block))


if __name__ == "__main__":
    main()

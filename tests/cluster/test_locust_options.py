"""The locustfile's --kv-* options, as Locust itself sees them: registered on Locust's parser and
marked for the web UI, shown by a real web UI, and a web UI edit reaching the users; the
consistency mix's syntax (LEVEL=WEIGHT, levels spelled as `Consistency.parse` reads them).

Importing locust patches the standard library for gevent, so everything that loads the locustfile
runs in a subprocess, never in pytest's own process."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from kvstore.cluster.local import free_ports
from tests.conftest import stop_process, wait_until

ROOT = Path(__file__).resolve().parents[2]
LOCUSTFILE = ROOT / "loadtests" / "locustfile.py"

# Loads the locustfile with Locust's own loader (its import registers the parser listener), builds Locust's
# parser, and prints what the web UI would list, plus parse_mix's answers for the mixes given.
PROBE = textwrap.dedent(
    """
    import json, sys
    from locust.argument_parser import get_parser, ui_extra_args_dict
    from locust.util.load_locustfile import load_locustfile
    load_locustfile(sys.argv[1])
    module = sys.modules["locustfile"]
    parser = get_parser(default_config_files=[])
    mixes = {}
    for text in json.loads(sys.argv[2]):
        try:
            mixes[text] = [[label, str(level), weight] for label, level, weight in module.parse_mix(text)]
        except ValueError as err:
            mixes[text] = str(err)
    print(json.dumps({
        "kv_options": sorted(a.dest for a in parser._actions if a.dest.startswith("kv_")),
        "web_ui": ui_extra_args_dict([]),
        "mixes": mixes,
    }))
    """
)

MIXES = [
    "strong=1,session=2,eventual=1,bounded:0.5s=3",
    "bounded0.5=1,bounded:2=1,BOUNDED:0.25S",
    "strong,session",
    "strong:1",
    "bounded0.5:1",
    "strong=x",
    "strong=0",
    "",
]


@pytest.fixture(scope="module")
def probe() -> dict[str, Any]:
    done = subprocess.run(
        [sys.executable, "-c", PROBE, str(LOCUSTFILE), json.dumps(MIXES)],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def test_every_kv_option_is_marked_for_the_web_ui(probe: dict[str, Any]) -> None:
    kv_options = probe["kv_options"]
    assert len(kv_options) == 16, kv_options
    assert sorted(k for k in probe["web_ui"] if k.startswith("kv_")) == kv_options
    mix = probe["web_ui"]["kv_consistency_mix"]
    assert mix["default_value"] == "strong=1"
    assert "bounded:0.5s=1" in mix["help_text"]
    policies = ["leader", "nearest", "round_robin", "followers_only"]
    assert probe["web_ui"]["kv_read_policy"]["choices"] == policies


def test_consistency_mix_is_level_equals_weight_labelled_with_one_spelling(probe: dict[str, Any]) -> None:
    mixes = probe["mixes"]
    assert mixes["strong=1,session=2,eventual=1,bounded:0.5s=3"] == [
        ["strong", "strong", 1.0],
        ["session", "session", 2.0],
        ["eventual", "eventual", 1.0],
        ["bounded:0.5s", "bounded:0.5s", 3.0],
    ]
    # Every spelling Consistency.parse accepts; the label is the canonical one; no weight means 1.
    assert mixes["bounded0.5=1,bounded:2=1,BOUNDED:0.25S"] == [
        ["bounded:0.5s", "bounded:0.5s", 1.0],
        ["bounded:2.0s", "bounded:2.0s", 1.0],
        ["bounded:0.25s", "bounded:0.25s", 1.0],
    ]
    assert mixes["strong,session"] == [["strong", "strong", 1.0], ["session", "session", 1.0]]


@pytest.mark.parametrize(
    ("mix", "says"),
    [
        ("strong:1", "unknown consistency 'strong:1'; valid forms: strong, session, eventual, bounded:"),
        ("bounded0.5:1", "a bounded read needs a positive number of seconds; valid forms:"),
        ("strong=x", "bad weight in 'strong=x'"),
        ("strong=0", "no level with a positive weight"),
        ("", "no level with a positive weight"),
    ],
)
def test_a_bad_consistency_mix_names_the_valid_forms_and_the_syntax(
    probe: dict[str, Any], mix: str, says: str
) -> None:
    error = probe["mixes"][mix]
    assert isinstance(error, str), error
    assert says in error
    assert "LEVEL=WEIGHT" in error


def test_a_bad_consistency_mix_on_the_command_line_is_a_usage_error() -> None:
    cmd = [
        sys.executable, "-m", "locust", "-f", str(LOCUSTFILE), "--headless", "-t", "1s",
        "--kv-consistency-mix", "strong:1",
    ]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert done.returncode == 2, done.stderr[-2000:]
    assert "argument --kv-consistency-mix" in done.stderr
    assert "valid forms: strong, session, eventual" in done.stderr


def test_web_ui_on_loopback_shows_the_kv_options_and_passes_edits_to_the_users(tmp_path: Path) -> None:
    """A real web UI (the documented command: --web-host 127.0.0.1) lists the --kv-* options, and
    a value typed into its form reaches the users through environment.parsed_options: an invalid
    mix from the form is reported by each user (a valid default would run silently)."""
    (port,) = free_ports(1)
    log = tmp_path / "locust.log"
    cmd = [
        sys.executable, "-m", "locust", "-f", str(LOCUSTFILE), "--web-host", "127.0.0.1",
        "--web-port", str(port), "--host", str(tmp_path / "no-cluster"),
    ]  # fmt: skip
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT)
    try:
        page = str(wait_until(lambda: _get(f"http://127.0.0.1:{port}/"), timeout=30, interval=0.3))
        for option in ("kv_consistency_mix", "kv_read_policy", "kv_kill_leader_at", "kv_report"):
            assert f'"{option}"' in page, option
        form = {"user_count": "1", "spawn_rate": "1", "kv_consistency_mix": "from-the-form=1"}
        answer = json.loads(_post(f"http://127.0.0.1:{port}/swarm", form))
        assert answer["success"] is True, answer
        wait_until(lambda: "unknown consistency 'from-the-form'" in log.read_text(), timeout=15, interval=0.2)
    finally:
        stop_process(proc)
    assert "Traceback" not in log.read_text()  # the user stopped cleanly (no client to close)


def _get(url: str) -> str:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return str(response.read().decode())
    except OSError:
        return ""  # not listening yet


def _post(url: str, form: dict[str, str]) -> str:
    data = urllib.parse.urlencode(form).encode()
    with urllib.request.urlopen(url, data=data, timeout=10) as response:
        return str(response.read().decode())

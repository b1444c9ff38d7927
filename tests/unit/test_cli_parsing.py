"""The CLI's pure parts, without a cluster: how bytes are typed and printed (kvstore/cli_bytes.py),
which cluster a command talks to, what a bad command line says and its exit status. Commands that
reach a cluster are tested against a real one in tests/cluster/test_cli_scripts.py."""

from __future__ import annotations

import argparse
import io
import json
from importlib.metadata import version
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from kvstore import cli, cli_kv, errors
from kvstore.cli_bytes import UsageError, json_bytes, json_fields, parse_bytes, shown
from kvstore.config import MAX_VALUE_BYTES
from kvstore.consistency import Consistency


@given(st.binary(max_size=64), st.booleans())
def test_every_byte_string_survives_its_json_form(data: bytes, hex_mode: bool) -> None:
    fields = json_fields("value", data, hex_mode)
    assert len(fields) == 1  # one form, never two
    assert json_bytes(json.loads(json.dumps(fields)), "value") == data


def test_the_json_form_is_text_when_utf8_else_base64_and_hex_when_asked() -> None:
    assert json_fields("key", "grüße".encode(), False) == {"key": "grüße"}
    assert json_fields("key", b"bin\xff\x00key", False) == {"key_b64": "Ymlu/wBrZXk="}
    assert json_fields("key", b"\xed\xa0\x80", False) == {"key_b64": "7aCA"}  # a surrogate: not UTF-8
    assert json_fields("key", b"ab", True) == {"key_hex": "6162"}
    assert json_bytes({"value": None}, "value") is None


def test_arguments_are_text_or_hex() -> None:
    assert parse_bytes("6b6579", True, "key") == b"key"
    assert parse_bytes("6B 65", True, "key") == b"ke"  # fromhex: either case, spaces between bytes
    assert parse_bytes("6b6579", False, "key") == b"6b6579"
    assert parse_bytes("bin\udcff", False, "key") == b"bin\xff"  # argv bytes that were not UTF-8
    with pytest.raises(UsageError, match=r"key 'zz' is not hexadecimal"):
        parse_bytes("zz", True, "key")
    assert shown(b"\x00\xff", True) == b"00ff" and shown(b"\x00\xff", False) == b"\x00\xff"


def _args(**given: str) -> argparse.Namespace:
    return argparse.Namespace(**{"cluster": None, "router": None, "endpoints": None} | given)


def test_the_cluster_comes_from_the_flags_else_from_kvstore_cluster(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(cli_kv.CLUSTER_ENV, raising=False)
    with pytest.raises(UsageError, match=r"--cluster DIR, --router ADDR, --endpoints A,B or KVSTORE_CLUSTER"):
        cli_kv.cluster_target(_args())
    monkeypatch.setenv(cli_kv.CLUSTER_ENV, "/env/dir")
    assert cli_kv.cluster_target(_args()) == ("cluster", "/env/dir")
    assert cli_kv.cluster_target(_args(cluster="/flag")) == ("cluster", "/flag")  # a flag wins
    assert cli_kv.cluster_target(_args(router="h:1")) == ("router", "h:1")
    with pytest.raises(UsageError, match="name one cluster, not --cluster and --router"):
        cli_kv.cluster_target(_args(cluster="/a", router="h:1"))  # one before the command, one after


def _run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    try:
        code = cli.main(list(argv))
    except SystemExit as exit_:  # argparse's own refusals (and --version) exit
        code = int(exit_.code or 0)
    out, err = capsys.readouterr()
    return code, out, err


def test_a_bad_consistency_is_a_usage_error_listing_the_forms(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = _run(capsys, "--cluster", "/nowhere", "get", "k", "--consistency", "bounded")
    assert code == cli_kv.EXIT_USAGE and out == ""
    assert f"valid forms: {Consistency.FORMS}" in err and "Traceback" not in err
    for spelling in ("bounded:0.5s", "bounded:0.5", "bounded0.5", "BOUNDED0.5S"):
        parsed = cli.build_parser().parse_args(["get", "k", "--consistency", spelling]).consistency
        assert parsed == Consistency.bounded(0.5), spelling


def test_value_sources_are_given_once(capsys: pytest.CaptureFixture[str]) -> None:
    for argv in (["put", "k"], ["put", "k", "v", "--value", "w"], ["cas", "k", "--expected-revision", "1"]):
        code, out, err = _run(capsys, "--cluster", "/nowhere", *argv)
        assert code == cli_kv.EXIT_USAGE and out == "", argv
        assert "give the value once: VALUE, - (stdin), --value V or --file F" in err, argv
    code, _, err = _run(capsys, "--cluster", "/nowhere", "put", "k", "--file", "/no/such/file")
    assert code == cli_kv.EXIT_USAGE and "--file /no/such/file: No such file or directory" in err
    code, _, err = _run(capsys, "--cluster", "/nowhere", "cas", "k", "v", "--expected-revision", "-1")
    assert code == cli_kv.EXIT_USAGE and "-1 is below 0" in err
    # Checked before connecting: the cluster directory does not exist, yet the refusal is the value's.
    args = cli.build_parser().parse_args(["put", "k", "--value", "-"])
    assert (args.value, args.literal) == (None, "-")


def test_a_value_is_read_no_further_than_any_node_accepts(tmp_path: Path) -> None:
    class Endless(io.RawIOBase):  # `yes | kvstore put k -`: must be refused, not read forever
        served = 0

        def readable(self) -> bool:
            return True

        def readinto(self, buffer: Any) -> int:
            buffer[:] = b"y" * len(buffer)
            Endless.served += len(buffer)
            return len(buffer)

    with pytest.raises(UsageError, match=r"stdin: the value is larger than 8388608 bytes"):
        cli_kv._read_value(io.BufferedReader(Endless()), "stdin")
    assert Endless.served < MAX_VALUE_BYTES + (1 << 20)
    big = tmp_path / "big"
    big.write_bytes(b"x" * (MAX_VALUE_BYTES + 1))
    args = cli.build_parser().parse_args(["put", "k", "--file", str(big)])
    with pytest.raises(UsageError, match=rf"--file {big}: the value is larger"):
        cli_kv._value(args)
    big.write_bytes(b"x" * MAX_VALUE_BYTES)  # the largest a node can be set to accept: read whole
    assert cli_kv._value(args) == b"x" * MAX_VALUE_BYTES


def test_no_cluster_map_is_a_usage_error(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    code, out, err = _run(capsys, "--cluster", str(tmp_path), "get", "k")
    assert code == cli_kv.EXIT_USAGE and out == "" and "no cluster map at" in err


def test_version_is_the_installed_packages(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = _run(capsys, "--version")
    assert code == 0 and out == f"kvstore {version('kvstore')}\n"


def test_help_lists_the_exit_statuses_and_the_byte_rules(capsys: pytest.CaptureFixture[str]) -> None:
    _, out, _ = _run(capsys, "--help")
    for line in cli_kv.EXIT_STATUS_HELP.splitlines():
        assert line in out
    _, out, _ = _run(capsys, "get", "--help")
    assert '"F_b64": base64' in out and "KVSTORE_CLUSTER" in out


@pytest.mark.parametrize(
    ("raised", "code", "stderr"),
    [
        (
            errors.UnknownOutcome("write outcome unknown\nafter 1.0s"),
            5,
            "error (unknown_outcome): write outcome unknown after 1.0s\n",
        ),
        (errors.Unavailable("no leader"), 4, "error (unavailable): no leader\n"),
        (errors.InvalidArgument("value too large"), 4, "error (invalid_argument): value too large\n"),
        (KeyboardInterrupt(), 130, "interrupted\n"),
    ],
)
def test_errors_become_one_line_and_an_exit_status(
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    raised: BaseException,
    code: int,
    stderr: str,
) -> None:
    def fail(args: argparse.Namespace) -> int:
        raise raised

    monkeypatch.setattr(cli_kv, "run", fail)
    assert _run(capsys, "--cluster", "/c", "put", "k", "v") == (code, "", stderr)


def test_move_slots_takes_a_slot_range_or_one_slot_and_refuses_anything_else() -> None:
    from kvstore import errors
    from kvstore.cli_moves import parse_slots

    assert parse_slots("0-1023") == (0, 1023) and parse_slots("7") == (7, 7)
    assert parse_slots("65535") == (65535, 65535)
    for bad in ("", "a-b", "5-4", "0-65536", "-1", "1-2-3"):
        with pytest.raises(errors.InvalidArgument, match="--slots"):
            parse_slots(bad)

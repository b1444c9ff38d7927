"""One consistency type (kvstore/consistency.py), pinned to the wire enum, and the SDK's names on it.
No processes."""

from __future__ import annotations

import pytest

import kvstore
from kvstore.client import core
from kvstore.consistency import Consistency, ConsistencyLevel, ReadConsistency
from kvstore.proto import kvstore_pb2 as pb
from kvstore.server import validation


def test_levels_are_the_proto_enum_member_for_member_both_ways() -> None:
    ours = {level.name: int(level) for level in ConsistencyLevel}
    wire = dict(pb.Consistency.items())
    assert ours == wire
    for name, number in wire.items():
        assert ConsistencyLevel(number).name == name
        assert pb.Consistency.Name(ConsistencyLevel[name]) == name


def test_a_level_goes_on_the_wire_and_comes_back_as_itself() -> None:
    for level in ConsistencyLevel:
        options = pb.ReadOptions(consistency=level, max_staleness_seconds=1.0)
        decoded = pb.ReadOptions.FromString(options.SerializeToString())
        assert ConsistencyLevel(decoded.consistency) is level


def test_the_sdk_names_are_the_one_type() -> None:
    assert kvstore.Consistency is Consistency and kvstore.ReadConsistency is ReadConsistency
    assert core.Consistency is Consistency and core.ReadConsistency is ReadConsistency
    assert Consistency.STRONG == ReadConsistency(ConsistencyLevel.STRONG)
    assert Consistency.STRONG == ReadConsistency(pb.STRONG)  # a plain int from the wire is equal
    assert Consistency.SESSION.level is ConsistencyLevel.SESSION
    assert Consistency.EVENTUAL.level is ConsistencyLevel.EVENTUAL
    bounded = Consistency.bounded(seconds=0.5)
    assert (bounded.level, bounded.max_staleness) == (ConsistencyLevel.BOUNDED, 0.5)
    assert [str(c) for c in (Consistency.STRONG, Consistency.SESSION, Consistency.EVENTUAL, bounded)] == [
        "strong",
        "session",
        "eventual",
        "bounded:0.5s",
    ]
    assert Consistency.parse("bounded:0.25s") == Consistency.bounded(0.25)
    assert Consistency.parse(" Session ") is Consistency.SESSION
    with pytest.raises(ValueError):
        Consistency.bounded(0)
    with pytest.raises(ValueError):
        Consistency.parse("linearizable")


def test_the_server_accepts_exactly_the_levels() -> None:
    for level in ConsistencyLevel:
        validation.check_read(level, 1.0)
    with pytest.raises(Exception, match="unknown consistency level"):
        validation.check_read(max(ConsistencyLevel) + 1, 0.0)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("strong", Consistency.STRONG),
        (" Session ", Consistency.SESSION),
        ("eventual", Consistency.EVENTUAL),
        ("bounded:0.5s", Consistency.bounded(0.5)),
        ("bounded:0.5", Consistency.bounded(0.5)),
        ("bounded0.5", Consistency.bounded(0.5)),
        ("bounded2s", Consistency.bounded(2)),
    ],
)
def test_every_spelling_of_a_level_parses_to_it(text: str, expected: ReadConsistency) -> None:
    assert Consistency.parse(text) == expected
    assert Consistency.parse(str(expected)) == expected  # str() is the canonical, parseable form


@pytest.mark.parametrize(
    "text", ["linearizable", "bounded", "bounded:", "bounded:-1s", "bounded:nan", "bounded:xs"]
)
def test_a_wrong_spelling_is_refused_listing_the_valid_forms(text: str) -> None:
    with pytest.raises(ValueError, match="valid forms: strong, session, eventual, bounded:SECONDS"):
        Consistency.parse(text)


def test_coerce_takes_a_level_or_its_name_and_nothing_else() -> None:
    assert Consistency.coerce(Consistency.SESSION) is Consistency.SESSION
    assert Consistency.coerce("eventual") == Consistency.EVENTUAL
    with pytest.raises(TypeError, match="valid forms"):
        Consistency.coerce(3)  # type: ignore[arg-type]

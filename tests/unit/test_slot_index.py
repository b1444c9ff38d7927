"""The storage's slot index (issue 16, item 4): the keys of a slot range are listed from the index,
in (slot, key) order, page by page, and the index always matches the data, whatever the writes
(puts, batched puts, deletes, a refused savepoint); a store of the previous release gets its
index when opened; a snapshot carries it."""

from __future__ import annotations

import io
import threading
from pathlib import Path

import lmdb
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvstore.routing.ring import SLOT_COUNT, slot_of
from kvstore.storage.engine import Storage


def _listed(storage: Storage, first: int = 0, last: int = SLOT_COUNT - 1, limit: int = 7) -> list[bytes]:
    """Every key of slots first..last, page by page."""
    keys: list[bytes] = []
    after = None
    for _ in range(10_000):
        records, after, _ = storage.slot_keys(first, last, after, limit)
        assert len(records) <= limit
        keys += [r.key for r in records]
        if after is None:
            return keys
    raise AssertionError("listing did not end")


def _expected(keys: set[bytes], first: int = 0, last: int = SLOT_COUNT - 1) -> list[bytes]:
    return sorted((k for k in keys if first <= slot_of(k) <= last), key=lambda k: (slot_of(k), k))


_KEYS = st.binary(min_size=1, max_size=6)
_OPS = st.lists(
    st.one_of(
        st.tuples(st.just("put"), _KEYS),
        st.tuples(st.just("put_many"), st.lists(_KEYS, max_size=8, unique=True)),
        st.tuples(st.just("delete"), _KEYS),
        st.tuples(st.just("refused"), _KEYS),
    ),
    max_size=40,
)


@settings(max_examples=60, deadline=None)
@given(ops=_OPS, limit=st.integers(1, 5))
def test_the_index_lists_exactly_the_stored_keys_in_slot_order(
    tmp_path_factory: pytest.TempPathFactory, ops: list[tuple[str, object]], limit: int
) -> None:
    storage = Storage(tmp_path_factory.mktemp("s"), fsync=False)
    model: set[bytes] = set()
    for revision, (op, arg) in enumerate(ops, 1):
        if op == "put":
            storage.put(arg, b"v", revision)  # type: ignore[arg-type]
            model.add(arg)  # type: ignore[arg-type]
        elif op == "put_many":
            storage.put_many(tuple((k, b"m") for k in arg), revision)  # type: ignore[union-attr]
            model.update(arg)  # type: ignore[arg-type]
        elif op == "delete":
            assert storage.delete(arg) == (arg in model)  # type: ignore[arg-type]
            model.discard(arg)  # type: ignore[arg-type]
        else:  # a write inside a savepoint that is refused leaves nothing, in the index neither
            with pytest.raises(RuntimeError), storage.savepoint():
                storage.put(arg + b"!", b"x", revision)  # type: ignore[operator]
                raise RuntimeError("refused")
        if revision % 5 == 0:
            storage.commit()
    storage.commit()
    assert _listed(storage, limit=limit) == _expected(model)
    assert storage.slot_key_count(0, SLOT_COUNT - 1) == len(model) == storage.key_count()
    if model:  # a range: only its slots, still complete
        middle = slot_of(sorted(model)[len(model) // 2])
        assert _listed(storage, middle, middle, limit) == _expected(model, middle, middle)
        assert _listed(storage, 0, middle, limit) == _expected(model, 0, middle)
        assert storage.slot_key_count(middle, middle) == len(_expected(model, middle, middle))
    storage.close()


def test_listing_returns_values_and_revisions_and_the_applied_index(tmp_path: Path) -> None:
    storage = Storage(tmp_path, fsync=False)
    long_key = b"k" * storage.max_key_size  # as long as LMDB allows: indexed too
    storage.put(long_key, b"long", 3)
    storage.put_many(((b"a", b"1"), (b"b", b"2")), 4)
    storage.set_applied(4, 1)
    storage.commit()
    records, after, applied = storage.slot_keys(0, SLOT_COUNT - 1)
    assert after is None and applied == 4
    assert {(r.key, r.value, r.revision) for r in records} == {
        (long_key, b"long", 3),
        (b"a", b"1", 4),
        (b"b", b"2", 4),
    }
    with pytest.raises(ValueError):
        storage.slot_keys(5, 4)
    with pytest.raises(ValueError):
        storage.slot_keys(0, SLOT_COUNT)


def test_a_store_of_the_previous_release_is_indexed_when_opened(tmp_path: Path) -> None:
    storage = Storage(tmp_path, fsync=False)
    keys = {b"old:%d" % i for i in range(3000)}
    storage.put_many(tuple((k, b"v") for k in keys), 1)
    storage.commit()
    storage.close()
    # Make it look like the previous release's: no index, no mark.
    env = lmdb.open(str(tmp_path / "lmdb"), max_dbs=8)
    with env.begin(write=True) as txn:
        txn.drop(env.open_db(b"slots", txn=txn, dupsort=True), delete=True)
        txn.delete(b"slot_index", db=env.open_db(b"meta", txn=txn))
    env.close()
    again = Storage(tmp_path, fsync=False)
    assert _listed(again, limit=500) == _expected(keys)
    assert again.slot_key_count(0, SLOT_COUNT - 1) == len(keys)


def test_a_snapshot_carries_the_index(tmp_path: Path) -> None:
    source = Storage(tmp_path / "a", fsync=False)
    keys = {b"snap:%d" % i for i in range(200)}
    source.put_many(tuple((k, b"v") for k in keys), 1)
    source.set_applied(1, 1)
    source.commit()
    out = io.BytesIO()
    txn = source.begin_snapshot()
    path = tmp_path / "copy.mdb"
    with open(path, "wb") as f:
        source.write_snapshot(txn, f)
    out.write(path.read_bytes())
    target = Storage(tmp_path / "b", fsync=False)
    target.put(b"gone", b"x", 1)
    target.commit()
    out.seek(0)
    target.install_snapshot(out, len(out.getvalue()))
    assert _listed(target, limit=50) == _expected(keys)


def _write_as_the_previous_release(path: Path, put: dict[bytes, bytes], delete: list[bytes]) -> None:
    """Write to a store as a release without the slot index would: data only (mark left alone)."""
    env = lmdb.open(str(path / "lmdb"), max_dbs=8)
    with env.begin(write=True) as txn:
        data = env.open_db(b"data", txn=txn)
        for key, value in put.items():
            txn.put(key, b"\0" * 8 + value, db=data)
        for key in delete:
            txn.delete(key, db=data)
    env.close()


def test_an_index_out_of_step_with_its_data_is_rebuilt_and_an_upgrade_always_rebuilds(tmp_path: Path) -> None:
    storage = Storage(tmp_path, fsync=False)
    storage.put_many(((b"a", b"1"), (b"b", b"2")), 1)
    storage.commit()
    storage.close()
    _write_as_the_previous_release(tmp_path, {b"c": b"3"}, [])  # a key more than the index holds
    again = Storage(tmp_path, fsync=False)
    assert _listed(again) == _expected({b"a", b"b", b"c"})
    again.close()
    # As many keys as indexed, but not the same ones: only the data dir's older format tells.
    _write_as_the_previous_release(tmp_path, {b"d": b"4"}, [b"a"])
    assert _listed(Storage(tmp_path, fsync=False)) != _expected({b"b", b"c", b"d"})  # not detectable
    assert _listed(Storage(tmp_path, fsync=False, rebuild_slot_index=True)) == _expected({b"b", b"c", b"d"})


def test_installing_a_snapshot_without_an_index_into_a_nearly_full_map_builds_it(tmp_path: Path) -> None:
    # It grows the map while holding the lock that swaps the store: grow must not take it again.
    source = Storage(tmp_path / "a", fsync=False)
    keys = {b"big:%05d" % i for i in range(6000)}
    source.put_many(tuple((k, b"v" * 80) for k in keys), 1)
    source.set_applied(1, 1)
    source.commit()
    source.close()
    env = lmdb.open(str(tmp_path / "a" / "lmdb"), max_dbs=8)
    with env.begin(write=True) as txn:  # a snapshot from a leader of the previous release
        txn.drop(env.open_db(b"slots", txn=txn, dupsort=True), delete=True)
        txn.delete(b"slot_index", db=env.open_db(b"meta", txn=txn))
    copy = tmp_path / "copy.mdb"
    env.copy(str(tmp_path), compact=True)
    env.close()
    (tmp_path / "data.mdb").rename(copy)
    target = Storage(tmp_path / "b", map_size=1 << 20, fsync=False)
    assert copy.stat().st_size >= (1 << 20) // 2
    done = threading.Event()

    def install() -> None:
        with open(copy, "rb") as f:
            target.install_snapshot(f, copy.stat().st_size)
        done.set()

    threading.Thread(target=install, daemon=True).start()
    assert done.wait(30), "installing the snapshot hung"
    assert target.slot_key_count(0, SLOT_COUNT - 1) == len(keys)


def test_a_continuation_outside_the_range_is_refused(tmp_path: Path) -> None:
    storage = Storage(tmp_path, fsync=False)
    with pytest.raises(ValueError, match="continuation slot 3"):
        storage.slot_keys(10, 20, after=(3, b"k"))
    with pytest.raises(ValueError, match="continuation slot 70000"):
        storage.slot_keys(10, SLOT_COUNT - 1, after=(70_000, b"k"))

"""A restricted unpickler for everything pysyncobj reads: peer messages, log entries, its journal.

pysyncobj pickles its messages and log entries. `pickle.loads` on bytes that came from elsewhere runs
whatever callable the bytes name (`os.system`, ...). What pysyncobj and kvstore actually send is
built from plain containers and scalars only (dict, list, tuple, set, bytes, str, int, float, bool,
None): with pickle protocol 5 (which kvstore's state machine sets) those are all opcodes and need no
global at all. `find_class` is asked only for what is on the allow-list below; anything else raises,
so a forged frame cannot run code even when it carries a valid password (defence in depth).

`harden_pysyncobj()` points pysyncobj's own `loads`/`load` (used by its TCP connections, apply path
and journal) at this unpickler. It runs when this module is imported.
"""

from __future__ import annotations

import codecs
import io
import pickle
from typing import Any


def _latin1_encode(text: str, encoding: str = "utf-8") -> bytes:
    """How protocol 2 spells bytes (`_codecs.encode(str, 'latin1')`): journals written before kvstore
    switched pysyncobj to protocol 5 hold entries in that form. Only the latin-1 codec is allowed."""
    if not isinstance(text, str) or codecs.lookup(encoding).name != "iso8859-1":
        raise pickle.UnpicklingError(f"_codecs.encode with {encoding!r} refused")
    return text.encode("latin-1")


# (module, name) -> the object find_class returns. Everything pysyncobj and kvstore pickle is built
# without globals in protocol 5 (checked by logging find_class over a test run: no call at all).
_ALLOWED: dict[tuple[str, str], Any] = {
    ("_codecs", "encode"): _latin1_encode,
    ("builtins", "set"): set,
    ("builtins", "frozenset"): frozenset,
    ("builtins", "bytearray"): bytearray,
}


class RefusedGlobal(pickle.UnpicklingError):
    """A pickle asked for a global that is not on the allow-list."""


class RestrictedUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if module == "__builtin__":  # protocol < 3 spells builtins the Python 2 way
            module = "builtins"
        try:
            return _ALLOWED[(module, name)]
        except KeyError:
            raise RefusedGlobal(f"pickle global {module}.{name} refused") from None


def loads(data: bytes | str) -> Any:
    if isinstance(data, str):  # pysyncobj's loads accepted both (its to_bytes)
        data = data.encode("utf-8")
    return RestrictedUnpickler(io.BytesIO(data)).load()


def load(file: Any) -> Any:
    return RestrictedUnpickler(file).load()


def harden_pysyncobj() -> None:
    """Make every unpickling inside pysyncobj go through RestrictedUnpickler (idempotent)."""
    import pysyncobj.journal as journal
    import pysyncobj.pickle as pysyncobj_pickle

    pysyncobj_pickle.loads = loads  # tcp_connection, syncobj (apply, chunked entries), serializer
    pysyncobj_pickle.load = load
    journal.loads = loads  # imported by name: `from .pickle import loads`


harden_pysyncobj()
